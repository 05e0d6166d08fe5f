"""The next token from a decode step's logits: greedy, or sampled with temperature, top-k and top-p (nucleus).

Why not torch's ops as transformers uses them (mask the vocabulary, softmax, torch.multinomial): on a CPU they
cost milliseconds a token at today's vocabularies, most of it torch.multinomial drawing one random number per
vocabulary entry; greedy's argmax alone took 0.23 ms at 152 K entries, where numpy's takes 0.01
(bench/bench_sampling.py measures both, vocabulary by vocabulary). Here a CPU row costs one uniform draw from
the generator and numpy work over the vocabulary: top-k candidates by partition (not a sort), the nucleus from
the largest 1,024 where they hold it (else 8,192, 65,536, then a full sort), and the draw by inverse CDF over
float64 partial sums.

The distribution is the one transformers' warpers define, in their order: logits / temperature, keep the
top_k largest (and every logit equal to the k-th), then the smallest set of most likely tokens whose
probability reaches top_p (a token is kept while the mass before it is below top_p), renormalised. The random
stream differs from torch.multinomial's, so a seed gives other (equally distributed) tokens than before this
module; a seed still gives the same tokens every time. Tensors off the CPU, and a vocabulary under 2,048 entries
(where torch's batched ops draw a batch faster than a loop over its rows), take torch's ops as transformers does.

With the native kernels (prism_load/native/sample.c), greedy rows and top-k rows (with or without top-p) take one
C call each instead: the same distribution (its probabilities differ from this module's by rounding, so a draw can
differ only where it falls within that rounding of a boundary between two tokens; tested). Why: between two
decode steps every numpy and torch call runs cold, the layers having just streamed their weights through the
caches, so the dozen calls of the numpy path cost several times their warm price (bench_sampling.py times them
warm; bench/results/runtime_glue_* the decode token before and after this path with the rest of its change).
`next_tokens` is that path for the decode loop (generation.py): the draws come from `Draws` (a block of them from
the generator at a time) and the tokens are Python ints, so a step makes no tensor to choose its token.
"""

from __future__ import annotations

import numpy as np
import torch

from .errors import GenerationError

NUCLEUS_CANDIDATES = 1024  # top_p without top_k: the nucleus is looked for among this many first (then 8x more)
BLOCK = 1024  # inverse CDF over the whole vocabulary: float64 sums of blocks of this many, then within one
# below this many entries torch's batched ops draw a batch's rows faster than a loop over them (a test model's)
SMALL_VOCABULARY = 2048


def _nothing_to_sample() -> GenerationError:
    """The one error of every path for a row with no distribution (NaN, or all -inf)."""
    return GenerationError("sampling: the logits hold no finite value to sample from (NaN, or all -inf)")


class Draws:
    """Uniform draws in [0, 1) from a generator, `rows` a step, drawn `steps` steps at a time (the decode loop's
    64: one torch call per block instead of one per step). A seed gives the same draws every time."""

    def __init__(self, generator: torch.Generator | None, rows: int, steps: int = 1):
        self.generator, self.rows, self.steps, self._left = generator, rows, steps, []

    def take(self) -> list[float]:
        if not self._left:
            block = torch.rand(self.steps * self.rows, dtype=torch.float64, generator=self.generator).tolist()
            self._left = [block[i : i + self.rows] for i in range(len(block) - self.rows, -1, -self.rows)]
        return self._left.pop()


def next_tokens(logits: torch.Tensor, do_sample: bool, temperature: float, top_k: int | None,
                top_p: float | None, draws: Draws | None) -> list[int] | None:
    """The next token of every row of CPU logits [B, V] by the native sampler, as ints; None where it does not
    take them (no native kernels, a tensor off the CPU, or sampling without a top_k below the vocabulary: the
    caller takes sample_next). Greedy unless do_sample; draws: a sampling step's uniforms (one a row)."""
    vocab = logits.shape[-1]
    if logits.device.type != "cpu" or logits.dim() != 2 or (do_sample and not (top_k and top_k < vocab)):
        return None
    fn = _native()
    if fn is None:
        return None
    x = logits.detach()
    if x.dtype is not torch.float32 or not x.is_contiguous():
        x = x.to(torch.float32).contiguous()
    base, row = x.data_ptr(), 4 * vocab
    if not do_sample:
        return [fn.sample_argmax(base + i * row, vocab) for i in range(x.shape[0])]
    temperature = max(float(temperature), 1e-5)
    top_p = float(top_p) if top_p is not None and top_p < 1.0 else 0.0
    out = []
    for i, u in enumerate(draws.take()):
        token = fn.sample_top_k(base + i * row, vocab, top_k, temperature, top_p, u)
        if token < 0:
            if token == -1:
                raise _nothing_to_sample()
            raise RuntimeError(f"sample.c: prism_sample_top_k returned {token}")
        out.append(token)
    return out


