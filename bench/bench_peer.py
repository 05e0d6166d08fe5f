"""prism against llama.cpp on the same model, one run (issue 14, part 6).

One random Mixtral-layout checkpoint per shape (bench/peer_checkpoint.py: hidden 1024, 8 experts top-2, expert
width 2816 x `width`, a Llama-style tokenizer trained here), converted by llama.cpp's own
convert_hf_to_gguf.py (bf16) and quantised with llama_model_quantize to Q4_K_M and Q4_0, and by prism to
uniform int4/g128 experts (bench/recipes/uniform_int4_g128.toml) and to its own allocation at 4.25 bits per
expert weight (the family's recipe, recipes/mixtral.toml), priced at what the runtime holds (`--price runtime`,
the default) and, with --recipes own-stored, at the container's bytes (`--price stored`: its 3-, 5- and 6-bit
tensors are then widened at load; both share one work folder, so the second only allocates and packs). Each model then runs in its own fresh process
(bench/peer_measure.py): load, prefill 64 tokens, greedy decode, the same token ids for every runtime, the
same thread count; peak RSS (VmHWM) per process. prism runs as `prism_load.load(path)` with its defaults.

llama.cpp's converter and its gguf-py come from llama-cpp-python's source package (they are not in the
wheel): --llama-src names the sdist (.tar.gz) or its unpacked folder, else PRISM_LLAMA_SRC, else the bench
downloads the sdist of the installed version with pip into WORK/llama-src. Made files are cached under WORK
by shape, so a rerun (after a runtime change) only measures: `python bench/bench_peer.py --skip-convert`.

Writes bench/results/peer.json and bench/results/peer.md. Needs the peer extra (pyproject.toml); without
llama-cpp-python it says how to install it and exits 0 with nothing written.

    python bench/bench_peer.py [--widths 1,2] [--layers 8,4] [--tokens 64] [--threads 2] [--skip-convert]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's prism, in this process and (PYTHONPATH) in the measured ones

from common import RESULTS, cpu_features, machine, write_report  # noqa: E402
from peer_checkpoint import Shape, make_checkpoint  # noqa: E402

HERE = Path(__file__).resolve().parent
UNIFORM_RECIPE = HERE / "recipes" / "uniform_int4_g128.toml"
DENSE4_RECIPE = HERE / "recipes" / "uniform_int4_g128_dense4.toml"
HEAD8_RECIPE = HERE / "recipes" / "uniform_int4_g128_head8.toml"
BITS = 4.25
GGUF_TYPES = {name: f"LLAMA_FTYPE_MOSTLY_{name}" for name in ("Q4_K_M", "Q4_0", "Q5_K_M", "Q6_K", "Q8_0")}
DEFAULT_GGUF_TYPES = ("Q4_K_M", "Q4_0")
BASELINE = "llama.cpp Q4_K_M"
INSTALL_HINT = ('llama-cpp-python is not installed, so there is nothing to compare against. Install the peer '
                'extra (builds llama.cpp from source, 3-5 minutes on 2 cores; a GGML_NATIVE=ON build crashed '
                'in its first eval on one machine; name the instruction sets the CPU has, e.g. add '
                '-DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AVX_VNNI=ON on an AVX-512 CPU; '
                'see README "prism against llama.cpp"):\n'
                '    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DLLAVA_BUILD=OFF" '
                'pip install -e ".[peer]"')
DEFAULT_WORK = Path(os.environ.get("PRISM_CACHE", Path.home() / ".cache" / "prism")) / "peer"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- llama.cpp's converter ------------------------------------------------------------------------------------
def llama_source(spec: str | None, work: Path) -> Path:
    """vendor/llama.cpp of llama-cpp-python's sdist: given (folder or .tar.gz), or downloaded for the installed
    version. The converter must match the library that loads its output."""
    import llama_cpp

    spec = spec or os.environ.get("PRISM_LLAMA_SRC")
    if spec is None:
        folder = work / "llama-src"
        tarball = folder / f"llama_cpp_python-{llama_cpp.__version__}.tar.gz"
        if not tarball.is_file():
            log(f"downloading llama-cpp-python {llama_cpp.__version__}'s source package into {folder}")
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                            f"llama-cpp-python=={llama_cpp.__version__}", "-d", str(folder)], check=True)
        spec = str(tarball)
    path = Path(spec)
    if path.is_file():
        unpacked = work / "llama-src" / path.name.removesuffix(".tar.gz")
        if not (unpacked / "vendor").is_dir():
            log(f"unpacking {path} -> {unpacked.parent}")
            with tarfile.open(path) as tar:
                tar.extractall(unpacked.parent, filter="data")
        path = unpacked
    for candidate in (path / "vendor" / "llama.cpp", path):
        if (candidate / "convert_hf_to_gguf.py").is_file():
            return candidate
    raise SystemExit(f"{spec}: no convert_hf_to_gguf.py in it (expected llama-cpp-python's sdist or its folder)")


# -- making the models ----------------------------------------------------------------------------------------
class Conversions:
    """Seconds each made file took, kept beside the files so a --skip-convert rerun still reports them."""

    def __init__(self, work: Path):
        self.path = work / "conversions.json"
        self.data = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def make(self, out: Path, what: str, fn, skip: bool) -> dict:
        """fn(tmp) writes the file or folder at tmp, renamed to `out` once complete (an interrupted make
        leaves no `out` behind)."""
        if not made(out):
            if skip:
                raise SystemExit(f"--skip-convert: {out} is missing; run once without it")
            log(f"{what} -> {out}")
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_name(f".{out.name}.partial")
            if tmp.is_dir():
                shutil.rmtree(tmp)
            tmp.unlink(missing_ok=True)
            start = time.perf_counter()
            fn(tmp)
            os.replace(tmp, out)
            self.data[out.name] = {"what": what, "seconds": time.perf_counter() - start,
                                   "date": time.strftime("%Y-%m-%d %H:%M")}
            self.path.write_text(json.dumps(self.data, indent=1))
        return self.data.get(out.name, {"what": what, "seconds": None}) | {"path": str(out)}


def made(out: Path) -> bool:
    """A file, or a folder its maker completed (a container's manifest, a checkpoint's done.json)."""
    return out.is_file() or (out / "manifest.json").is_file() or (out / "done.json").is_file()


def run_logged(cmd: list[str], logfile: Path, out: Path) -> None:
    """cmd + [out], its output to logfile."""
    logfile.parent.mkdir(parents=True, exist_ok=True)
    with open(logfile, "w") as f:
        done = subprocess.run([*cmd, str(out)], stdout=f, stderr=subprocess.STDOUT)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd[:3])} ... failed (exit {done.returncode}); see {logfile}")


QUANTIZE = """
import ctypes, sys, llama_cpp
params = llama_cpp.llama_model_quantize_default_params()
params.ftype, params.nthread = getattr(llama_cpp, sys.argv[1]), int(sys.argv[2])
sys.exit(llama_cpp.llama_model_quantize(sys.argv[3].encode(), sys.argv[4].encode(), ctypes.byref(params)))
"""


def make_gguf(ckpt: Path, llama_dir: Path, work: Path, threads: int, conv: Conversions, skip: bool,
              types: tuple[str, ...] = DEFAULT_GGUF_TYPES) -> dict:
    """bf16 GGUF by llama.cpp's converter, then each quantised type by llama_model_quantize (a subprocess each:
    both print to the C stdout; the logs go to WORK/logs)."""
    folder, logs = work / "gguf", work / "logs"
    bf16 = folder / f"{ckpt.name}-bf16.gguf"
    convert = [sys.executable, str(llama_dir / "convert_hf_to_gguf.py"), str(ckpt), "--outtype", "bf16", "--outfile"]
    out = {"bf16": conv.make(bf16, "convert_hf_to_gguf.py --outtype bf16",
                             functools.partial(run_logged, convert, logs / f"{bf16.name}.log"), skip)}
    for name in types:
        ftype = GGUF_TYPES[name]
        path = folder / f"{ckpt.name}-{name}.gguf"
        quantize = [sys.executable, "-c", QUANTIZE, ftype, str(threads), str(bf16)]
        out[name] = conv.make(path, f"llama_model_quantize {name}",
                              functools.partial(run_logged, quantize, logs / f"{path.name}.log"), skip)
    return out


def prism_convert(ckpt: Path, recipe: str | None, price: str, samples: int, work: Path, tmp: Path) -> None:
    import prism_convert as api  # this function's name shadows the package

    api.convert(ckpt, out=tmp, bits=BITS, recipe=recipe, price=price, samples=samples, eval_samples=0, work=work)


RECIPES = {  # name: (label, recipe file or None for the family's, price, container tag)
    "uniform": ("uniform int4/g128", str(UNIFORM_RECIPE), "runtime", "uniform_int4_g128"),
    "uniform-dense4": ("uniform int4/g128, attention int4, head int8", str(DENSE4_RECIPE), "runtime",
                       "uniform_int4_g128_dense4"),
    "uniform-head8": ("uniform int4/g128, head int8", str(HEAD8_RECIPE), "runtime", "uniform_int4_g128_head8"),
    "own": (f"own allocation, {BITS} bits", None, "runtime", f"prism_{BITS}"),
    "own-stored": (f"own allocation, {BITS} bits stored", None, "stored", f"prism_{BITS}_stored"),
}


def stale_recipe(record: Path, recipe: str | None, ckpt: Path) -> str | None:
    """The recipe sections (comma-separated) in which the recipe a made file records (a container's
    manifest.json, a work folder's compress/job.json) differs from the recipe it would be made with now (a
    file, or the checkpoint family's); None where the file is absent or the recipes agree. Why: made
    containers and work folders are reused across runs, and a changed family recipe would otherwise be
    measured stale (or refused by the work folder's resume check)."""
    if not record.is_file():
        return None
    from prism_convert.recipe import load_recipe

    model_type = json.loads((ckpt / "config.json").read_text()).get("model_type")
    now = load_recipe(recipe, model_type).to_dict()
    then = json.loads(record.read_text()).get("recipe", {})
    changed = sorted(k for k in now.keys() | then.keys() if k != "description" and now.get(k) != then.get(k))
    return ", ".join(changed) or None


def make_prism(ckpt: Path, work: Path, samples: int, conv: Conversions, skip: bool,
               recipes: tuple[str, ...] = ("uniform", "own")) -> dict:
    """prism convert at 4.25 bits per expert weight: uniform int4/g128, and prism's own allocation (the
    family's recipe). Calibration as `prism convert`'s defaults (builtin:mix, 256-token samples); no held-out
    quality pass (eval_samples=0), so the time is the conversion's alone."""
    out = {}
    for name, recipe, price, tag in (RECIPES[r] for r in recipes):
        path = work / "prism" / f"{ckpt.name}-{tag}.prism"
        what = (f"prism convert --bits {BITS} --price {price} "
                f"--recipe {Path(recipe).name if recipe else 'mixtral (default)'}")
        shared = work / "prism" / f".{ckpt.name}-{tag.removesuffix('_stored')}.prism.work"  # own-stored: own's
        changed = stale_recipe(path / "manifest.json", recipe, ckpt)
        if changed:
            if skip:
                raise SystemExit(f"--skip-convert: {path} was made with another recipe ({changed} differ); run "
                                 "once without --skip-convert to make it again")
            log(f"{path.name} was made with another recipe ({changed} differ): making it again")
            shutil.rmtree(path)
        if not skip and stale_recipe(shared / "compress" / "job.json", recipe, ckpt):
            shutil.rmtree(shared)  # compress work of another recipe (own-stored shares own's: kept when it is new)
        out[name] = conv.make(path, what, functools.partial(prism_convert, ckpt, recipe, price, samples, shared), skip)
    return out


# -- measuring ------------------------------------------------------------------------------------------------
def prompt_ids(ckpt: Path, n: int) -> list[int]:
    """The first n tokens of the first held-out prose document long enough (the same ids for every runtime)."""
    from tokenizers import Tokenizer

    import calibration
    from calibration import builtin

    tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    for doc in builtin.prose_documents():
        if calibration.document_split(doc) == "heldout":
            ids = tok.encode(doc, add_special_tokens=False).ids
            if len(ids) >= n:
                return [1, *ids[: n - 1]]  # <s> first, as llama.cpp's tokenizer would add
    raise SystemExit(f"no held-out prose document has {n} tokens")


ROUND_KEYS = ("decode_tokens_per_second", "prefill_tokens_per_second", "peak_rss_bytes")


NO_FIGURES = ("killed", "refused")  # a measurement's outcomes that carry no figures (measure)


def stopped(result: dict) -> str | None:
    """"killed" (for memory, under --memory-cap), "refused" (prism refused a load that would not fit), or None."""
    return next((k for k in NO_FIGURES if k in result), None)


def measure(runtime: str, model: str, prompt: list[int], args, logits: Path, expert_kernel: str = "auto",
            flags: tuple[str, ...] = ()) -> dict:
    """One peer_measure.py process's JSON; under --memory-cap a process the kernel killed for memory gives
    {"killed": "memory"} instead of failing the run (and a prism load refused as too large for the memory left
    gives {"refused": its message}, from peer_measure itself)."""
    import memory_cap

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS=str(args.threads))
    cmd = [sys.executable, str(HERE / "peer_measure.py"), runtime, model, "--prompt", ",".join(map(str, prompt)),
           "--tokens", str(args.tokens), "--threads", str(args.threads), "--repeats", str(args.repeats),
           "--logits", str(logits), "--expert-kernel", expert_kernel]
    cmd += list(flags)
    capped = bool(args.memory_cap) and runtime != "reference"
    cmd += ["--memory-cap", str(args.memory_cap << 20)] if capped else []
    cmd += ["--cold"] if args.cold and runtime != "reference" else []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) as proc:
        stdout, stderr = proc.communicate()
    for folder in memory_cap.folder_for(proc.pid):  # a killed process leaves its cgroup behind
        memory_cap.remove(folder)
    if proc.returncode == -signal.SIGKILL and capped:
        logits.unlink(missing_ok=True)
        return {"killed": "memory"}
    if proc.returncode:
        how = (f"killed by {signal.Signals(-proc.returncode).name}" if proc.returncode < 0
               else f"exit status {proc.returncode}")
        hint = ""
        if proc.returncode == -signal.SIGILL:
            hint = (" (an instruction this CPU lacks: rebuild llama-cpp-python with the CMAKE_ARGS its flags allow, "
                    "see the README)")
        elif proc.returncode == -signal.SIGSEGV and runtime == "llama" and "amx_int8" in cpu_features():
            hint = (" (on a CPU with AMX, llama-cpp-python 0.3.36's ggml AMX backend crashes in "
                    "ggml_backend_amx_mul_mat on this model: rebuild it with -DGGML_NATIVE=OFF and the AVX-512 flags, "
                    "AMX off, as the README says)")
        raise SystemExit(f"measuring {model} failed, {how}{hint}:\n{stderr[-3000:]}")
    return json.loads(stdout.strip().splitlines()[-1])


