"""The native `int` matmul (prism_load/native): equal to x @ decode(w).T within fp32 accumulation error for every
width, group size and shape it takes (partial last groups, odd K, views at odd offsets); the same bits on 1 and 2
threads; the interpreter lock released during a call; clear errors; and a clean opt-out."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest
import torch

from prism_load import native
from prism_load.container.codecs import decode, pack_bits
from prism_load.container.format import Encoding

SHAPES = [(1, 5, 37), (3, 33, 200), (17, 64, 130), (64, 7, 257), (1, 300, 1000), (2, 9, 64), (9, 150, 2100)]  # M, N, K


@pytest.fixture(scope="module")
def kernel():
    if not native.available():
        pytest.skip(f"native kernels unavailable: {native.unavailable_reason()}")


def stored(n: int, k: int, bits: int, g: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """An `int` tensor as the container stores it: scales as quantisers make them, zeros not integers."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 2**bits, (n, k), dtype=torch.uint8, generator=gen)
    groups = -(-k // g)
    scales = ((torch.rand(n, groups, generator=gen) + 0.05) / 2**bits).half()
    zeros = (torch.rand(n, groups, generator=gen) * (2**bits - 1)).half()
    return {"qweight": pack_bits(q, bits), "scales": scales, "zeros": zeros}


def check(x: torch.Tensor, t: dict[str, torch.Tensor], bits: int, g: int, y: torch.Tensor) -> None:
    """|y - x @ w.T| <= 1e-5 * |x_m| * |w_n| per element (fp64 reference on the fp32 decode)."""
    n, k = t["scales"].shape[0], x.shape[1]
    w = decode(Encoding("int", (n, k), bits=bits, group_size=g), t).double()  # [N, K]
    ref = x.double() @ w.T  # [M, N]
    bound = 1e-5 * x.double().norm(dim=1, keepdim=True) * w.norm(dim=1)  # [M, N]
    err = (y.double() - ref).abs()
    assert (err <= bound).all(), f"worst error {(err / bound).max().item():.3g} of the bound"


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("g", [8, 32, 64, 128])
@pytest.mark.parametrize("m, n, k", SHAPES)
def test_matches_reference(kernel, bits, g, m, n, k):
    t = stored(n, k, bits, g, seed=m * 1000 + k)
    x = torch.randn(m, k)
    check(x, t, bits, g, native.int_linear(x, t["qweight"], t["scales"], t["zeros"], bits, g, k))


@pytest.mark.parametrize("bits, g", [(4, 7), (2, 6), (4, 20), (8, 3), (2, 12)])
def test_groups_off_the_block_grid(kernel, bits, g):
    """Groups that start inside a byte (g * bits % 8 != 0) or inside a vector block take the scalar path."""
    for m, n, k in [(1, 6, 45), (5, 4, 45)]:
        t = stored(n, k, bits, g)
        x = torch.randn(m, k)
        check(x, t, bits, g, native.int_linear(x, t["qweight"], t["scales"], t["zeros"], bits, g, k))


def test_views_at_odd_offsets_and_strides(kernel):
    """x a strided view at an offset, the stored tensors at unaligned addresses, out a view into a wider tensor."""
    m, n, k, bits, g = 3, 21, 99, 4, 32
    t = stored(n, k, bits, g)
    raw = torch.zeros(t["qweight"].numel() + 1, dtype=torch.uint8)
    raw[1:] = t["qweight"].flatten()
    halves = {name: torch.zeros(t[name].numel() + 1, dtype=torch.float16) for name in ("scales", "zeros")}
    for name, h in halves.items():
        h[1:] = t[name].flatten()
    views = {"qweight": raw[1:].view(n, -1), "scales": halves["scales"][1:].view(n, -1),
             "zeros": halves["zeros"][1:].view(n, -1)}
    x = torch.randn(m + 1, k + 5)[1:, 3 : 3 + k]  # row stride k + 5, offset
    out = torch.full((m, n + 4), float("nan"))
    y = native.int_linear(x, *views.values(), bits, g, k, out=out[:, 2 : 2 + n])
    assert y.data_ptr() == out[:, 2:].data_ptr()
    check(x, t, bits, g, y)
    assert out[:, :2].isnan().all() and out[:, 2 + n :].isnan().all()
    check(x.T.contiguous().T, t, bits, g, native.int_linear(x.T.contiguous().T, *views.values(), bits, g, k))


def test_bf16_input_is_widened(kernel):
    t = stored(16, 96, 4, 32)
    x = torch.randn(2, 96).bfloat16()
    y = native.int_linear(x, t["qweight"], t["scales"], t["zeros"], 4, 32, 96)
    assert y.dtype == torch.float32
    check(x.float(), t, 4, 32, y)


@pytest.mark.parametrize("m", [1, 3, 17, 64])
def test_same_bits_on_one_and_two_threads(kernel, m):
    n, k, bits, g = 520, 1000, 4, 64
    t = stored(n, k, bits, g)
    x = torch.randn(m, k)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = native.int_linear(x, t["qweight"], t["scales"], t["zeros"], bits, g, k)
        torch.set_num_threads(2)
        two = native.int_linear(x, t["qweight"], t["scales"], t["zeros"], bits, g, k)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def test_call_releases_the_interpreter_lock(kernel):
    """A Python thread keeps counting while one long kernel call runs (it could not if the call held the lock)."""
    n, k, bits, g = 2048, 4096, 4, 128
    t = stored(n, k, bits, g)
    x = torch.randn(64, k)
    count, stop = [0], threading.Event()

    def counter():
        while not stop.is_set():
            count[0] += 1

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    worker = threading.Thread(target=counter)
    worker.start()
    try:
        while count[0] == 0:
            time.sleep(0.001)
        before = count[0]
        start = time.perf_counter()
        native.int_linear(x, t["qweight"], t["scales"], t["zeros"], bits, g, k)
        seconds, counted = time.perf_counter() - start, count[0] - before
    finally:
        stop.set()
        worker.join()
        torch.set_num_threads(threads)
    assert seconds > 0.02, "the call was too short to tell"
    assert counted > 1000, f"the counter advanced {counted} times during a {seconds * 1e3:.0f} ms call"


def test_bad_arguments_say_what_is_wrong(kernel):
    t = stored(8, 64, 4, 32)
    q, s, z, x = t["qweight"], t["scales"], t["zeros"], torch.randn(2, 64)
    cases = [
        (dict(bits=3), "bits must be one of"),
        (dict(group_size=0), "group_size and k must be positive"),
        (dict(x=torch.randn(2, 63)), r"x must be a cpu tensor \[M, 64\]"),
        (dict(x=torch.ones(2, 64, dtype=torch.int32)), "x must be floating point"),
        (dict(qweight=q[:, :-1]), r"qweight must be torch.uint8 \[8, 32\]"),
        (dict(qweight=q.to(torch.int8)), "qweight must be torch.uint8"),
        (dict(qweight=torch.zeros(32, 8, dtype=torch.uint8).T), "qweight must be contiguous"),
        (dict(scales=s.float()), r"scales must be torch.float16 \[8, 2\]"),
        (dict(zeros=z[:4]), r"zeros must be torch.float16 \[8, 2\]"),
        (dict(group_size=16), r"scales must be torch.float16 \[8, 4\]"),
        (dict(out=torch.empty(2, 8, dtype=torch.float64)), r"out must be fp32 \[2, 8\]"),
        (dict(out=torch.empty(8, 2).T), "out must be fp32"),
    ]
    for change, message in cases:
        args = dict(x=x, qweight=q, scales=s, zeros=z, bits=4, group_size=32, k=64) | change
        with pytest.raises(ValueError, match=message):
            native.int_linear(**args)


def test_disabled_by_environment():
    """PRISM_NATIVE=0: unavailable, with the reason, and a call raises NativeUnavailable (callers check first)."""
    code = ("from prism_load import native\nprint(native.available(), native.unavailable_reason())\n"
            "try:\n    native.int_linear(None, None, None, None, 4, 32, 8)\n"
            "except native.NativeUnavailable as e:\n    print(e)\n")
    env = {**os.environ, "PRISM_NATIVE": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == ["False disabled by PRISM_NATIVE=0",
                                "native kernels unavailable: disabled by PRISM_NATIVE=0"]
