"""Training data of the reference MoE: built-in prose and code, split by calibration's document hash (the
reference never trains on a document that calibration's `heldout` split returns), tokenised once.

Batches draw each row's domain with fixed weights and a random window of that domain's token stream, all
from one seeded generator, so the data order is a function of the seed alone.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass

import torch

import calibration
from calibration import builtin
from prism_reference.bpe_tokenizer import END_OF_TEXT, train_bpe_tokenizer

DOMAINS = ("prose", "code")


@dataclass
class Corpus:
    tokenizer: object  # tokenizers.Tokenizer
    eos_id: int
    train: dict[str, torch.Tensor]  # domain -> token stream [n]
    heldout: dict[str, torch.Tensor]


def data_fingerprint() -> str:
    """Short digest of the built-in text (prose content, code file names and sizes, Python version): the
    reference cache is keyed by it, since another interpreter ships other documentation and sources."""
    h = hashlib.blake2b(digest_size=6)
    h.update(sys.version.split()[0].encode())
    for doc in builtin.prose_documents():
        h.update(doc.encode("utf-8", "surrogatepass"))
    root = builtin.stdlib_dir()
    for path in builtin.code_files():
        h.update(f"{path.relative_to(root).as_posix()}:{path.stat().st_size};".encode())
    return h.hexdigest()


def _shuffled(docs: list[str], generator: torch.Generator) -> list[str]:
    return [docs[i] for i in torch.randperm(len(docs), generator=generator).tolist()]


def _take_bytes(docs: list[str], limit: int | None) -> list[str]:
    """A prefix of `docs` holding about `limit` characters (all of them when limit is None)."""
    if limit is None:
        return docs
    out, total = [], 0
    for doc in docs:
        if total >= limit:
            break
        out.append(doc)
        total += len(doc)
    return out


def build_corpus(seed: int, vocab_size: int, code_chars: int | None, tokenizer_code_chars: int,
                 heldout_tokens: int) -> Corpus:
    """Train the tokenizer on the training prose plus a slice of the training code, then tokenise.

    The tokenizer sees all the training prose but only `tokenizer_code_chars` of code, so ten times more
    code does not take over the merges. Held-out streams are cut at `heldout_tokens` (evaluation only).
    """
    generator = torch.Generator().manual_seed(seed)
    docs = {"prose": builtin.prose_documents(), "code": builtin.code_documents()}
    train = {d: _shuffled([t for t in docs[d] if calibration.document_split(t) == "calibration"], generator)
             for d in DOMAINS}
    heldout = {d: _shuffled([t for t in docs[d] if calibration.document_split(t) == "heldout"], generator)
               for d in DOMAINS}
    train["code"] = _take_bytes(train["code"], code_chars)
    tokenizer = train_bpe_tokenizer(train["prose"] + _take_bytes(train["code"], tokenizer_code_chars), vocab_size)
    eos_id = tokenizer.token_to_id(END_OF_TEXT)
    return Corpus(
        tokenizer=tokenizer,
        eos_id=eos_id,
        train={d: calibration.token_stream(tokenizer, train[d], eos_id) for d in DOMAINS},
        heldout={d: calibration.token_stream(tokenizer, heldout[d], eos_id, heldout_tokens, batch_size=4)
                 for d in DOMAINS},
    )


def sample_batch(streams: dict[str, torch.Tensor], weights: dict[str, float], batch_size: int, seq_len: int,
                 generator: torch.Generator) -> tuple[torch.Tensor, list[str]]:
    """`batch_size` windows of seq_len + 1 tokens [B, T+1] (inputs and shifted targets) and their domains."""
    names = list(weights)
    probs = torch.tensor([weights[n] for n in names], dtype=torch.float64)
    picks = torch.multinomial(probs, batch_size, replacement=True, generator=generator).tolist()
    rows, domains = [], []
    for p in picks:
        stream = streams[names[p]]
        start = int(torch.randint(0, len(stream) - seq_len, (1,), generator=generator))
        rows.append(stream[start : start + seq_len + 1])
        domains.append(names[p])
    return torch.stack(rows), domains


def eval_windows(stream: torch.Tensor, seq_len: int, count: int) -> torch.Tensor:
    """Up to `count` non-overlapping windows [n, T+1] spread evenly over the stream (fixed for evaluation)."""
    available = len(stream) // (seq_len + 1)
    n = min(count, available)
    if n == 0:
        return torch.zeros(0, seq_len + 1, dtype=torch.long)
    windows = stream[: available * (seq_len + 1)].view(available, seq_len + 1)
    return windows[torch.linspace(0, available - 1, n).round().long()]