def cosine(a: Path, b: Path) -> float:
    import numpy as np

    x, y = np.load(a).astype(np.float64), np.load(b).astype(np.float64)
    return float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)))


def gguf_sizes(path: Path, llama_dir: Path) -> dict:
    """Bytes of the whole file and of the routed-expert tensors (GGUF's ffn_*_exps), by gguf-py's reader."""
    sys.path.insert(0, str(llama_dir / "gguf-py"))
    from gguf import GGUFReader

    tensors = GGUFReader(str(path)).tensors
    return {"file_bytes": path.stat().st_size,
            "expert_bytes": sum(int(t.n_bytes) for t in tensors if "_exps." in t.name)}


def prism_sizes(path: Path) -> dict:
    """Bytes of the container folder, and the plan's bytes per routed expert as the manifest records them."""
    manifest = json.loads((path / "manifest.json").read_text())
    files = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return {"file_bytes": files, "bits_per_expert_weight": manifest["budget"]["bits_per_expert_weight"]}


def bench_shape(shape: Shape, args, llama_dir: Path, conv: Conversions) -> dict:
    work = args.work
    ckpt = work / "checkpoints" / shape.key
    times = {"checkpoint": conv.make(ckpt, "random checkpoint + tokenizer",
                                     lambda tmp: make_checkpoint(shape, tmp, log), args.skip_convert)}
    ggufs = make_gguf(ckpt, llama_dir, work, args.threads, conv, args.skip_convert, args.gguf_types)
    prisms = make_prism(ckpt, work, args.samples, conv, args.skip_convert, tuple(args.recipes.split(",")))
    params = shape.parameters()
    prompt = prompt_ids(ckpt, args.prompt_tokens)
    logits = work / "logits" / ckpt.name
    logits.mkdir(parents=True, exist_ok=True)
    log(f"{ckpt.name}: reference logits (fp32 checkpoint)")
    measure("reference", str(ckpt), prompt, args, logits / "reference.npy")
    models = variants(args, ggufs, prisms)
    rows = []
    rounds: dict[str, list[dict]] = {}  # every model measured once per round, in turn: drift falls on all alike
    for r in range(args.rounds):
        for v in models:
            log(f"{ckpt.name}: {v.name} (round {r + 1} of {args.rounds})")
            rounds.setdefault(v.name, []).append(
                measure("llama" if v.runtime == "llama.cpp" else "prism", str(v.path), prompt, args,
                        logits / f"{v.tag}.npy", v.kernel, v.flags))
    for v in models:
        runtime, fmt, made, kernel, path, tag = v.runtime, v.fmt, v.made, v.kernel, v.path, v.tag
        runs = rounds[v.name]
        sizes = gguf_sizes(path, llama_dir) if runtime == "llama.cpp" else prism_sizes(path)
        stops = [x for x in runs if stopped(x)]
        if stops:  # killed over --memory-cap, or refused by prism at load, in some round: no figures
            rows.append({"runtime": runtime, "format": fmt, "name": v.name, "path": str(path), **sizes,
                         **{k: stops[0][k] for k in NO_FIGURES if k in stops[0]}, "rounds_stopped": len(stops),
                         "flags": v.flags, "expert_kernel": kernel})
            log(f"  {stopped(stops[0])}: " + stops[0].get("refused", "over the memory cap"))
            continue
        result = dict(runs[0], rounds=[{k: x[k] for k in ROUND_KEYS} | ({"cache": x["cache"]} if x.get("cache") else {})
                                       for x in runs],
                      **{k: statistics.median(x[k] for x in runs) for k in ROUND_KEYS})
        result.pop("cache", None)
        hits = [x["cache"]["hit_rate"] for x in runs if x.get("cache")]  # the expert cache's, measured forwards only
        if hits:
            result["cache_hit_rate"] = statistics.median(hits)
        if "expert_bytes" in sizes:
            sizes["bits_per_expert_weight"] = 8 * sizes["expert_bytes"] / params["experts"]
        rows.append({"runtime": runtime, "format": fmt, "name": f"{runtime} {fmt}", "path": str(path), **sizes,
                     "bits_per_weight": 8 * sizes["file_bytes"] / params["total"],
                     "conversion_seconds": made.get("seconds"), "conversion": made.get("what"),
                     "expert_kernel": kernel, "flags": v.flags,
                     "logits_cosine_vs_fp32": cosine(logits / f"{tag}.npy", logits / "reference.npy"),
                     **result})
        log(f"  decode {result['decode_tokens_per_second']:.1f} tok/s, prefill "
            f"{result['prefill_tokens_per_second']:.1f} tok/s, peak RSS {result['peak_rss_bytes'] / 2**20:,.0f} MiB"
            + (f", cache hit rate {min(hits):.0%}-{max(hits):.0%} across rounds" if hits else ""))
    baseline = baseline_name(args)
    base = next(r for r in rows if r["name"] == baseline)
    if stopped(base):
        raise SystemExit(f"{baseline} was {stopped(base)} under --memory-cap {args.memory_cap}: nothing to compare "
                         "with; raise the cap")
    for r in rows:  # the median over rounds of the ratio within each round (neighbours in time)
        if not stopped(r):
            r["vs_q4_k_m"] = {k: statistics.median(a[k] / b[k] for a, b in zip(r["rounds"], base["rounds"]))
                              for k in ROUND_KEYS}

    times["gguf_bf16"] = ggufs["bf16"]
    return {"shape": {**shape.__dict__, "intermediate": shape.intermediate, "parameters": params,
                      "checkpoint": str(ckpt)}, "prompt_tokens": len(prompt), "rows": rows,
            "conversion_seconds": times}


