"""expert_block.c: a decode token's routed experts in one native call equal the experts computed one by one
with the same kernels (gate and up products, fp32 SwiGLU, the down product of its rounded input, the weighted
sum); the same bits on one and two threads; experts of mixed widths; projections stored int + low-rank (the
base through the same kernel, each factor's product as its own kernel computes it); what it refuses; and
MoEBlock using it only where every chosen expert is a native block."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from prism_load import native
from prism_load.container.codecs import LowRankLinear, decode
from prism_load.container.format import Encoding
from prism_load.container.reader import ConcatLinear
from prism_load.native.expert_block import BlockOps, LowRankBound, block_ops, expert_block, expert_rows
from tests.test_native_kernels import stored

H, INTER = 256, 384


def bound(n, k, bits, g, seed, act):
    t = stored(n, k, bits, g, seed=seed)
    return native.BoundIntLinear(t["qweight"], t["scales"], t["zeros"], bits, g, k, activations=act)


def lowrank(n, k, rank, seed, act, bits=2, g=64, factor_bits=8, base=True):
    """A projection stored int + low-rank: a `bits` base [n, k] (base=False: none, kind lowrank) and factors
    b [rank, k], a [n, rank] of factor_bits, bound to the block's integer kernel where it takes them (else the
    exact one, as for a narrow a)."""
    return LowRankBound(bound(n, k, bits, g, seed, act) if base else None,
                        bound(rank, k, factor_bits, g, seed + 100, act), bound(n, rank, factor_bits, rank, seed + 200, act))


def dequantised(op: native.BoundIntLinear) -> torch.Tensor:
    q, s, z = op.tensors
    t = {"qweight": q, "scales": s, "zeros": z}
    return decode(Encoding("int", (op.n, op.k), bits=op.bits, group_size=op.group_size), t).double()


def apply(op, x):
    """One projection as the block computes it: a plain one by its kernel; a composite's base by its kernel plus
    a(b(x)), each factor by its own kernel (the block runs a factor on its integer tiles where they take it, as a
    single call does, else on the exact kernel)."""
    if isinstance(op, LowRankBound):
        base, b, a = op.keep
        return a(b(x)).double() + (0 if base is None else base(x).double())
    return op(x).double()


def exact_correction(op, x):
    """a (b x) in fp64 on the dequantised factors: what the correction approximates."""
    _, b, a = op.keep
    return (x.double() @ dequantised(b).T) @ dequantised(a).T


class Op:
    """An operator exposing its bound kernel as PackedLinear does."""

    def __init__(self, b):
        self.b = b

    def native_bound(self):
        return self.b

    def __call__(self, x):
        return self.b(x).to(x.dtype)


def expert(seed, act, bits=(4, 4, 4), g=64, hidden=INTER):
    return BlockOps(bound(hidden, H, bits[0], g, seed, act), bound(hidden, H, bits[1], g, seed + 1, act),
                    bound(H, hidden, bits[2], g, seed + 2, act))


def one_by_one(x, experts, weights):
    """What MoEBlock computed before: each expert's products by single kernel calls, SwiGLU in fp32."""
    out = torch.zeros(1, H, dtype=torch.float64)
    for b, w in zip(experts, weights.tolist()):
        gate, up, down = b.keep
        h = (F.silu(apply(gate, x)) * apply(up, x)).float()
        out += w * apply(down, h)
    return out


def rows_as_alone_on_one_and_two_threads(x, experts, rows, weights) -> list[torch.Tensor]:
    """expert_rows of the batch (rows[b]: the indices into experts of row b's route) on one and on two threads,
    each row checked bit for bit against expert_block on that row alone; the two outputs."""
    outs = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out = expert_rows(x, [[experts[e] for e in r] for r in rows], weights)
            for b, r in enumerate(rows):
                alone = expert_block(x[b : b + 1], [experts[e] for e in r], weights[b])
                assert torch.equal(out[b : b + 1], alone), f"row {b}, {threads} threads"
            outs.append(out)
    finally:
        torch.set_num_threads(before)
    return outs


def close(a, b, tol=2e-6):
    err = (a.double() - b.double()).norm() / b.double().norm()
    assert err < tol, f"relative error {err:.3g}"


@pytest.mark.parametrize("act", ["int16", "int8"])
@pytest.mark.parametrize("count", [1, 2, 8])
def test_block_equals_the_experts_one_by_one(q8, act, count):
    experts = [expert(10 * e, act) for e in range(count)]
    x = torch.randn(1, H)
    weights = torch.softmax(torch.randn(count), 0)
    close(expert_block(x, experts, weights), one_by_one(x, experts, weights))