def _native():
    """The native kernels' entry points, or None without them (the numpy path runs)."""
    from .native.build import load

    return load()[0]


def sample_next(logits: torch.Tensor, do_sample: bool, temperature: float, top_k: int | None,
                top_p: float | None, generator: torch.Generator | None) -> torch.Tensor:
    """logits [B, V] -> next token ids [B] (int64, on the logits' device). Greedy unless do_sample."""
    if logits.device.type == "cpu" and logits.dim() == 2:
        tokens = next_tokens(logits, do_sample, temperature, top_k, top_p,
                             Draws(generator, logits.shape[0]) if do_sample else None)
        if tokens is not None:
            return torch.tensor(tokens, dtype=torch.int64)
    return sample_without_native(logits, do_sample, temperature, top_k, top_p, generator)


def sample_without_native(logits: torch.Tensor, do_sample: bool, temperature: float, top_k: int | None,
                          top_p: float | None, generator: torch.Generator | None) -> torch.Tensor:
    """sample_next where next_tokens did not take the logits: torch's ops off the CPU or for a small vocabulary
    (a test model's), else the numpy path."""
    if logits.device.type != "cpu" or (do_sample and logits.shape[-1] < SMALL_VOCABULARY):
        return _torch_sample(logits, do_sample, temperature, top_k, top_p, generator)
    x = logits.detach()
    if x.dtype is not torch.float32:
        x = x.float()
    rows = x.numpy()
    if not do_sample:
        return torch.from_numpy(rows.argmax(axis=-1).astype(np.int64))
    u = torch.rand(rows.shape[0], dtype=torch.float64, generator=generator).tolist()  # one draw a row
    top_p = None if top_p is None or top_p >= 1.0 else float(top_p)
    out = [_sample_row(row, max(float(temperature), 1e-5), top_k, top_p, draw) for row, draw in zip(rows, u)]
    return torch.tensor(out, dtype=torch.int64)


def _sample_row(a: np.ndarray, temperature: float, top_k: int | None, top_p: float | None, u: float) -> int:
    """One row: a float32 [V] logits, u a uniform draw in [0, 1)."""
    ids, p = distribution(a, temperature, top_k, top_p)
    i = _inverse_cdf(p, u)
    return int(ids[i]) if ids is not None else i


def distribution(a: np.ndarray, temperature: float, top_k: int | None = None,
                 top_p: float | None = None) -> tuple[np.ndarray | None, np.ndarray]:
    """The tokens a row may draw and their probabilities (up to a common factor): (ids, p), or (None, p) for p
    over the whole vocabulary. a: float32 [V] logits; temperature > 0; top_p None or below 1."""
    vocab = a.shape[0]
    if top_k and top_k < vocab:
        if np.isnan(a.max()):  # argpartition would put NaN last and drop it: say so, as the other paths do
            raise _nothing_to_sample()
        kth = a[a.argpartition(vocab - top_k)[vocab - top_k]]
        ids = np.flatnonzero(a >= kth)  # the k largest and every logit equal to the k-th (transformers' rule)
        p = _candidate_probabilities(a[ids], temperature)
        if top_p is None:
            return ids, p
        kept = _nucleus(p, top_p)
        return ids[kept], p[kept]
    p = _probabilities(a, temperature)
    if top_p is None:
        return None, p
    count = NUCLEUS_CANDIDATES
    while count < vocab:
        ids = np.sort(a.argpartition(vocab - count)[vocab - count:])  # in token order: ties ranked as in the sort
        q = p[ids].astype(np.float64)
        # a token outside, and a candidate tied with the smallest, has every larger candidate's mass before it:
        # where that reaches top_p, the nucleus is among the larger candidates, whatever order ties take
        smallest = q.min()
        if q[q > smallest].sum() >= top_p:
            kept = _nucleus(q, top_p)
            return ids[kept], q[kept]
        count *= 8
    p = p.astype(np.float64)
    kept = _nucleus(p, top_p)
    return kept, p[kept]


