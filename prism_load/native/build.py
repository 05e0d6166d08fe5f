"""Compiles the C sources (int_linear.c, q8_linear.c, expert_block.c, rms_norm.c, attention_decode.c,
router_topk.c, decode_layer.c, read_range.c, expert_miss.c, sample.c: one library) on first use with the system C compiler and loads it with ctypes; nothing at
install. q8_linear.c's VNNI code (AVX-VNNI, AVX512-VNNI) is compiled for those targets
alone and runs only where the CPU reports them (`prism_q8_instructions`; AVX2 otherwise), so the library itself
needs AVX2/FMA/F16C only.

The library lands in $PRISM_CACHE (default ~/.cache/prism) under kernels/<hash of source, flags, compiler
version and OpenMP library>/, written to a temporary name and renamed, so two processes building at once
both end with a whole library. It links torch's own libgomp by path (with an rpath), so the kernel and
torch's intra-op threads are one OpenMP runtime and one thread pool: no oversubscription.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

_HERE = Path(__file__).parent
SOURCES = tuple(_HERE / name for name in ("int_linear.c", "q8_linear.c", "expert_block.c", "rms_norm.c",
                                          "attention_decode.c", "router_topk.c", "decode_layer.c",
                                          "read_range.c", "expert_miss.c", "sample.c"))  # one library
HEADERS = (_HERE / "q8_linear.h", _HERE / "expert_miss.h", _HERE / "expert_block.h")  # part of the cache key, not compiled alone
FLAGS = ["-std=c11", "-O3", "-mavx2", "-mfma", "-mf16c", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC"]
CPU_FLAGS = ("avx2", "fma", "f16c")
Q8_INSTRUCTIONS = {1: "AVX2", 2: "AVX512-VNNI", 3: "AVX-VNNI"}  # prism_q8_instructions' codes


class NativeUnavailable(RuntimeError):
    """The native kernels cannot run here; the message says why."""


def cache_dir() -> Path:
    return Path(os.environ.get("PRISM_CACHE") or Path.home() / ".cache" / "prism") / "kernels"


def torch_gomp() -> Path | None:
    """torch's bundled libgomp (the pip wheel ships one in torch/lib), if it has one."""
    import torch

    found = sorted(Path(torch.__file__).parent.joinpath("lib").glob("libgomp*.so*"))
    return found[0] if found else None


def cpu_problem() -> str | None:
    """Why this CPU cannot run the kernel, or None."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"the kernel is x86-64 AVX2 code; this machine is {platform.machine()}"
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
        missing = [f for f in CPU_FLAGS if f not in flags.split(":", 1)[1].split()]
        return f"the CPU lacks {', '.join(missing)}" if missing else None
    except (OSError, StopIteration):
        import torch

        capability = torch.backends.cpu.get_cpu_capability()
        return None if capability.startswith(("AVX2", "AVX512")) else f"the CPU's capability is {capability}"


def extra_flags() -> list[str]:
    """Compiler flags added from $PRISM_NATIVE_CFLAGS (part of the cache key). Why: the tests' sanitizer run
    (tests/test_sanitizers.py: `-fsanitize=address,undefined`) builds the same sources without editing FLAGS."""
    return os.environ.get("PRISM_NATIVE_CFLAGS", "").split()


def compile_command(compiler: str, output: Path) -> list[str]:
    gomp = torch_gomp()
    link = [str(gomp), f"-Wl,-rpath,{gomp.parent}"] if gomp else []  # else -fopenmp's own libgomp
    return [compiler, *FLAGS, *extra_flags(), "-o", str(output), *map(str, SOURCES), *link]


def library_path(compiler: str) -> Path:
    done = subprocess.run([compiler, "--version"], capture_output=True, text=True)
    if done.returncode != 0:
        raise NativeUnavailable(f"the C compiler {compiler} does not run ({compiler} --version: exit {done.returncode})")
    version = done.stdout
    key = hashlib.sha256()
    for part in (*(source.read_bytes() for source in (*SOURCES, *HEADERS)), " ".join(FLAGS + extra_flags()).encode(), version.encode(),
                 str(torch_gomp()).encode()):
        key.update(part)
        key.update(b"\0")
    return cache_dir() / key.hexdigest()[:16] / "int_linear.so"


def build(compiler: str) -> tuple[Path, float]:
    """The cached library, compiled first when absent: (path, seconds spent compiling, 0 when cached)."""
    path = library_path(compiler)
    if path.exists():
        return path, 0.0
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".build-", suffix=".so")
    os.close(fd)
    start = time.perf_counter()
    try:
        done = subprocess.run(compile_command(compiler, Path(tmp)), capture_output=True, text=True)
        if done.returncode != 0:
            names = ", ".join(s.name for s in SOURCES)
            raise NativeUnavailable(f"{compiler} failed on {names}: {done.stderr.strip()[-800:]}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path, time.perf_counter() - start


def _bind(lib, name: str, pointers: int = 1):
    """The library's entry point `name`, taking that many pointers (argument arrays) and returning an int code."""
    fn = getattr(lib, name)
    fn.argtypes = [ctypes.c_void_p] * pointers
    fn.restype = ctypes.c_int
    return fn