def test_mixed_widths_and_group_sizes(q8):
    """Experts of different bits (gate and up rounded apart where they differ) and intermediate widths."""
    experts = [expert(0, "int16", bits=(4, 2, 8)), expert(5, "int16", bits=(8, 8, 2), g=128, hidden=512),
               expert(9, "int16", bits=(2, 2, 4), g=256)]
    x = torch.randn(1, H)
    weights = torch.tensor([0.5, 0.3, 0.2])
    close(expert_block(x, experts, weights), one_by_one(x, experts, weights))


def test_same_bits_on_one_and_two_threads(q8):
    experts = [expert(e, "int16") for e in range(4)]
    x, weights = torch.randn(1, H), torch.rand(4)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = expert_block(x, experts, weights)
        torch.set_num_threads(2)
        two = expert_block(x, experts, weights)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


def test_bf16_x_and_weights_are_widened(q8):
    experts = [expert(0, "int16"), expert(3, "int16")]
    x, weights = torch.randn(1, H).bfloat16(), torch.tensor([[0.7, 0.3]]).bfloat16()
    assert torch.equal(expert_block(x, experts, weights), expert_block(x.float(), experts, weights.float()))


def test_refusals_say_what_is_wrong(q8):
    a, b = expert(0, "int16"), expert(3, "int8")
    with pytest.raises(ValueError, match="one activation rounding"):
        expert_block(torch.randn(1, H), [a, b], torch.rand(2))
    with pytest.raises(ValueError, match="one row of 256"):
        expert_block(torch.randn(2, H), [a], torch.rand(1))
    with pytest.raises(ValueError, match="1 experts but 2 weights"):
        expert_block(torch.randn(1, H), [a], torch.rand(2))
    # operators that are not a native integer block: the exact kernel, a plain tensor, mismatched shapes
    exact = bound(INTER, H, 4, 64, 0, "fp32")
    assert block_ops(Op(exact), Op(exact), Op(bound(H, INTER, 4, 64, 1, "fp32"))) is None
    assert block_ops(torch.zeros(INTER, H), Op(bound(INTER, H, 4, 64, 0, "int16")), Op(bound(H, INTER, 4, 64, 1, "int16"))) is None
    assert block_ops(Op(bound(INTER, H, 4, 64, 0, "int16")), Op(bound(INTER, H, 4, 64, 1, "int16")),
                     Op(bound(H, 512, 4, 64, 2, "int16"))) is None
    assert block_ops(Op(bound(INTER, H, 4, 64, 0, "int16")), Op(bound(INTER, H, 4, 64, 1, "int8")),
                     Op(bound(H, INTER, 4, 64, 2, "int16"))) is None


@pytest.mark.parametrize("act", ["int16", "int8"])
@pytest.mark.parametrize("where", ["gate", "up", "down", "all", "down-no-base", "all-no-base"])
def test_int_plus_lowrank_projections_add_their_correction(q8, act, where):
    """A projection stored int + low-rank in any of the three places, beside plain experts: the base through the
    integer tiles as a plain projection, plus a(b(x)), each factor's product as a single call of its kernel gives
    it (the integer tiles where they take it, the exact kernel for the narrow a), within that kernel's rounding of
    the exact correction (rank 8 and 12, int8 and int4 factors, so the correction is far above the tolerance:
    the test fails without it)."""
    base = not where.endswith("no-base")  # without: kind lowrank, the correction is the projection

    def composite(n, k, seed, rank):
        return lowrank(n, k, rank, seed, act, bits=4, factor_bits=8 if rank == 8 else 4, base=base)

    gate = composite(INTER, H, 1, 8) if where in ("gate", "all", "all-no-base") else bound(INTER, H, 4, 64, 1, act)
    up = composite(INTER, H, 2, 12) if where in ("up", "all", "all-no-base") else bound(INTER, H, 4, 64, 2, act)
    down = composite(H, INTER, 3, 8) if where.startswith(("down", "all")) else bound(H, INTER, 8, 64, 3, act)
    mixed = BlockOps(gate, up, down, act)
    experts = [expert(20, act), mixed, expert(30, act, bits=(8, 8, 4))]
    x = torch.randn(1, H, generator=torch.Generator().manual_seed(0))
    weights = torch.tensor([0.2, 0.5, 0.3])
    got = expert_block(x, experts, weights)
    close(got, one_by_one(x, experts, weights))
    # each factor's product is within its kernel's rounding of the exact one
    for op in (gate, up):
        if isinstance(op, LowRankBound):
            correction = apply(op, x) - (0 if op.keep[0] is None else op.keep[0](x).double())
            close(correction, exact_correction(op, x), tol=2e-2 if act == "int8" else 1e-3)
    if base:  # the correction matters: the bases alone are far off
        plain = BlockOps(*(op.keep[0] if isinstance(op, LowRankBound) else op for op in (gate, up, down)))
        err = (expert_block(x, [experts[0], plain, experts[2]], weights).double() - got.double()).norm() / got.double().norm()
        assert err > 1e-3


