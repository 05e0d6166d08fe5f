"""The native library's tests again, with the library built under AddressSanitizer and UndefinedBehaviorSanitizer.

Why: prism_load/native is C that writes into slabs, tables and logs it shares with Python (expert_miss.c serves
cache misses inside the decode loop); an out-of-bounds write there corrupts a user's process silently rather than
failing a test. Built with `-fsanitize=address,undefined` (PRISM_NATIVE_CFLAGS, in a cache of its own) and run
with the sanitizer runtimes preloaded into the interpreter, any such access aborts the run with a report.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from prism_load import native

ROOT = Path(__file__).resolve().parent.parent
SANITIZE = "-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer -g"
# every test file whose tests call into the native library, the miss path's first
NATIVE_TESTS = ("test_native_misses.py", "test_decode_layer.py", "test_native_token.py", "test_expert_block.py",
                "test_attention_decode.py", "test_read_range.py", "test_native_kernels.py", "test_runtime_cache.py",
                "test_sampling.py")


def runtime_library(compiler: str, name: str) -> str | None:
    """The compiler's shared runtime `name` (libasan.so), or None where it has none (gcc prints the bare name)."""
    done = subprocess.run([compiler, f"-print-file-name={name}"], capture_output=True, text=True)
    path = done.stdout.strip()
    return path if done.returncode == 0 and os.path.isabs(path) and os.path.exists(path) else None


def test_extra_flags_are_part_of_the_librarys_key(monkeypatch):
    """A library built with other flags is another file: a sanitized build never stands in for the plain one."""
    from prism_load.native import build

    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler")
    monkeypatch.delenv("PRISM_NATIVE_CFLAGS", raising=False)
    plain = build.library_path(compiler)
    monkeypatch.setenv("PRISM_NATIVE_CFLAGS", SANITIZE)
    assert build.extra_flags() == SANITIZE.split()
    assert build.library_path(compiler) != plain
    assert build.compile_command(compiler, Path("out.so"))[1:1 + len(build.FLAGS) + len(SANITIZE.split())] == \
        [*build.FLAGS, *SANITIZE.split()]


@pytest.mark.slow
def test_native_tests_pass_under_address_and_undefined_sanitizers(tmp_path):
    if not native.available():
        pytest.skip(f"native kernels unavailable: {native.unavailable_reason()}")
    compiler = shutil.which(os.environ.get("CC") or "cc") or shutil.which("gcc")
    runtimes = [runtime_library(compiler, name) for name in ("libasan.so", "libubsan.so")]
    if None in runtimes:
        pytest.skip(f"{compiler} has no shared sanitizer runtimes (libasan.so, libubsan.so)")
    env = dict(os.environ, PRISM_CACHE=str(tmp_path / "cache"), PRISM_NATIVE_CFLAGS=SANITIZE,
               LD_PRELOAD=" ".join(runtimes),
               # Python's own allocations are not ours to check; the first error ends the run
               ASAN_OPTIONS="detect_leaks=0:abort_on_error=1", UBSAN_OPTIONS="print_stacktrace=1")
    probe = ("from prism_load.native.build import load, library_path; import shutil, os; fn, why, _ = load(); "
             "assert fn is not None, why; "
             "print(library_path(shutil.which(os.environ.get('CC') or 'cc') or shutil.which('gcc')))")
    built = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, cwd=ROOT)
    assert built.returncode == 0, built.stderr[-3000:]
    library = Path(built.stdout.strip())
    assert library.is_relative_to(tmp_path) and b"__asan_report" in library.read_bytes(), \
        f"{library} was not built with the sanitizers"
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-m", "not slow",
                           *(str(ROOT / "tests" / name) for name in NATIVE_TESTS)],
                          env=env, capture_output=True, text=True, cwd=ROOT)
    report = (done.stdout + done.stderr)[-6000:]
    assert done.returncode == 0, report
    assert "ERROR: AddressSanitizer" not in report and "runtime error:" not in report, report
