"""compare_models: KL is zero for identical models, positive otherwise; perplexity matches a direct computation."""

import math

import pytest
import torch
from tiny import save_char_tokenizer

import prism_load
from prism_convert.tools.evaluate import compare_models


def test_identical_models(tiny_checkpoint):
    folder, ref = tiny_checkpoint("mixtral")
    model = prism_load.load(folder, dtype=torch.float32)
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
    a, b = prism_load.load(folder, dtype=torch.float32), prism_load.load(folder, dtype=torch.float32)
    with torch.no_grad():
        b.lm_head.weight.add_(0.05 * torch.randn_like(b.lm_head.weight))
    tokens = torch.randint(0, ref.config.vocab_size, (2, 9))
    result = compare_models(a, b, tokens)
    assert result["kl"] > 1e-4
    assert result["perplexity_reference"] != result["perplexity"]


# -- evaluate: both models loaded from disk, held-out tokens or a token tensor ------------------------------
@pytest.fixture(scope="module")
def containers(tmp_path_factory):
    """The same random model packed twice: near-exact encodings, and 2-bit experts; with a tokenizer."""
    from containers import random_model, write_tiny

    root = tmp_path_factory.mktemp("eval")
    tokenizer = save_char_tokenizer(root / "tokenizer.json")
    model = random_model()
    exact = write_tiny(root / "exact.prism", model=model, mix=[dict(kind="fp32")], tokenizer_files=[tokenizer])
    coarse = write_tiny(root / "coarse.prism", model=model, mix=[dict(kind="int", bits=2, group_size=16)],
                        tokenizer_files=[tokenizer])
    return exact, coarse


def test_evaluate_on_tokens_through_the_runtime(containers):
    from prism_convert.tools.evaluate import evaluate

    exact, coarse = containers
    tokens = torch.randint(0, 64, (3, 12))
    same = evaluate(exact, exact, tokens=tokens, batch_size=2, expert_cache="30%", prefetch=True)
    assert same["kl"] == 0.0 and same["top1_agreement"] == 1.0  # the cache changes no logit
    assert same["perplexity"] == same["perplexity_reference"] and same["dataset"] == "tokens"
    assert same["samples"] == 3 and same["seq_len"] == 12 and same["tokens"] == 3 * 11
    assert same["runtime"]["misses"] > 0
    worse = evaluate(coarse, exact, tokens=tokens)
    assert worse["kl"] > 1e-3 and "runtime" not in worse


def test_evaluate_on_heldout_text(containers):
    from prism_convert.tools.evaluate import evaluate

    exact, coarse = containers
    result = evaluate(coarse, exact, "builtin:prose", samples=2, seq_len=16, seed=1)
    assert result["dataset"] == "builtin:prose" and result["tokens"] == 2 * 15 and result["kl"] > 0
    again = evaluate(coarse, exact, "builtin:prose", samples=2, seq_len=16, seed=1)
    assert again["kl"] == result["kl"]  # the same held-out windows for the same seed


def test_evaluate_rejects_bad_input(containers, tmp_path):
    from containers import write_tiny

    from prism_convert.tokenizer import TokenizerError
    from prism_convert.tools.evaluate import evaluate
    from prism_load.errors import CalibrationError

    exact, _ = containers
    with pytest.raises(CalibrationError, match="integer ids"):
        evaluate(exact, exact, tokens=torch.zeros(5, dtype=torch.long))
    with pytest.raises(CalibrationError, match="must lie in"):
        evaluate(exact, exact, tokens=torch.full((1, 4), 64))
    bare = write_tiny(tmp_path / "bare.prism")
    with pytest.raises(TokenizerError, match=r"bare.prism: no tokenizer \(tokenizer.json or tokenizer.model\) in "
                                             r"either; name one with --tokenizer PATH_OR_HUB_ID"):
        evaluate(bare, bare, "builtin:prose", samples=1, seq_len=8)
    tokenizer = exact / "tokenizer.json"
    assert evaluate(exact, bare, "builtin:prose", samples=1, seq_len=8, tokenizer=str(tokenizer))["tokens"] == 7
    with pytest.raises(CalibrationError, match=r"heldout split holds \d+ samples .* but 100000 were asked for; "
                                               r"lower --samples, a shorter --seq-len, or a --dataset with more text"):
        evaluate(exact, exact, "builtin:prose", samples=100_000, seq_len=8)


def test_eval_command(containers):
    import json

    from typer.testing import CliRunner

    from prism_convert.cli.app import app

    exact, coarse = containers
    args = ["eval", str(coarse), "--reference", str(exact), "--dataset", "builtin:prose", "--samples", "2",
            "--seq-len", "16"]
    shown = CliRunner().invoke(app, args)
    assert shown.exit_code == 0, shown.output
    assert "KL" in shown.output and "perplexity" in shown.output
    data = json.loads(CliRunner().invoke(app, [*args, "--json"]).output)
    assert data["tokens"] == 30 and data["kl"] > 0