def test_int_plus_lowrank_rows_and_threads_give_the_same_bits(q8):
    """A batch whose rows share composite experts (with bases and without): each row's output equals expert_block
    on that row alone, bit for bit, on one and two threads (every output of the correction summed by one thread in a fixed order)."""
    composite = BlockOps(lowrank(INTER, H, 8, 1, "int16"), bound(INTER, H, 4, 64, 2, "int16"),
                         lowrank(H, INTER, 12, 3, "int16", bits=4))
    alone = BlockOps(bound(INTER, H, 4, 64, 4, "int16"), lowrank(INTER, H, 8, 5, "int16", base=False),
                     lowrank(H, INTER, 12, 6, "int16", base=False))  # kind lowrank: no bases
    experts = [composite, expert(10, "int16"), alone]
    x = torch.randn(4, H, generator=torch.Generator().manual_seed(1))
    rows = [[0, 1], [2, 0], [1, 2], [0, 2]]
    weights = torch.rand(4, 2, generator=torch.Generator().manual_seed(2))
    one, two = rows_as_alone_on_one_and_two_threads(x, experts, rows, weights)
    assert torch.equal(one, two)


def test_lowrank_operators_become_native_blocks_only_with_a_native_base_and_factors(q8):
    """block_ops takes a LowRankLinear over native operators (native_parts; without a base too, kind lowrank) and
    declines one whose base is no native operator, with a tensor factor (bf16 factors), or whose factors do not
    chain; the C side checks the factors' shapes too (a corrupted composite is refused, not read out of bounds)."""
    g, u = Op(bound(INTER, H, 4, 64, 1, "int16")), Op(bound(INTER, H, 4, 64, 2, "int16"))
    base, b, a = bound(H, INTER, 2, 64, 3, "int16"), bound(8, INTER, 8, 64, 4, "fp32"), bound(H, 8, 8, 8, 5, "fp32")
    block = block_ops(g, u, LowRankLinear(Op(a), Op(b), Op(base)))
    assert block is not None and isinstance(block.keep[2], LowRankBound)
    alone = block_ops(g, u, LowRankLinear(Op(a), Op(b)))  # no base (kind lowrank): the correction alone
    assert alone is not None and alone.keep[2].keep[0] is None and alone.wide == block.wide
    assert block_ops(g, u, LowRankLinear(Op(a), Op(b), torch.zeros(H, INTER))) is None  # a base of no kernel
    assert block_ops(g, u, LowRankLinear(torch.zeros(H, 8), Op(b), Op(base))) is None
    assert block_ops(g, u, LowRankLinear(Op(bound(H, 4, 8, 4, 6, "fp32")), Op(b), Op(base))) is None
    with pytest.raises(ValueError, match="factors must chain"):
        LowRankBound(base, b, bound(H, 4, 8, 4, 6, "fp32"))
    bad = block_ops(g, u, LowRankLinear(Op(a), Op(b), Op(base)))
    bad.keep[2]._args[native._ARGS + 3] = INTER + 1  # b's K no longer the projection's input width
    with pytest.raises(ValueError, match=r"expert_block rejected its arguments \(code -2\)"):
        expert_block(torch.randn(1, H), [bad], torch.ones(1))


@pytest.mark.parametrize("act", ["int16", "int8"])
@pytest.mark.parametrize("batch", [1, 3, 8])
def test_rows_of_a_batch_get_each_rows_bits(q8, act, batch):
    """expert_rows on a batch whose rows share experts (top-2 of 4, and one row's order reversed): every row equals
    expert_block on that row alone, bit for bit, on one and two threads; an expert used by several rows is one
    product of those rows."""
    experts = [expert(10 * e, act, bits=(4, 4, 8) if e == 2 else (4, 4, 4)) for e in range(4)]
    gen = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, H, generator=gen)
    rows = [[(b + j) % 4 for j in range(2)] for b in range(batch)]
    rows[0].reverse()
    weights = torch.rand(batch, 2, generator=gen)
    rows_as_alone_on_one_and_two_threads(x, experts, rows, weights)


