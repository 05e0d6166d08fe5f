"""`prism eval`: how far a packed model's next-token distributions are from the original's.

KL(original ‖ packed) per predicted token (nats, averaged over held-out tokens) is the measure the quality
benchmark and the container's quality summary report, next to both perplexities and top-1 agreement.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from prism_convert.tokenizer import ResolvedTokenizer, TokenizerError, resolve_tokenizer
from prism_load.errors import CalibrationError, ConfigError


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
             seed: int = 0, *, tokens: torch.Tensor | None = None, batch_size: int = 8, tokenizer: str | None = None,
             **load_options) -> dict:
    """Load both models and score them on held-out text: `samples` windows of `seq_len` tokens of `dataset`'s
    held-out split (never the calibration split), tokenised with `tokenizer` (--tokenizer: a path or Hub id),
    else the reference's tokenizer, else the packed model's; or on `tokens` [N, L] when given. The text is
    drawn before either model is loaded, so a missing tokenizer or a short split fails at once.
    `load_options` go to prism_load.load for the packed model (for example expert_cache="50%": the runtime
    must not change a single logit). Both run in fp32 unless load_options name a dtype: the figures measure
    the container's encodings, not bf16 arithmetic."""
    import prism_load

    draw = None
    if tokens is None:
        found = eval_tokenizer(tokenizer, reference, packed)
        if found is not None:
            draw = heldout_draw(found, dataset, samples, seq_len, seed)
    original = prism_load.load(reference, dtype=torch.float32)
    candidate = prism_load.load(packed, **({"dtype": torch.float32} | load_options))
    if original.args.vocab_size != candidate.args.vocab_size:
        raise ConfigError(f"{packed} has a vocabulary of {candidate.args.vocab_size} tokens, "
                          f"{reference} of {original.args.vocab_size}: not the same model")
    if tokens is None and draw is None:  # Hub ids: their tokenizer is known once they are loaded
        tok = original.tokenizer or candidate.tokenizer
        if tok is None:
            raise TokenizerError(f"{reference} and {packed}: no tokenizer, so {dataset} cannot be tokenised; "
                                 "name one with --tokenizer (or pass tokens instead)")
        draw = heldout_draw(ResolvedTokenizer(tok, f"{reference}", True), dataset, samples, seq_len, seed)
    if draw is not None:
        tokens = draw.tokens
    else:
        dataset = "tokens"
        if tokens.dim() != 2 or tokens.shape[1] < 2 or tokens.dtype not in (torch.int32, torch.int64):
            raise CalibrationError(f"tokens must be integer ids [samples, seq_len >= 2], got {tokens.dtype} "
                                   f"{list(tokens.shape)}")
    if int(tokens.min()) < 0 or int(tokens.max()) >= original.args.vocab_size:
        raise CalibrationError(f"token ids must lie in [0, {original.args.vocab_size})")
    result = compare_models(original, candidate, tokens.long(), batch_size)
    out = {"dataset": dataset, "samples": tokens.shape[0], "seq_len": tokens.shape[1], **result}
    if draw is not None:
        out["heldout"] = draw.rule
    if hasattr(candidate, "stats"):
        s = candidate.stats()
        out["runtime"] = {k: s[k] for k in ("hits", "misses", "hit_rate", "stall_seconds", "bytes_fetched")}
    return out


def eval_tokenizer(spec: str | None, reference: Path, packed: Path) -> ResolvedTokenizer | None:
    """--tokenizer, else the first local folder's own (a checkpoint's or a container's tokenizer.json, or a
    checkpoint's tokenizer.model); None when a model is a Hub id (its tokenizer comes with it)."""
    from prism_load.hub import is_repo_id

    if spec is not None:
        return resolve_tokenizer(spec)
    for folder in (reference, packed):
        if is_repo_id(folder) or not Path(folder).is_dir():
            return None  # loading it names the problem, or brings a Hub model's tokenizer
        try:
            return resolve_tokenizer(None, Path(folder))
        except TokenizerError:
            continue
    raise TokenizerError(f"{reference} and {packed}: no tokenizer (tokenizer.json or tokenizer.model) in either; "
                         "name one with --tokenizer PATH_OR_HUB_ID")


def heldout_draw(tokenizer: ResolvedTokenizer, dataset: str, samples: int, seq_len: int, seed: int):
    from prism_convert.preflight import heldout

    return heldout(tokenizer, dataset, samples, seq_len, seed, fewer_ok=False, option="--samples")