@dataclass(frozen=True)
class Variant:
    """One measured configuration: a made model, the runtime that runs it, and peer_measure.py's flags."""

    runtime: str  # "llama.cpp" or "prism"
    fmt: str  # the row's format column
    made: dict  # Conversions.make's record: path, seconds, what
    kernel: str = "auto"
    flags: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return f"{self.runtime} {self.fmt}"

    @property
    def path(self) -> Path:
        return Path(self.made["path"])

    @property
    def tag(self) -> str:
        """The logits file's name."""
        flags = "".join(f.strip("-").replace("%", "pct") for f in self.flags)
        return self.path.name + ("" if self.kernel == "auto" else f"-{self.kernel}") + (f"-{flags}" if flags else "")


# llama.cpp memory-mapped: its default, and without the repacked weight copies its CPU backend makes (in its own
# memory, beside the mapping: the default's peak RSS is the file plus the copies). lazy_mode ON (peer_measure
# --lazy) measured the same as no repack under a 200 MiB cap (bench/results/peer_cap200.md), so it is not a row.
LLAMA_MMAP_VARIANTS = {"mmap": ("--mmap",), "mmap, no repack": ("--mmap", "--no-repack")}


def variants(args, ggufs: dict, prisms: dict) -> list[Variant]:
    """Every configuration to measure, in order: llama.cpp's types, prism's recipes x kernels, then with --mmap
    each runtime memory-mapped, and with --cache each prism recipe behind an expert cache of each budget."""
    out = [Variant("llama.cpp", name, ggufs[name]) for name in args.gguf_types]
    out += [Variant("prism", n if kernel == "auto" else f"{n}, {kernel}", p, kernel)
            for n, p in prisms.items() for kernel in args.kernels.split(",")]
    if args.mmap:
        first = args.gguf_types[0]
        out += [Variant("llama.cpp", f"{first}, {what}", ggufs[first], flags=flags)
                for what, flags in LLAMA_MMAP_VARIANTS.items()]
        out += [Variant("prism", f"{n}, mmap", p, flags=("--mmap",)) for n, p in prisms.items()]
    for budget in args.cache:  # "120MiB" on demand (the CPU default), "+prefetch": prefetch=True, "+lru" or
        size, *extras = budget.split("+")  # "+frequency": another eviction order; "+always": every read checked;
        evictions = [e for e in extras if e in ("lru", "frequency")]  # "+python": misses by callbacks into Python;
        # "+kernel-readahead": the kernel's readahead left on the shards (each miss reads past its expert)
        if not set(extras) <= {"prefetch", "lru", "frequency", "always", "python", "kernel-readahead"} \
                or len(evictions) > 1:
            raise SystemExit(f"--cache {budget}: a budget, optionally followed by +prefetch, +always, +python, "
                             "+kernel-readahead and/or one of +lru, +frequency")
        flags = ("--expert-cache", size) + (("--prefetch",) if "prefetch" in extras else ()) + \
            (("--verify-always",) if "always" in extras else ()) + (("--python-misses",) if "python" in extras else ()) + \
            (("--kernel-readahead",) if "kernel-readahead" in extras else ()) + \
            tuple(f for e in evictions for f in ("--eviction", e))
        out += [Variant("prism", ", ".join([f"{n}, expert_cache {size}", *extras]), p, flags=flags)
                for n, p in prisms.items()]
    return out


