"""`prism eval`: how far a packed model's next-token distributions are from the original's.

KL(original ‖ packed) per predicted token (nats, averaged over held-out tokens) is the measure the quality
benchmark and the container's quality summary report, next to both perplexities and top-1 agreement.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch


@torch.inference_mode()
def compare_models(reference, candidate, tokens: torch.Tensor, batch_size: int = 8) -> dict:
    """tokens [N, L]: each row is scored on predicting its tokens 1..L-1 from the previous ones."""
    kl_sum = nll_ref = nll_cand = agree = 0.0
    count = 0
    for s in range(0, tokens.shape[0], batch_size):
        batch = tokens[s : s + batch_size]
        targets = batch[:, 1:]
        ref = torch.log_softmax(reference(batch)[:, :-1].double(), dim=-1)
        cand = torch.log_softmax(candidate(batch)[:, :-1].double(), dim=-1)
        kl_sum += float((ref.exp() * (ref - cand)).sum(-1).sum())
        nll_ref -= float(ref.gather(-1, targets[..., None]).sum())
        nll_cand -= float(cand.gather(-1, targets[..., None]).sum())
        agree += float((ref.argmax(-1) == cand.argmax(-1)).sum())
        count += targets.numel()
    return {
        "kl": kl_sum / count,
        "perplexity_reference": math.exp(nll_ref / count),
        "perplexity": math.exp(nll_cand / count),
        "top1_agreement": agree / count,
        "tokens": count,
    }


def evaluate(packed: Path, reference: Path, dataset: str = "builtin:mix", samples: int = 32, seq_len: int = 256,
             seed: int = 0) -> dict:
    """Load both models, score them on held-out samples of `dataset` (never the calibration split)."""
    import prism_load

    from .profile import calibration_tokens

    tokens = calibration_tokens(Path(reference), dataset, samples, seq_len, seed, split="heldout")
    result = compare_models(prism_load.load(reference), prism_load.load(packed), tokens)
    return {"dataset": dataset, "samples": samples, "seq_len": seq_len, **result}
