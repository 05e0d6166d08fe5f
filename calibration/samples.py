"""Fixed-length token samples from a calibration source, deterministic under a seed.

How samples are formed: the source's documents are split into calibration and held-out sets by a stable
hash of their text (so the two never share a document, on any machine, whatever the seed), shuffled with
the seed, tokenised and concatenated with the end-of-text token between documents (as in GPT-style
pre-training), cut into non-overlapping windows of `seq_len`, and `samples` windows are drawn at random.
Only as many documents are tokenised as give a pool of POOL_FACTOR x the tokens asked for, so a large
dataset costs what the request needs. A MixSource draws its parts' shares separately, then shuffles.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import numpy as np
import torch

from prism_load.errors import CalibrationError

from .sources import CalibrationSource, MixSource

SPLITS = ("calibration", "heldout")
HELDOUT_PER_MILLE = 100  # ~10% of documents are held out
POOL_FACTOR = 4
EOS_NAMES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|im_end|>", "<|eot_id|>", "<|end|>")


def document_split(text: str) -> str:
    """'heldout' for ~10% of documents, 'calibration' for the rest, by a hash of the text alone."""
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return "heldout" if int.from_bytes(digest, "big") % 1000 < HELDOUT_PER_MILLE else "calibration"


def eos_token_id(tokenizer) -> int | None:
    """The tokenizer's end-of-text token, looked up by the names common tokenizers give it."""
    for name in EOS_NAMES:
        token_id = tokenizer.token_to_id(name)
        if token_id is not None:
            return token_id
    return None


def token_stream(tokenizer, documents: Iterable[str], eos_id: int | None, limit_tokens: int | None = None,
                 batch_size: int = 64) -> torch.Tensor:
    """Documents tokenised (no special tokens added) and concatenated, each followed by `eos_id` (or by a
    blank line when the tokenizer has no end-of-text token); stops once `limit_tokens` are collected."""
    chunks, total, batch = [], 0, []
    suffix = "" if eos_id is not None else "\n\n"

    def flush() -> int:
        n = 0
        for enc in tokenizer.encode_batch([d + suffix for d in batch], add_special_tokens=False):
            ids = enc.ids + ([eos_id] if eos_id is not None else [])
            chunks.append(np.asarray(ids, dtype=np.int64))
            n += len(ids)
        batch.clear()
        return n

    for doc in documents:
        batch.append(doc)
        if len(batch) == batch_size:
            total += flush()
            if limit_tokens is not None and total >= limit_tokens:
                break
    if batch:
        flush()
    return torch.from_numpy(np.concatenate(chunks)) if chunks else torch.zeros(0, dtype=torch.long)


def token_samples(source: CalibrationSource, tokenizer, samples: int, seq_len: int, seed: int = 0,
                  split: str = "calibration", eos_id: int | None = None) -> torch.Tensor:
    """`samples` windows of `seq_len` tokens [samples, seq_len] (int64) from one split of `source`."""
    if split not in SPLITS:
        raise CalibrationError(f"split {split!r} is not one of {', '.join(SPLITS)}")
    if samples < 1 or seq_len < 1:
        raise CalibrationError(f"samples ({samples}) and seq_len ({seq_len}) must be at least 1")
    eos_id = eos_token_id(tokenizer) if eos_id is None else eos_id
    if not isinstance(source, MixSource):
        return _windows(source, tokenizer, samples, seq_len, seed, split, eos_id)
    counts = apportion(samples, [weight for _, weight in source.parts])
    parts = [
        _windows(part, tokenizer, n, seq_len, seed, split, eos_id, share_of=source.name)
        for (part, _), n in zip(source.parts, counts)
        if n
    ]
    mixed = torch.cat(parts)
    return mixed[torch.randperm(len(mixed), generator=torch.Generator().manual_seed(seed))]


def apportion(total: int, weights: list[float]) -> list[int]:
    """Integer shares of `total` proportional to `weights` (largest remainder; ties to the first)."""
    scale = total / sum(weights)
    exact = [w * scale for w in weights]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: (counts[i] - exact[i], i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def split_documents(source: CalibrationSource, split: str) -> list[str]:
    """The non-blank documents of one split; an empty source is an error, an empty split is not."""
    docs = [d for d in source.documents() if d.strip()]
    if not docs:
        raise CalibrationError(f"{source.name}: the dataset is empty (no non-blank documents)")
    return [d for d in docs if document_split(d) == split]


def _windows(source, tokenizer, samples, seq_len, seed, split, eos_id, share_of: str | None = None):
    docs = split_documents(source, split)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(docs), generator=generator).tolist()
    stream = token_stream(tokenizer, (docs[i] for i in order), eos_id, POOL_FACTOR * samples * seq_len)
    held = len(stream) // seq_len
    if held < samples:
        share = f" (its share of {share_of})" if share_of else ""
        raise CalibrationError(
            f"{source.name}: the {split} split holds {held} samples of {seq_len} tokens "
            f"({len(stream):,} tokens in {len(docs)} documents), but {samples} were asked for{share}"
        )
    windows = stream[: held * seq_len].view(held, seq_len)
    return windows[torch.randperm(held, generator=generator)[:samples]]
