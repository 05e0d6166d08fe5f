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
        before, calls = count[0], 0
        start = time.perf_counter()
        while time.perf_counter() - start < 0.05:  # calls of ~10-20 ms each: a few, whatever the CPU's speed
            native.int_linear(x, t["qweight"], t["scales"], t["zeros"], bits, g, k)
            calls += 1
        seconds, counted = time.perf_counter() - start, count[0] - before
    finally:
        stop.set()
        worker.join()
        torch.set_num_threads(threads)
    assert counted > 1000 * calls, f"the counter advanced {counted} times during {calls} calls ({seconds * 1e3:.0f} ms)"


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


# -- widening 3-, 5- and 6-bit codes to the kernels' widths --------------------------------------------------
@pytest.mark.parametrize("bits", [3, 5, 6])
@pytest.mark.parametrize("cols", [192, 17, 8, 1])
def test_widen_codes_is_unpack_then_pack_at_the_kernel_width(kernel, bits, cols):
    """The same values, rewritten 4 (3-bit) or 8 (5-, 6-bit) bits wide, including rows whose last codes do not
    fill 8 (the part one pdep cannot take) and codes at their maximum."""
    q = torch.randint(0, 2**bits, (9, cols), dtype=torch.uint8, generator=torch.Generator().manual_seed(cols))
    q[0] = 2**bits - 1
    widened = native.widen_codes(pack_bits(q, bits), bits, cols)
    to = native.WIDENINGS[bits]
    assert torch.equal(widened, pack_bits(q, to) if to < 8 else q)
    with pytest.raises(ValueError, match="widen_codes: a cpu uint8"):
        native.widen_codes(pack_bits(q, bits), 4, cols)


