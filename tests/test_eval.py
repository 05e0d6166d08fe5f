"""compare_models: KL is zero for identical models, positive otherwise; perplexity matches a direct computation."""

import math

import pytest
import torch

import prism_load
from prism_convert.eval import compare_models


def test_identical_models(tiny_checkpoint):
    folder, ref = tiny_checkpoint("mixtral")
    model = prism_load.load(folder)
    tokens = torch.randint(0, ref.config.vocab_size, (3, 9))
    result = compare_models(model, model, tokens, batch_size=2)
    assert result["kl"] == pytest.approx(0.0, abs=1e-12)
    assert result["top1_agreement"] == 1.0 and result["tokens"] == 3 * 8
    with torch.no_grad():
        logp = torch.log_softmax(ref(tokens).logits[:, :-1].double(), -1)
    nll = -logp.gather(-1, tokens[:, 1:, None]).mean().item()
    assert result["perplexity"] == pytest.approx(math.exp(nll), rel=1e-5)


def test_perturbed_model_has_positive_kl(tiny_checkpoint):
    folder, ref = tiny_checkpoint("mixtral")
    a, b = prism_load.load(folder), prism_load.load(folder)
    with torch.no_grad():
        b.lm_head.weight.add_(0.05 * torch.randn_like(b.lm_head.weight))
    tokens = torch.randint(0, ref.config.vocab_size, (2, 9))
    result = compare_models(a, b, tokens)
    assert result["kl"] > 1e-4
    assert result["perplexity_reference"] != result["perplexity"]