def _nucleus(p: np.ndarray, top_p: float) -> np.ndarray:
    """The indices of p (probabilities of some tokens in token order, of the whole vocabulary's mass) that the
    nucleus keeps, as transformers' TopPLogitsWarper does: in ascending order of probability (equals in token
    order: a stable sort), a token is dropped while the mass up to it is at most 1 - top_p, the most likely kept
    always; so, most likely first, a token is kept while the mass before it is below top_p."""
    n = p.shape[0]
    # descending, equals in reverse token order: the ascending stable sort read backwards
    order = n - 1 - torch.sort(torch.from_numpy(p[::-1].copy()), descending=True, stable=True).indices.numpy()
    q = p[order]
    kept = order[np.cumsum(q) - q < top_p]
    return kept if len(kept) else order[:1]


def _probabilities(logits: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(logits / temperature) over a whole vocabulary, float32 (torch's softmax: vectorised, threaded)."""
    p = torch.from_numpy(logits).div(temperature).softmax(-1).numpy()
    total = p.sum(dtype=np.float64)
    if not (total > 0 and np.isfinite(total)):
        raise _nothing_to_sample()
    return p


def _candidate_probabilities(logits: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(logits / temperature) over a few candidates, float64 (-inf logits: probability 0)."""
    scaled = logits.astype(np.float64) / temperature
    top = scaled.max()
    if not np.isfinite(top):  # NaN, all -inf, or +inf: no distribution
        raise _nothing_to_sample()
    p = np.exp(scaled - top)
    return p / p.sum()


def _inverse_cdf(p: np.ndarray, u: float) -> int:
    """The index i with sum(p[:i]) <= u * sum(p) < sum(p[:i + 1]), p >= 0 (not normalised), in float64 sums:
    over a long p, block totals first, then the running sum inside the one block the draw falls in."""
    n = p.shape[0]
    if n <= BLOCK:
        running = np.cumsum(p, dtype=np.float64)
        index = min(int(running.searchsorted(u * running[-1], side="right")), n - 1)
    else:
        starts = np.arange(0, n, BLOCK)
        totals = np.cumsum(np.add.reduceat(p, starts, dtype=np.float64))
        target = u * totals[-1]
        b = min(int(totals.searchsorted(target, side="right")), len(starts) - 1)
        base = totals[b - 1] if b else 0.0
        inner = np.cumsum(p[starts[b] : starts[b] + BLOCK], dtype=np.float64)
        index = starts[b] + min(int(inner.searchsorted(target - base, side="right")), len(inner) - 1)
    if p[index] > 0:
        return int(index)
    # rounding put the draw on a token of probability 0 (past the last one with any): the nearest before it
    nonzero = np.flatnonzero(p[: index + 1] > 0)
    return int(nonzero[-1]) if len(nonzero) else int(np.flatnonzero(p > 0)[0])


def _torch_sample(logits: torch.Tensor, do_sample: bool, temperature: float, top_k: int | None,
                  top_p: float | None, generator: torch.Generator | None) -> torch.Tensor:
    """transformers' way, in torch ops on the logits' device (a GPU's, or a small vocabulary's batch)."""
    if not do_sample:
        return logits.argmax(dim=-1)
    probs = torch_probabilities(logits, temperature, top_k, top_p)
    if not bool(torch.isfinite(probs).all()):
        raise _nothing_to_sample()
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def torch_probabilities(logits: torch.Tensor, temperature: float, top_k: int | None,
                        top_p: float | None) -> torch.Tensor:
    """[B, V] probabilities as transformers' Temperature, TopK and TopP warpers leave them (their code's steps)."""
    x = logits.float() / max(temperature, 1e-5)
    if top_k:
        kth = torch.topk(x, min(top_k, x.shape[-1])).values[:, -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        ascending, order = torch.sort(x, descending=False, stable=True)
        cumulative = ascending.softmax(-1).cumsum(-1)
        drop = cumulative <= 1 - top_p
        drop[:, -1] = False  # the most likely token stays
        x = x.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return x.softmax(-1)