# -- the bf16 matrix-vector product (decode rows of a bf16 model's dense layers) ------------------------------
@pytest.mark.parametrize("m, n, k", [(1, 1024, 1024), (3, 100, 64), (4, 37, 1000), (2, 8, 7), (1, 5, 17)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_bf16_linear_is_the_fp64_product_rounded_to_bf16(kernel, m, n, k, with_bias):
    """Exact products and fp32 sums: within one bf16 rounding of the fp64 product (ties may round either way)."""
    gen = torch.Generator().manual_seed(m * 100 + k)
    w = torch.randn(n, k, generator=gen).bfloat16()
    x = torch.randn(m, k, generator=gen).bfloat16()
    b = torch.randn(n, generator=gen).bfloat16() if with_bias else None
    y = native.bf16_linear(x, w, b)
    ref = torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double())
    assert y.dtype == torch.bfloat16 and y.shape == (m, n)
    ulp = ref.abs().clamp(min=1e-30).log2().floor().exp2() / 128  # one bf16 step at each value
    assert ((y.double() - ref).abs() <= ulp + 1e-6 * x.double().norm(dim=1, keepdim=True) * w.double().norm(dim=1)).all()
    assert (y == ref.bfloat16()).float().mean() > 0.99  # round to nearest: all but near-ties agree


@pytest.mark.parametrize("m, n, k", [(1, 1024, 1024), (4, 37, 1000), (2, 8, 7)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_bf16_linear_with_fp32_x_is_the_product_of_the_widened_weight(kernel, m, n, k, with_bias):
    """An fp32 x (and bias) against a bf16 weight: the fp32 product of the weight widened to fp32, nothing
    rounded to bf16 (a bf16-weight model computing in fp32)."""
    gen = torch.Generator().manual_seed(m * 7 + k)
    w = torch.randn(n, k, generator=gen).bfloat16()
    x = torch.randn(m, k, generator=gen)
    b = torch.randn(n, generator=gen) if with_bias else None
    y = native.bf16_linear(x, w, b)
    ref = torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double())
    assert y.dtype == torch.float32 and y.shape == (m, n)
    bound = 1e-6 * x.double().norm(dim=1, keepdim=True) * w.double().norm(dim=1) + 1e-6 * ref.abs()
    assert ((y.double() - ref).abs() <= bound).all()
    assert not torch.equal(y, y.bfloat16().float())  # not rounded to bf16 on the way


def test_bf16_linear_takes_views_and_leading_shapes(kernel):
    w_wide = torch.randn(40, 80).bfloat16()
    w = w_wide[:, 10:74]  # row stride 80
    x = torch.randn(1, 2, 96).bfloat16()[:, :, 16:80]  # a strided view with a leading shape
    y = native.bf16_linear(x, w)
    assert y.shape == (1, 2, 40)
    assert torch.equal(y, native.bf16_linear(x.contiguous(), w.contiguous()))


def test_bf16_linear_declines_what_it_does_not_take(kernel):
    w = torch.randn(8, 16).bfloat16()
    assert native.bf16_linear(torch.randn(5, 16).bfloat16(), w) is None  # prefill rows: torch's matrix product
    assert native.bf16_linear(torch.randn(1, 16).half(), w) is None  # fp16 x
    assert native.bf16_linear(torch.randn(1, 16), w, torch.randn(8).bfloat16()) is None  # fp32 x, bf16 bias
    assert native.bf16_linear(torch.randn(1, 16).bfloat16(), w.float()) is None
    assert native.bf16_linear(torch.randn(1, 16).bfloat16(), w.t().contiguous().t()) is None  # column-major
    assert native.bf16_linear(torch.randn(1, 16).bfloat16(), w, torch.randn(8)) is None  # fp32 bias


def test_models_linear_routes_bf16_decode_rows_to_the_kernel(kernel, monkeypatch):
    from prism_load.models import linear as linear_module

    calls = []
    real = native.bf16_linear
    monkeypatch.setattr(native, "bf16_linear", lambda *a: calls.append(a[0].shape) or real(*a))
    w = torch.randn(32, 64).bfloat16()
    linear_module.linear(torch.randn(1, 1, 64).bfloat16(), w)
    linear_module.linear(torch.randn(1, 9, 64).bfloat16(), w)  # prefill: torch
    linear_module.linear(torch.randn(1, 64), w.float())  # fp32: torch
    linear_module.linear(torch.randn(2, 64), w)  # fp32 x, bf16 weight: the kernel's fp32 form
    assert calls == [(1, 1, 64), (2, 64)]


@pytest.mark.parametrize("rows", [1, 9])
def test_fp32_x_against_a_bf16_weight_is_the_widened_product_block_by_block(monkeypatch, rows):
    """linear() of an fp32 x and a bf16 weight (bf16 weights computing in fp32): the product with the weight
    widened to fp32, also when the widening goes a block of rows at a time (a big LM head), bias included: equal up
    to the fp32 summation order, which the BLAS may choose by the block's shape (on an AMD Zen 5 a 16-row block of
    9 rows of x summed in another order than the whole 70-row weight)."""
    from prism_load.models import linear as linear_module

    w, b = torch.randn(70, 48).bfloat16(), torch.randn(70)
    x = torch.randn(1, rows, 48)
    want = torch.nn.functional.linear(x, w.float(), b)
    assert torch.allclose(linear_module.linear(x, w, b), want, rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(linear_module, "UPCAST_CHUNK_BYTES", 48 * 4 * 16)  # 16 rows at a time: 5 blocks
    got = linear_module.widened_linear(x, w, b)
    assert got.dtype == torch.float32 and torch.allclose(got, want, rtol=1e-6, atol=1e-6)


# -- integer activations (q8_linear.c: int16 and int8 x) ------------------------------------------------------
LEVELS = {"int16": 32767, "int8": 127}


def int_rounded(x: torch.Tensor, g: int, activations: str = "int8") -> torch.Tensor:
    """x with each group of g columns (the last one may be shorter) rounded to steps of max|x| / 127 (int8) or
    / 32767 (int16), ties to even, as the kernel does."""
    top = LEVELS[activations]
    out = torch.empty_like(x)
    for k0 in range(0, x.shape[1], g):
        group = x[:, k0:k0 + g]
        step = group.abs().amax(-1, keepdim=True) / top
        q = torch.where(step > 0, torch.round(group / step).clamp(-top, top), torch.zeros_like(group))
        out[:, k0:k0 + g] = q * step
    return out


@pytest.mark.parametrize("act", ["int16", "int8"])
@pytest.mark.parametrize("bits, g", [(4, 64), (4, 128), (2, 128), (8, 32), (8, 64)])
@pytest.mark.parametrize("m, n, k", [(1, 70, 256), (2, 33, 512), (4, 8, 128 * 3), (9, 12, 256), (1, 16, 192)])
def test_integer_activations_are_the_product_with_x_rounded_per_group(q8, act, bits, g, m, n, k):
    """Including a partial last group (k = 384 at g = 128 x 3, 256 at g = 128, ...: whole blocks, a group of
    its own)."""
    if not native.integer_takes(act, m, k, bits, g):
        pytest.skip("K is not whole blocks for this kernel: the exact kernel's (tested below)")
    t = stored(n, k, bits, g, seed=k + m)
    x = torch.randn(m, k)
    x[0, :g] = 0.0  # an all-zero group: step 0, no division by it
    y = native.int_linear(x, t["qweight"], t["scales"], t["zeros"], bits, g, k, activations=act)
    check(int_rounded(x, g, act), t, bits, g, y)
    exact = native.int_linear(x, t["qweight"], t["scales"], t["zeros"], bits, g, k)
    assert not torch.equal(y, exact)


@pytest.mark.parametrize("bits, g", [(4, 32), (2, 64), (8, 16), (4, 2048)])
def test_int16_activations_take_16_byte_groups_and_stay_within_their_rounding(q8, bits, g):
    """int16 x takes groups of whole 16-byte blocks (finer than int8's 32) up to 2048 codes; its error against
    the exact product is x's rounding alone: at most half a step per element, so |dy| <= sum_k |w_k| * d_g / 2."""
    k = max(256, 2 * g)
    t = stored(40, k, bits, g, seed=g)
    x = torch.randn(3, k)
    assert native.q16_takes(3, k, bits, g) and not native.q16_takes(3, k, bits, 4096)
    y = native.int_linear(x, t["qweight"], t["scales"], t["zeros"], bits, g, k, activations="int16")
    w = decode(Encoding("int", (40, k), bits=bits, group_size=g), t).double()
    step = x.view(3, k // g, g).abs().amax(-1).double() / 32767  # [M, G]
    bound = (w.abs().view(40, k // g, g).sum(-1)[None] * step[:, None] / 2).sum(-1)  # [M, N]
    err = (y.double() - x.double() @ w.T).abs()
    assert (err <= bound + 1e-5 * x.double().norm(dim=1, keepdim=True) * w.norm(dim=1)).all()
    assert (err.max() / (x.double() @ w.T).abs().max()) < 1e-4


@pytest.fixture
def q8_instruction_sets(q8):
    """Every integer dot product this CPU runs (AVX2 always, its VNNI where it has one); detection restored."""
    sets = sorted({"AVX2", native.q8_instructions()})
    yield sets
    native.q8_force_instructions(None)


@pytest.mark.parametrize("act", ["int16", "int8"])
@pytest.mark.parametrize("bits, g", [(4, 64), (2, 128), (8, 32), (8, 256)])
@pytest.mark.parametrize("m", [1, 2, 5])
def test_integer_activations_give_the_same_bits_with_every_instruction_set(q8_instruction_sets, act, bits, g, m):
    """AVX2's vpmaddubsw (8-bit codes split into nibbles so no int16 sum saturates) / vpmaddwd and VNNI's
    vpdpbusd / vpdpwssd sum the same integers: the outputs are equal bit for bit, including codes of 255
    against x at the top of its range."""
    k = 512
    t = stored(37, k, bits, g, seed=bits + m)
    t["qweight"][:3] = 255  # every code at its maximum: the sums that would saturate int16 pairs
    x = torch.randn(m, k)
    x[:, ::2] = x[:, ::2].abs().max()  # many x8 at +127 beside them
    args = (x, t["qweight"], t["scales"], t["zeros"], bits, g, k)
    outs = {}
    for name in q8_instruction_sets:
        native.q8_force_instructions(name)
        outs[name] = native.int_linear(*args, activations=act)
    native.q8_force_instructions(None)
    check(int_rounded(x, g, act), t, bits, g, outs["AVX2"])
    for name, y in outs.items():
        assert torch.equal(y, outs["AVX2"]), name


@pytest.mark.parametrize("bits, g, k", [(4, 128, 576), (2, 256, 640), (8, 64, 320), (4, 64, 512)])
@pytest.mark.parametrize("m", [1, 3, 8, 16])
def test_int16_512_bit_tiles_give_the_256_bit_tiles_bits(q8, bits, g, k, m, monkeypatch):
    """Where the CPU has AVX512-VNNI and AVX512BW the int16 path multiplies 32-byte blocks in 512-bit vectors
    (x laid out in pairs of the 256-bit tiles' blocks, int32 halves added before the scaling): the same bits as
    the 256-bit tiles (forced by AVX2), partial last groups (576 = 4.5 groups of 128) included. The 512-bit tiles
    take any number of rows (16 here); the 256-bit ones are compared at 16 rows with their row limit lifted."""
    monkeypatch.setattr(native, "Q16_UPTO_M", 10**6)
    if native.q16_vector_bits() != 512:
        pytest.skip("this CPU has no AVX512-VNNI with AVX512BW: the int16 tiles are 256-bit only")
    t = stored(45, k, bits, g, seed=k + m)
    x = torch.randn(m, k)
    args = (x, t["qweight"], t["scales"], t["zeros"], bits, g, k)
    wide = native.int_linear(*args, activations="int16")
    try:
        native.q8_force_instructions("AVX2")
        assert native.q16_vector_bits() == 256
        narrow = native.int_linear(*args, activations="int16")
    finally:
        native.q8_force_instructions(None)
    assert native.q16_vector_bits() == 512
    assert torch.equal(wide, narrow)
    check(int_rounded(x, g, "int16"), t, bits, g, wide)


def test_forcing_instructions_the_cpu_lacks_is_refused(q8):
    lacking = {"AVX-VNNI", "AVX512-VNNI"} - {native.q8_instructions()}
    for name in lacking:
        with pytest.raises(ValueError, match=f"this CPU cannot run {name}"):
            native.q8_force_instructions(name)
    with pytest.raises(ValueError, match="unknown instructions 'SSE'"):
        native.q8_force_instructions("SSE")
    assert native.q8_instructions() in ("AVX2", "AVX512-VNNI", "AVX-VNNI")


@pytest.mark.parametrize("act, bits, g, m, k", [("int8", 4, 32, 1, 256), ("int8", 2, 64, 5, 256), ("int8", 4, 64, 1, 96),
                                                ("int16", 4, 16, 1, 256), ("int16", 2, 32, 5, 256),
                                                ("int16", 4, 64, 1, 88), ("int16", 8, 4096, 1, 4096),
                                                ("int16", 4, 32, 9, 256)])
def test_integer_activations_leave_other_shapes_to_the_exact_kernel(q8, act, bits, g, m, k):
    """Groups under 32 (int8) / 16 (int16) bytes, K not whole blocks, int16 groups over 2048 codes, int16 with
    more rows than Q16_UPTO_M on the 256-bit tiles (16-byte groups: 32 codes of 4 bits; the exact gemm path is faster
    there): computed exactly."""
    t = stored(16, k, bits, g)
    x = torch.randn(m, k)
    args = (x, t["qweight"], t["scales"], t["zeros"], bits, g, k)
    assert torch.equal(native.int_linear(*args, activations=act), native.int_linear(*args))
    with pytest.raises(ValueError, match="activations='int4': expected one of fp32, int16, int8"):
        native.int_linear(*args, activations="int4")


@pytest.mark.parametrize("act", ["fp32", "int16", "int8"])
def test_bound_call_equals_int_linear(kernel, act):
    """BoundIntLinear (arguments bound once) gives int_linear's bits, from any thread and for any x it meets."""
    t = stored(40, 256, 4, 64)
    args = (t["qweight"], t["scales"], t["zeros"], 4, 64, 256)
    bound = native.BoundIntLinear(*args, activations=act)
    for x in (torch.randn(1, 256), torch.randn(3, 256), torch.randn(9, 256), torch.randn(2, 300)[:, :256],
              torch.randn(1, 256).bfloat16()):
        assert torch.equal(bound(x), native.int_linear(x, *args, activations=act))
    x = torch.randn(1, 256)
    got = []
    worker = threading.Thread(target=lambda: got.append(bound(x)))
    worker.start()
    worker.join()
    assert torch.equal(got[0], native.int_linear(x, *args, activations=act))
    with pytest.raises(ValueError, match="scales must be"):
        native.BoundIntLinear(t["qweight"], t["scales"][:, :2], t["zeros"], 4, 64, 256)


@pytest.mark.parametrize("act", ["fp32", "int16", "int8"])
def test_rebound_call_is_a_fresh_call_over_the_new_tensors(kernel, act):
    """A spec (a bound call without its tensors) rebound to another weight of the same layout multiplies that
    weight with the bits of a call bound to it from scratch, alone and as a pair; the spec itself reaches no
    kernel, and tensors of another layout are refused."""
    a, b, c = (stored(40, 256, 4, 64, seed=s) for s in (1, 2, 3))
    spec = native.BoundIntLinear(a["qweight"], a["scales"], a["zeros"], 4, 64, 256, activations=act).spec()
    assert spec.tensors == () and list(spec._args)[4:7] == [0, 0, 0]
    rebound = [spec.rebound(t["qweight"], t["scales"], t["zeros"]) for t in (b, c)]
    fresh = [native.BoundIntLinear(t["qweight"], t["scales"], t["zeros"], 4, 64, 256, activations=act) for t in (b, c)]
    for x in (torch.randn(1, 256), torch.randn(5, 256)):
        assert torch.equal(rebound[0](x), fresh[0](x))
        for got, want in zip(rebound[0].pair(rebound[1], x), fresh[0].pair(fresh[1], x), strict=True):
            assert torch.equal(got, want)
    assert rebound[0].activations == fresh[0].activations
    with pytest.raises(TypeError):
        spec(torch.randn(1, 256))  # goes to int_linear, which gets no tensors
    d = stored(40, 128, 4, 64)
    with pytest.raises(ValueError, match="rebound: tensors of another layout"):
        spec.rebound(d["qweight"], d["scales"], d["zeros"])
    with pytest.raises(ValueError, match="rebound: tensors of another layout"):
        spec.rebound(b["qweight"], b["scales"].float(), b["zeros"])


@pytest.mark.parametrize("act", ["fp32", "int16", "int8"])
@pytest.mark.parametrize("m", [1, 3, 9])
def test_pair_call_equals_two_calls(kernel, act, m):
    """BoundIntLinear.pair (gate and up in one call) gives the bits of two separate calls, for decode and
    prefill rows; a pair that cannot share (other widths of x) falls back to two calls, whose checks apply."""
    a, b = stored(40, 256, 4, 64, seed=1), stored(56, 256, 4, 64, seed=2)
    bound = [native.BoundIntLinear(t["qweight"], t["scales"], t["zeros"], 4, 64, 256, activations=act)
             for t in (a, b)]
    x = torch.randn(m, 256)
    ya, yb = bound[0].pair(bound[1], x)
    assert torch.equal(ya, bound[0](x)) and torch.equal(yb, bound[1](x))
    c = stored(8, 128, 4, 64, seed=3)
    other = native.BoundIntLinear(c["qweight"], c["scales"], c["zeros"], 4, 64, 128)
    with pytest.raises(ValueError, match=r"x must be a cpu tensor \[M, 128\]"):
        bound[0].pair(other, x)  # another input width: two calls, and x does not fit the second


# -- RMSNorm (rms_norm.c) --------------------------------------------------------------------------------------
def torch_rms_norm(x, weight, eps):
    """transformers' RMSNorm: fp32 statistics, rounded to x's dtype, times the weight in that dtype."""
    return weight * torch.nn.functional.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


@pytest.mark.parametrize("cols", [1000, 1024, 7])
def test_rms_norm_is_transformers_rms_norm(kernel, cols):
    """bf16: the same bits as torch (every rounding matches; the fp32 sum of squares is far below a bf16 step);
    fp32: equal up to the order of the sum of squares."""
    gen = torch.Generator().manual_seed(cols)
    for dt in (torch.bfloat16, torch.float32):
        w = torch.randn(cols, generator=gen).to(dt)
        x = (torch.randn(3, 5, cols, generator=gen) * 3).to(dt)
        got, want = native.rms_norm(x, w, 1e-6), torch_rms_norm(x, w, 1e-6)
        assert got.shape == x.shape and got.dtype == dt
        if dt is torch.bfloat16:
            assert torch.equal(got, want)
        else:
            assert torch.allclose(got, want, rtol=1e-6, atol=1e-6)


def test_rms_norm_declines_what_it_does_not_take(kernel):
    x, w = torch.randn(2, 64), torch.randn(64)
    assert native.rms_norm(x, w.bfloat16(), 1e-6) is None  # weight of another dtype
    assert native.rms_norm(x.half(), w.half(), 1e-6) is None  # fp16
    assert native.rms_norm(torch.randn(native.RMS_NORM_MAX_ROWS + 1, 64), w, 1e-6) is None  # a long prompt: torch
    assert native.rms_norm(torch.randn(64, 2).t(), torch.randn(2), 1e-6) is None  # not contiguous
    assert native.rms_norm(x.requires_grad_(), w, 1e-6) is None  # autograd needs torch's ops


def test_rms_norm_module_uses_the_kernel_and_falls_back(kernel, monkeypatch):
    from prism_load.models import layers

    norm = layers.RMSNorm(64, 1e-5).bfloat16()
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(1, 1, 64).bfloat16()
    calls = []
    real = native.rms_norm
    monkeypatch.setattr(native, "rms_norm", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        fast = norm(x)
        monkeypatch.setattr(native, "rms_norm", lambda *a: None)
        slow = norm(x)
    assert calls == [1] and torch.equal(fast, slow)


# -- the softmax top-k router (router_topk.c) ------------------------------------------------------------------
@pytest.mark.parametrize("experts, k, hidden", [(8, 2, 1024), (64, 8, 100), (128, 1, 7)])
@pytest.mark.parametrize("renormalise", [True, False])
def test_router_topk_is_the_routers_softmax_top_k(kernel, experts, k, hidden, renormalise):
    """The same experts as torch's softmax -> topk (in descending order of probability), their weights and the
    logits equal up to fp32 summation order, renormalised or not."""
    gen = torch.Generator().manual_seed(experts + k)
    for _ in range(20):
        x, w = torch.randn(1, hidden, generator=gen), torch.randn(experts, hidden, generator=gen)
        logits, indices, weights = native.router_topk(x, w, k, renormalise)
        want_logits = x @ w.T
        probs = torch.softmax(want_logits, dim=-1)
        want_w, want_i = torch.topk(probs, k, dim=-1)
        if renormalise:
            want_w = want_w / want_w.sum(-1, keepdim=True)
        # logits of |x| |w| ~ hidden differ by ~1e-7 of that (summation order); a probability moves with e^logit
        bound = 1e-6 * x.norm() * w.norm(dim=1)
        assert ((logits - want_logits).abs() <= bound).all()
        assert torch.equal(indices, want_i)
        assert torch.allclose(weights, want_w, rtol=2 * bound.max().item(), atol=1e-7)


def test_router_topk_routes_each_row_of_a_batch_as_that_row_alone(kernel):
    """A batch's rows (a decode batch, a short prompt) are routed one C call each: every row's logits, experts and
    weights the same bits as the single-row call gives it, so a row's experts do not depend on its batch."""
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(8, 96, generator=gen)
    for rows in (2, 5, native.ROUTER_ROWS):
        x = torch.randn(rows, 96, generator=gen)
        logits, indices, weights = native.router_topk(x, w, 2, True)
        assert logits.shape == (rows, 8) and indices.shape == weights.shape == (rows, 2)
        for r in range(rows):
            one = native.router_topk(x[r : r + 1], w, 2, True)
            assert all(torch.equal(a[r : r + 1], b) for a, b in zip((logits, indices, weights), one))


def test_router_topk_ties_go_to_the_lower_index_and_it_declines_what_it_does_not_take(kernel):
    x, w = torch.ones(1, 16), torch.zeros(6, 16)
    w[3] = w[1] = 1.0  # experts 1 and 3 tie at the top
    _, indices, weights = native.router_topk(x, w, 3, True)
    assert indices.tolist() == [[1, 3, 0]] and torch.allclose(weights.sum(), torch.tensor(1.0))
    rows = native.ROUTER_ROWS
    assert native.router_topk(torch.ones(rows + 1, 16), w, 2, True) is None  # more rows than a decode batch: torch
    assert native.router_topk(x.bfloat16(), w.bfloat16(), 2, True) is None  # bf16: torch
    assert native.router_topk(x, w, 7, True) is None  # k > experts
    assert native.router_topk(x.requires_grad_(), w, 2, True) is None  # autograd: torch