def baseline_name(args) -> str:
    """Every ratio's denominator: llama.cpp Q4_K_M as loaded by default here (read into its memory); under a
    memory cap the llama.cpp configuration that runs there: memory-mapped without repacked copies (read in, or
    repacked, the model does not fit)."""
    return f"{BASELINE}, mmap, no repack" if getattr(args, "memory_cap", None) else BASELINE


# -- report ---------------------------------------------------------------------------------------------------
TARGETS = {"decode_tokens_per_second": (0.7, ">="), "prefill_tokens_per_second": (1.0, ">="),
           "peak_rss_bytes": (1.3, "<=")}


def targets(shapes: list[dict]) -> list[dict]:
    """The issue's targets for each prism row of the base shape (width 1): ratios to llama.cpp Q4_K_M."""
    out = []
    for s in shapes:
        if s["shape"]["width"] != 1:
            continue
        for r in s["rows"]:
            if r["runtime"] != "prism" or stopped(r):
                continue
            for key, (bound, op) in TARGETS.items():
                ratio = r["vs_q4_k_m"][key]
                out.append({"name": r["name"], "figure": key, "ratio": ratio, "target": f"{op} {bound}",
                            "met": ratio >= bound if op == ">=" else ratio <= bound})
    return out


def shape_title(s: dict) -> str:
    sh = s["shape"]
    return (f"expert width {sh['intermediate']} ({sh['width']}x), {sh['layers']} layers, hidden {sh['hidden']}, "
            f"{sh['experts']} experts top-{sh['top_k']}, {sh['heads']} heads / {sh['kv_heads']} kv, vocab "
            f"{sh['vocab']}: {sh['parameters']['total'] / 1e6:,.1f} M parameters "
            f"({sh['parameters']['experts'] / 1e6:,.1f} M in experts)")