def test_rows_refusals_say_what_is_wrong(q8):
    a, b, c = expert(0, "int16"), expert(3, "int16"), expert(6, "int8")
    with pytest.raises(ValueError, match="one rounding"):
        expert_rows(torch.randn(2, H), [[a, b], [a, c]], torch.rand(2, 2))
    with pytest.raises(ValueError, match="twice in one row"):
        expert_rows(torch.randn(1, H), [[a, a]], torch.rand(1, 2))
    with pytest.raises(ValueError, match="rows of 1 to"):
        expert_rows(torch.randn(2, H), [[a, b], [a]], torch.rand(2, 2))
    with pytest.raises(ValueError, match=r"x must be \[2, 256\]"):
        expert_rows(torch.randn(3, H), [[a], [b]], torch.rand(2, 1))
    with pytest.raises(ValueError, match=r"weights must be \[2, 1\]"):
        expert_rows(torch.randn(2, H), [[a], [b]], torch.rand(2, 2))


def native_moe_block():
    """(MoEBlock, its router, its experts): four native int16 experts top-2, served as ExpertWeights over Ops."""
    from prism_load.models import moe

    torch.manual_seed(0)
    experts = [expert(10 * e, "int16") for e in range(4)]

    class Source:
        num_experts = 4

        def acquire(self, layer, ids):
            return {e: moe.ExpertWeights(ConcatLinear([Op(experts[e].keep[0]), Op(experts[e].keep[1])]),
                                         Op(experts[e].keep[2])) for e in ids}

    router = moe.SoftmaxTopKRouter(H, 4, 2, norm_topk_prob=True)
    torch.nn.init.normal_(router.weight)
    return moe.MoEBlock(0, router, Source()), router, experts


def test_moe_block_uses_it_only_for_native_blocks(q8, monkeypatch):
    """MoEBlock's decode step calls expert_block when every chosen expert is a native block, and gives what
    the one-by-one path gives (within the SwiGLU's and the sum's fp32-vs-bf16 rounding); with an observer, or
    experts that are tensors, it takes the one-by-one path."""
    from prism_load.models import moe

    block, router, experts = native_moe_block()
    calls = []
    real = moe.expert_block
    monkeypatch.setattr(moe, "expert_block", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(1, 1, H)
    fused = block(x)
    assert calls == [1]
    route = router(x.reshape(1, H))
    ref = one_by_one(x.reshape(1, H), [experts[e] for e in route.indices[0].tolist()], route.weights[0])
    close(fused.reshape(1, H), ref)
    block.observer = type("Watch", (), {"on_route": lambda *a: None, "on_expert": lambda *a: None})()
    block(x)
    assert calls == [1]
    block.observer = None
    block.activation = lambda gate, up: torch.clamp(gate, max=7.0) * up  # not SwiGLU (GPT-OSS clamps): no block
    block(x)
    assert calls == [1]


def test_moe_block_runs_a_batchs_experts_in_one_call(q8, monkeypatch):
    """MoEBlock on a few routed rows (a decode batch) calls expert_rows once, and each row gets what the block gives
    that row routed alone (expert_block's bits; the router's own bits differ with the row count, so both take one
    routing); more rows than the limit, or an observer, take the torch-op path, which agrees within the SwiGLU's and
    the sum's rounding."""
    from prism_load.models import moe

    block, router, experts = native_moe_block()
    calls = []
    real = moe.expert_rows
    monkeypatch.setattr(moe, "expert_rows", lambda *a: calls.append(len(a[1])) or real(*a))
    x = torch.randn(5, H)
    route = router(x)
    assert len(set(route.indices.reshape(-1).tolist())) > 2  # the rows share some experts, not all
    batch = block.after_route(x, route)
    assert calls == [5]
    for t in range(5):
        alone = moe.RouterOutput(route.logits[t : t + 1], route.indices[t : t + 1], route.weights[t : t + 1])
        assert torch.equal(batch[t : t + 1], block.after_route(x[t : t + 1], alone)), f"row {t}"
    assert calls == [5]  # single rows: expert_block
    monkeypatch.setattr(moe, "BATCH_ROWS", 4)
    by_ops = block.after_route(x, route)
    assert calls == [5]
    close(by_ops, batch, tol=1e-5)
    monkeypatch.setattr(moe, "BATCH_ROWS", 16)
    block.observer = type("Watch", (), {"on_route": lambda *a: None, "on_expert": lambda *a: None})()
    assert torch.equal(block.after_route(x, route), by_ops)
    assert calls == [5]