@functools.cache
def load() -> tuple[ctypes._CFuncPtr | None, str | None, float]:
    """(the kernel's entry point, None, compile seconds) or (None, why not, 0). Tried once per process.
    The same library's bf16 product is `load_gemv()`."""
    if os.environ.get("PRISM_NATIVE", "1") == "0":
        return None, "disabled by PRISM_NATIVE=0", 0.0
    reason = cpu_problem()
    if reason:
        return None, reason, 0.0
    compiler = shutil.which(os.environ.get("CC") or "cc") or shutil.which("gcc")
    if compiler is None:
        return None, "no C compiler (cc or $CC) on PATH", 0.0
    import torch  # noqa: F401 - torch's libgomp must be loaded before the kernel that shares it

    try:
        path, seconds = build(compiler)
        lib = ctypes.CDLL(str(path))  # CDLL, not PyDLL: the call releases the interpreter lock
    except (NativeUnavailable, OSError, subprocess.SubprocessError) as e:
        return None, str(e), 0.0
    fn = _bind(lib, "prism_int_linear_packed")  # int64 args[13]: see int_linear.c
    fn.gemv = _bind(lib, "prism_bf16_gemv_packed")  # int64 args[12]
    fn.q8 = _bind(lib, "prism_q8_linear_packed")  # int64 args[13], as prism_int_linear_packed's
    fn.q16 = _bind(lib, "prism_q16_linear_packed")  # the same with int16 x
    fn.pair = _bind(lib, "prism_int_linear_pair_packed", 2)  # two int64 args[13] each
    fn.q8_pair = _bind(lib, "prism_q8_linear_pair_packed", 2)
    fn.q16_pair = _bind(lib, "prism_q16_linear_pair_packed", 2)
    fn.q8_instructions = lambda: Q8_INSTRUCTIONS[lib.prism_q8_instructions()]
    fn.q8_force = lib.prism_q8_force
    fn.q16_zmm = lib.prism_q16_zmm  # 1 where the int16 path runs 512-bit tiles (AVX512-VNNI + AVX512BW)
    fn.widen = _bind(lib, "prism_widen_codes")
    fn.widen.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                         ctypes.c_int64, ctypes.c_int, ctypes.c_int]
    fn.expert_block = _bind(lib, "prism_expert_block", 3)  # int64 hdr[5], int64 *ops[3E], float weights[E]
    fn.expert_rows = _bind(lib, "prism_expert_rows", 3)  # int64 hdr[6], int64 *ops[3BE], float weights[BE]
    fn.rms_norm = _bind(lib, "prism_rms_norm")  # int64 args[9]: rms_norm.c
    fn.attention_decode = _bind(lib, "prism_attention_decode")  # int64 args[19]: attention_decode.c
    fn.attention_rows = _bind(lib, "prism_attention_rows")  # int64 args[21]: the same for a batch's rows
    fn.router_topk = _bind(lib, "prism_router_topk")  # int64 args[9]: router_topk.c
    fn.decode_layer = _bind(lib, "prism_decode_layer")  # int64 args[16]: decode_layer.c
    fn.decode_layers = _bind(lib, "prism_decode_layers", 2)  # int64 hdr[15], int64 layers[4L]: decode_layer.c
    fn.resident_set = lib.prism_resident_set  # int64 table[2 + 3E], E, e, wide, int64 ptrs[3]: decode_layer.c
    fn.resident_set.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    fn.resident_set.restype = ctypes.c_int
    fn.resident_clear = lib.prism_resident_clear  # int64 table[2 + 3E], E, e
    fn.resident_clear.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64]
    fn.resident_clear.restype = ctypes.c_int
    fn.pread = lib.prism_pread  # fd, offset, length, dst, threads -> bytes read or -errno: read_range.c
    fn.pread.argtypes = [ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64]
    fn.pread.restype = ctypes.c_int64
    fn.slab_alloc = lib.prism_slab_alloc  # nbytes, huge -> address or 0: expert_miss.c
    fn.slab_alloc.argtypes = [ctypes.c_int64, ctypes.c_int64]
    fn.slab_alloc.restype = ctypes.c_void_p
    # address; called with the interpreter lock held (PyDLL): a free() is shorter than handing the lock over and
    # back, which a replay of the native miss log paid for every slab it gave up (runtime/native_misses.py)
    fn.slab_free = ctypes.PyDLL(str(path)).prism_slab_free
    fn.slab_free.argtypes = [ctypes.c_void_p]
    fn.slab_free.restype = None
    fn.sample_argmax = lib.prism_sample_argmax  # float *x, n -> index: sample.c
    fn.sample_argmax.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    fn.sample_argmax.restype = ctypes.c_int64
    fn.sample_top_k = lib.prism_sample_top_k  # float *x, n, k, temperature, top_p, u -> token or < 0: sample.c
    fn.sample_top_k.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_double, ctypes.c_double,
                                ctypes.c_double]
    fn.sample_top_k.restype = ctypes.c_int64
    fn.expert_miss_fields = lib.prism_expert_miss_fields  # the count of expert_miss.h's fields
    fn.expert_miss_fields.restype = ctypes.c_int64
    fn.expert_miss_args = lib.prism_expert_miss_args  # its operators' argument count (native._ARGS)
    fn.expert_miss_args.restype = ctypes.c_int64
    return fn, None, seconds