COLUMNS = ["runtime", "format", "MiB", "bits/weight (file; experts)", "decode tok/s", "prefill tok/s",
           "peak RSS MiB (past imports)", "vs Q4_K_M: decode / prefill / RSS", "load s", "logits cos vs fp32",
           "conversion s"]


def cells(r: dict) -> list[str]:
    if stopped(r):
        what = "killed for memory" if "killed" in r else "refused at load: would not fit"
        return [r["runtime"], r["format"], f"{r['file_bytes'] / 2**20:,.1f}", "-",
                f"{what} ({r['rounds_stopped']} of the rounds)", *["-"] * (len(COLUMNS) - 5)]
    v = r["vs_q4_k_m"]
    conv = "-" if r["conversion_seconds"] is None else f"{r['conversion_seconds']:,.0f}"
    fmt = r["format"] + (f" (hit rate {r['cache_hit_rate']:.0%})" if "cache_hit_rate" in r else "")
    return [r["runtime"], fmt, f"{r['file_bytes'] / 2**20:,.1f}",
            f"{r['bits_per_weight']:.2f}; {r['bits_per_expert_weight']:.2f}", f"{r['decode_tokens_per_second']:.1f}",
            f"{r['prefill_tokens_per_second']:.1f}",
            f"{r['peak_rss_bytes'] / 2**20:,.0f} ({(r['peak_rss_bytes'] - r['rss_after_imports_bytes']) / 2**20:,.0f})",
            f"{v['decode_tokens_per_second']:.2f}x / {v['prefill_tokens_per_second']:.2f}x / "
            f"{v['peak_rss_bytes']:.2f}x", f"{r['load_seconds']:.1f}", f"{r['logits_cosine_vs_fp32']:.4f}", conv]


