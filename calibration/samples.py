"""Fixed-length token samples from a calibration source, deterministic under a seed.

How a source is split into calibration and held-out text (the two never share a token) depends on how many
documents it has:
- "documents" (MIN_DOCUMENT_SPLIT or more documents): ~10% of documents are held out, chosen by a stable
  hash of their text (so a document never changes sides, on any machine, whatever the seed or the other
  documents). Each split's documents are shuffled with the seed, tokenised and concatenated with the
  end-of-text token between documents (as in GPT-style pre-training). Only as many documents are tokenised
  as give a pool of POOL_FACTOR x the tokens asked for, so a large dataset costs what the request needs.
- "tail" (fewer documents, e.g. a single text file): hashing a few documents would hold out all or nothing,
  so the whole source is tokenised in its own order and the last 10% of that token stream is held out.
Either way the split's stream is cut into non-overlapping windows of `seq_len` and `samples` windows are
drawn at random. A MixSource draws its parts' shares separately (each part split by its own rule), then
shuffles.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from prism_load.errors import CalibrationError

from .sources import CalibrationSource, MixSource

SPLITS = ("calibration", "heldout")
HELDOUT_PER_MILLE = 100  # ~10% of documents (or of a small source's tokens) are held out
MIN_DOCUMENT_SPLIT = 200  # fewer documents than this: hold out the tail of the token stream instead
POOL_FACTOR = 4
EOS_NAMES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|im_end|>", "<|eot_id|>", "<|end|>")


class SplitTooSmall(CalibrationError):
    """A split holds fewer windows than were asked for; `available` says how many it does hold."""

    def __init__(self, message: str, available: int, asked: int):
        super().__init__(message)
        self.available, self.asked = available, asked


@dataclass
class Draw:
    """Windows drawn from one split of a source, and how that split was made (in words, for reports)."""

    tokens: torch.Tensor  # [samples, seq_len] int64
    asked: int  # windows asked for; tokens.shape[0] is lower only when the caller allowed fewer
    rule: str


def split_rule(documents: int) -> str:
    """'documents' (hash-chosen whole documents are held out) or 'tail' (the last tokens are): a function of
    the source alone, so the calibration and held-out draws of one source always agree."""
    return "documents" if documents >= MIN_DOCUMENT_SPLIT else "tail"


def describe_rule(name: str, rule: str, documents: int) -> str:
    """What a source holds out, in words (the conversion summary and `prism eval` print it)."""
    if rule == "documents":
        return f"{name}: {HELDOUT_PER_MILLE / 10:g}% of its {documents:,} documents, chosen by a hash of their text"
    return (f"{name}: the last {HELDOUT_PER_MILLE / 10:g}% of its token stream (it has {documents:,} "
            f"document{'s' if documents != 1 else ''}, fewer than {MIN_DOCUMENT_SPLIT})")


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
    return draw_samples(source, tokenizer, samples, seq_len, seed, split, eos_id).tokens


def draw_samples(source: CalibrationSource, tokenizer, samples: int, seq_len: int, seed: int = 0,
                 split: str = "calibration", eos_id: int | None = None, fewer_ok: bool = False) -> Draw:
    """token_samples, with the rule that made the split. With `fewer_ok`, a split that holds fewer windows
    than asked (but at least one) gives all it holds instead of an error: an evaluation can shrink to the
    held-out text there is, where failing would throw away the work before it."""
    if split not in SPLITS:
        raise CalibrationError(f"split {split!r} is not one of {', '.join(SPLITS)}")
    if samples < 1 or seq_len < 1:
        raise CalibrationError(f"samples ({samples}) and seq_len ({seq_len}) must be at least 1")
    eos_id = eos_token_id(tokenizer) if eos_id is None else eos_id
    n, first = samples, None
    while n > 0:
        try:
            tokens, rule = _draw(source, tokenizer, n, seq_len, seed, split, eos_id)
            return Draw(tokens, samples, rule)
        except SplitTooSmall as e:
            if not fewer_ok:
                raise
            first = first or e
            # scaled by what the short source (a mix: the short part, of its share) holds of what it was asked
            n = min(n - 1, n * e.available // e.asked)
    raise SplitTooSmall(str(first), 0, samples)


def _draw(source, tokenizer, samples, seq_len, seed, split, eos_id) -> tuple[torch.Tensor, str]:
    if not isinstance(source, MixSource):
        return _windows(source, tokenizer, samples, seq_len, seed, split, eos_id)
    counts = apportion(samples, [weight for _, weight in source.parts])
    drawn = [
        _windows(part, tokenizer, n, seq_len, seed, split, eos_id, share_of=source.name)
        for (part, _), n in zip(source.parts, counts)
        if n
    ]
    mixed = torch.cat([windows for windows, _ in drawn])
    order = torch.randperm(len(mixed), generator=torch.Generator().manual_seed(seed))
    return mixed[order], "; ".join(rule for _, rule in drawn)


def apportion(total: int, weights: list[float]) -> list[int]:
    """Integer shares of `total` proportional to `weights` (largest remainder; ties to the first)."""
    scale = total / sum(weights)
    exact = [w * scale for w in weights]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: (counts[i] - exact[i], i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def source_documents(source: CalibrationSource) -> list[str]:
    """The non-blank documents of a source, in its order; an empty source is an error."""
    docs = [d for d in source.documents() if d.strip()]
    if not docs:
        raise CalibrationError(f"{source.name}: the dataset is empty (no non-blank documents)")
    return docs


def split_documents(source: CalibrationSource, split: str) -> list[str]:
    """The non-blank documents of one split by the document rule; an empty split is not an error."""
    return [d for d in source_documents(source) if document_split(d) == split]


def tail_cut(tokens: int) -> int:
    """Where the tail rule's held-out part of a token stream of this length starts."""
    return tokens - tokens * HELDOUT_PER_MILLE // 1000


def _windows(source, tokenizer, samples, seq_len, seed, split, eos_id, share_of: str | None = None):
    docs = source_documents(source)
    rule = split_rule(len(docs))
    generator = torch.Generator().manual_seed(seed)
    if rule == "documents":
        mine = [d for d in docs if document_split(d) == split]
        order = torch.randperm(len(mine), generator=generator).tolist()
        stream = token_stream(tokenizer, (mine[i] for i in order), eos_id, POOL_FACTOR * samples * seq_len)
        where = f"{len(mine)} documents"
    else:
        whole = token_stream(tokenizer, docs, eos_id)
        cut = tail_cut(len(whole))
        stream = whole[:cut] if split == "calibration" else whole[cut:]
        share = 1000 - HELDOUT_PER_MILLE if split == "calibration" else HELDOUT_PER_MILLE
        where = (f"the {'first' if split == 'calibration' else 'last'} {share / 10:g}% of the token stream of "
                 f"its {len(docs)} document{'s' if len(docs) != 1 else ''}")
    held = len(stream) // seq_len
    if held < samples:
        share = f" (its share of {share_of})" if share_of else ""
        raise SplitTooSmall(
            f"{source.name}: the {split} split holds {held} samples of {seq_len} tokens "
            f"({len(stream):,} tokens in {where}), but {samples} were asked for{share}", held, samples,
        )
    windows = stream[: held * seq_len].view(held, seq_len)
    return windows[torch.randperm(held, generator=generator)[:samples]], describe_rule(source.name, rule, len(docs))
