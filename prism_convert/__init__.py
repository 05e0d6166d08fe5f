"""prism_convert: the offline toolchain (profile -> compress -> pack) and the `prism` command line.

The public API, one function per command, with the command's name and keyword options mirroring its flags:

    import prism_convert
    prism_convert.profile("org/model", out="prof")                       # prism profile
    prism_convert.compress("org/model", profile="prof", out="work", bits=3.25)   # prism compress
    prism_convert.pack(["work"], out="model.prism")                      # prism pack
    prism_convert.convert("org/model", out="model.prism", bits=3.25)     # prism convert
    prism_convert.evaluate("model.prism", reference="org/model")         # prism eval

`model` is a checkpoint folder or a Hugging Face Hub repo id (`org/name`, downloaded or found in the cache, as
prism_load.load accepts). Each returns its result as data and prints nothing; `progress(description, done,
total)` (prism_convert/progress.py) reports long stages. Heavy modules are imported inside the functions, so
importing the package (and `prism --help`) stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from prism_convert.progress import Progress
from prism_load import __version__  # noqa: F401

if TYPE_CHECKING:  # imported for annotations only: the record's module pulls in torch
    from prism_convert.allocation.bit_plan import BitPlan

__all__ = ["Progress", "compress", "convert", "evaluate", "pack", "profile"]


def _checkpoint(model: str | Path, revision: str | None = None, token: str | None = None) -> Path:
    """A checkpoint folder: `model` itself, or the snapshot of a Hub repo id (config, weights, tokenizer)."""
    from prism_load.hub import is_repo_id

    if not is_repo_id(model):
        if revision is not None or token is not None:
            raise TypeError(f"{model}: revision and token apply to Hub repo ids, not to local folders")
        return Path(model)
    from prism_load.hub import resolve

    return resolve(str(model), revision=revision, token=token).folder


def _budget(bits: float | None, size: str | int | None, price: str = "runtime"):
    from prism_convert.allocation.bit_plan import Budget
    from prism_convert.tools.fit import parse_bytes

    return Budget(bits=bits, size_bytes=parse_bytes(size) if size is not None else None, price=price)


def profile(model: str | Path, *, out: str | Path, dataset: str = "builtin:mix", samples: int = 128,
            seq_len: int = 256, seed: int = 0, min_tokens: int = 16, tokenizer: str | None = None,
            progress: Progress | None = None, revision: str | None = None, token: str | None = None) -> dict:
    """`prism profile`: run calibration tokens through the model layer by layer; writes the profile folder `out`
    and returns profile.json's content (plus the run's speed, peak RSS and the heatmap's path)."""
    from prism_convert.profiling.profiler import profile_model

    return profile_model(_checkpoint(model, revision, token), dataset, samples, seq_len, seed, Path(out), min_tokens,
                         progress, tokenizer=tokenizer)


def compress(model: str | Path, *, profile: str | Path, out: str | Path, bits: float | None = None,
             size: str | int | None = None, recipe: str | None = None, layers: str | None = None, workers: int = 1,
             progress: Progress | None = None, revision: str | None = None, token: str | None = None,
             price: str = "runtime") -> dict:
    """`prism compress`: measure candidate encodings of the layer range into the work folder `out` (resumable) and,
    once the model is complete there, allocate the budget (`bits` per routed-expert weight, or `size`: total
    bytes, e.g. "12GB"; `price`: "runtime" counts what prism_load's packed form holds in RAM, "stored" the
    container's bytes; prism_convert/allocation/bit_plan.py). Returns {"plan" (the BitPlan, None while layers are missing), "layers", "num_layers",
    "work"}."""
    from prism_convert import pipeline

    return pipeline.compress_model(_checkpoint(model, revision, token), Path(profile), _budget(bits, size, price), recipe,
                                   Path(out), layers, workers, progress)


def pack(work: str | Path | list[str | Path], *, out: str | Path, bits: float | None = None,
         size: str | int | None = None, shard_size: str | int = "2GB", price: str | None = None) -> BitPlan:
    """`prism pack`: allocate over the finished work folder(s) (the budget they record, unless `bits`/`size` is
    given; `price`, where given, replaces the recorded price, else "runtime" for a new budget) and write the .prism container `out`. Returns the bit plan (prism_convert.allocation.bit_plan.BitPlan,
    a typed record; its to_json() is plan.json's content, BitPlan.read(path) reads plan.json back)."""
    from prism_convert import pipeline
    from prism_convert.tools.fit import parse_bytes

    works = [Path(w) for w in ([work] if isinstance(work, (str, Path)) else work)]
    budget = _budget(bits, size, price or "runtime") if (bits is not None or size is not None) else None
    return pipeline.pack_work(works, Path(out), budget, parse_bytes(shard_size, "shard size"), price=price)


def convert(model: str | Path, *, out: str | Path, bits: float | None = None, size: str | int | None = None,
            dataset: str = "builtin:mix", recipe: str | None = None, samples: int = 128, seq_len: int = 256,
            eval_samples: int = 16, work: str | Path | None = None, workers: int = 1, tokenizer: str | None = None,
            progress: Progress | None = None, revision: str | None = None, token: str | None = None,
            price: str = "runtime") -> dict:
    """`prism convert`: profile -> compress -> pack (`price` as for compress), every input checked before any compute; intermediate work
    in `work` (default: hidden beside `out`; a rerun resumes). Returns {"plan" (a BitPlan), "quality" (held-out KL and
    perplexities, None with eval_samples=0), "out", "work"}."""
    from prism_convert import pipeline

    return pipeline.convert(_checkpoint(model, revision, token), Path(out), _budget(bits, size, price), dataset, recipe,
                            samples, seq_len, work=Path(work) if work is not None else None,
                            eval_samples=eval_samples, workers=workers, progress=progress, tokenizer=tokenizer)


def evaluate(packed: str | Path, *, reference: str | Path, dataset: str = "builtin:mix", samples: int = 32,
             seq_len: int = 256, seed: int = 0, tokenizer: str | None = None, tokens=None, batch_size: int = 8,
             **load_options) -> dict:
    """`prism eval`: perplexity of both models and KL(original || packed) on held-out text (never the calibration
    split). Both may be folders or Hub repo ids (prism_load.load opens them). `tokens` [N, L]: score these instead
    of drawing text; `load_options` go to prism_load.load for the packed model (e.g. expert_cache="50%")."""
    from prism_convert.tools.evaluate import evaluate as run_eval

    return run_eval(packed, reference, dataset, samples, seq_len, seed, tokens=tokens, batch_size=batch_size,
                    tokenizer=tokenizer, **load_options)