def markdown(result: dict) -> str:
    lines = [f"# prism vs llama.cpp ({result['threads']} threads, prefill {result['prompt_tokens']} tokens, decode "
             f"{result['tokens']} tokens greedy, median of {result['repeats']} repeats, one fresh process per model, "
             f"{result.get('rounds', 1)} round(s) in turn: medians, ratios the median of each round's)",
             "", f"llama-cpp-python {result['llama_cpp_version']}; prism at {result['prism_commit']}. Load average "
             f"before / after: {result['load_before']} / {result['load_after']}.", "", machine_line(result), ""]
    if result.get("memory_cap_mib"):
        lines += [f"Every measured process may charge {result['memory_cap_mib']:,} MiB past its imports, page cache "
                  "included (a memory cgroup joined after the imports, bench/memory_cap.py), its model's files "
                  f"dropped from the page cache before it starts; ratios are to {result['baseline']}.", ""]
    elif result.get("cold"):
        lines += ["Each model's files were dropped from the page cache before its process started: loads read the "
                  "disk.", ""]
    for s in result["shapes"]:
        lines += [f"## {shape_title(s)}", "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        lines += ["| " + " | ".join(cells(r)) + " |" for r in s["rows"]]
        capped = [r for r in s["rows"] if "cap_peak_bytes" in r]
        if capped:
            lines += ["", "Most memory charged at once under the cap (anonymous + page cache), MiB: "
                      + "; ".join(f"{r['name']} {r['cap_peak_bytes'] / 2**20:,.0f}" for r in capped) + "."]
        lines += ["", conversion_note(s["conversion_seconds"]), ""]
    if result["targets"]:
        lines += [f"Targets (width 1, ratio to {result.get('baseline', BASELINE)}):", "", "| prism | figure | ratio | target | met |",
                  "|---|---|---|---|---|"]
        lines += [f"| {t['name']} | {t['figure']} | {t['ratio']:.2f} | {t['target']} | {'yes' if t['met'] else 'NO'} |"
                  for t in result["targets"]]
    return "\n".join(lines) + "\n"


def q8_instructions() -> str | None:
    from prism_load import native

    return native.q8_instructions() if native.available() else None


def machine_line(result: dict) -> str:
    m = result.get("machine", {})
    q8 = result.get("q8_instructions")
    return (f"CPU: {m.get('cpu', '?')} ({', '.join(m.get('cpu_features', [])) or 'features not recorded'})"
            + (f"; prism's int8-activation kernel uses {q8}" if q8 else "") + ".")


def conversion_note(t: dict) -> str:
    def secs(x):
        return "(made before timing)" if x is None or x.get("seconds") is None else f"{x['seconds']:,.0f} s"

    return (f"Made here: the checkpoint {secs(t.get('checkpoint'))}, llama.cpp's bf16 GGUF {secs(t.get('gguf_bf16'))}; "
            "quantising and prism's conversions: the conversion column.")


def print_tables(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=True, width=max(Console(stderr=True).width, 160))
    for s in result["shapes"]:
        table = Table(title=shape_title(s), title_justify="left")
        for c in COLUMNS:
            table.add_column(c, justify="left" if c in ("runtime", "format") else "right")
        for r in s["rows"]:
            table.add_row(*cells(r))
        console.print(table)
    for t in result["targets"]:
        console.print(f"{t['name']}: {t['figure']} {t['ratio']:.2f}x Q4_K_M (target {t['target']}): "
                      f"{'[green]met' if t['met'] else '[red]missed'}[/]")


def per_width(values: str, widths: list[int], what: str) -> list[int]:
    xs = [int(x) for x in values.split(",")]
    if len(xs) == 1:
        return xs * len(widths)
    if len(xs) != len(widths):
        raise SystemExit(f"--{what}: one value or one per width ({len(widths)})")
    return xs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # 8x (an expert 22528 wide) is not in the default run: prism's conversion of it took about 17 GB (a
    # 22528 x 22528 Hessian per down projection) and more than an hour here; bench_kernels.py measures the
    # kernels on matrices of that shape instead
    ap.add_argument("--widths", default="1,2", help="expert widths as multiples of 2816 (e.g. 1,2,8)")
    ap.add_argument("--layers", default="8,4", help="decoder layers: one number, or one per width (default: the "
                    "same 554 M expert parameters at every width; 8x takes 1)")
    ap.add_argument("--tokens", type=int, default=64, help="greedy decode tokens per repeat")
    ap.add_argument("--prompt-tokens", type=int, default=64, help="prefill length")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=1, help="measure every model this many times, in turn; figures "
                    "are medians over rounds, ratios the median of each round's ratio (this machine drifts)")
    ap.add_argument("--samples", type=int, default=128, help="prism's calibration sequences (of 256 tokens)")
    ap.add_argument("--kernels", default="auto,native,native-int8",
                    help="prism's expert kernels to measure, comma-separated (load()'s expert_kernel: auto is "
                         "native-int16 where it takes a tensor, native the exact fp32 kernel, native-int8 "
                         "rounds activations to int8 per group as llama.cpp does)")
    ap.add_argument("--recipes", default="uniform,own", help="prism conversions to make and measure: uniform "
                    "(int4/g128), own (prism's allocation at 4.25 bits held by the runtime, about 5x longer to "
                    "convert), own-stored (the same at 4.25 bits stored) and/or uniform-dense4 (uniform with "
                    "attention int4 and the LM head int8, about Q4_K_M's dense precision) and/or uniform-head8 (uniform with "
                    "the LM head int8)")
    ap.add_argument("--mmap", action="store_true", help="also measure each runtime loading through a memory map: "
                    "llama.cpp Q4_K_M with use_mmap=True (its default; then also without its repacked weight copies), "
                    "every prism recipe with load(mmap=True)")
    ap.add_argument("--cold", action="store_true", help="drop each model's files from the page cache before its "
                    "process loads it (posix_fadvise DONTNEED), so the load reads the disk")
    ap.add_argument("--cache", default="", help="also measure every prism recipe with load(expert_cache=BUDGET), for "
                    "each comma-separated budget (e.g. 40%%; 40%%+prefetch: with prefetch=True; +lru: eviction by recency "
                    "alone; +frequency: GreedyDual with frequencies; +python: every miss by a callback into Python, "
                    "not served in the decode loop; +always: verify_checksums='always', every read "
                    "checked, reloads too)")
    ap.add_argument("--memory-cap", type=int, help="MiB each measured process may charge past its imports, page "
                    "cache included (a memory cgroup, bench/memory_cap.py; implies --cold; needs --mmap: ratios are "
                    "then to llama.cpp Q4_K_M memory-mapped without repacked copies): a machine with less RAM than the model")
    ap.add_argument("--skip-convert", action="store_true", help="measure only; every model must be made already")
    ap.add_argument("--work", type=Path, default=DEFAULT_WORK, help=f"made files, by shape (default {DEFAULT_WORK})")
    ap.add_argument("--llama-src", help="llama-cpp-python's sdist (.tar.gz or unpacked folder): its converter")
    ap.add_argument("--gguf-types", default=",".join(DEFAULT_GGUF_TYPES),
                    help=f"llama.cpp's quantisations to make and measure, Q4_K_M first (the baseline of every ratio): "
                         f"any of {', '.join(GGUF_TYPES)}")
    ap.add_argument("--name", default="peer", help="results file name (bench/results/NAME.json)")
    args = ap.parse_args()
    args.gguf_types = tuple(args.gguf_types.split(","))
    args.cache = [b for b in args.cache.split(",") if b]
    if args.memory_cap and not args.mmap:
        ap.error("--memory-cap compares with llama.cpp memory-mapped (without its repacked copies): add --mmap")
    if args.gguf_types[0] != "Q4_K_M" or not set(args.gguf_types) <= set(GGUF_TYPES):
        ap.error(f"--gguf-types {','.join(args.gguf_types)}: Q4_K_M first, then any of {', '.join(GGUF_TYPES)}")
    try:
        import llama_cpp
    except ImportError:
        print(INSTALL_HINT)
        return
    import torch

    torch.set_num_threads(args.threads)
    widths = [int(w) for w in args.widths.split(",")]
    layers = per_width(args.layers, widths, "layers")
    args.work.mkdir(parents=True, exist_ok=True)
    llama_dir = llama_source(args.llama_src, args.work)
    conv = Conversions(args.work)
    load_before = [round(x, 2) for x in os.getloadavg()]
    if load_before[0] > 0.5:
        log(f"load average {load_before[0]}: other work shares these cores; llama.cpp's threads spin-wait at "
            "barriers, so its figures suffer most (rerun with --skip-convert when the machine is idle)")
    shapes = [bench_shape(Shape(width=w, layers=n), args, llama_dir, conv) for w, n in zip(widths, layers)]
    # the targets are for a machine the model fits; under a cap the rows answer another question
    goals = [] if args.memory_cap else targets(shapes)
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    result = {"threads": args.threads, "tokens": args.tokens, "prompt_tokens": args.prompt_tokens, "rounds": args.rounds,
              "repeats": args.repeats, "samples": args.samples, "llama_cpp_version": llama_cpp.__version__,
              "llama_src": str(llama_dir), "prism_commit": commit, "load_before": load_before,
              "load_after": [round(x, 2) for x in os.getloadavg()], "shapes": shapes, "targets": goals,
              "machine": machine(), "q8_instructions": q8_instructions(), "baseline": baseline_name(args),
              "memory_cap_mib": args.memory_cap, "cold": args.cold or bool(args.memory_cap)}
    path = write_report(args.name, result, markdown(result))
    print_tables(result)
    log(f"wrote {path} and {RESULTS / (args.name + '.md')}")


if __name__ == "__main__":
    main()
