"""The packed fast tier (prism_load/packed.py): each kernel against the fp32 dequantised matmul, the memory a
packed model holds (the container's bytes), the budget in packed bytes, reads straight into the cache's
slabs, the fallback warning, and whole-model agreement with the decoded fp32 reference."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch
from containers import EXACT_MIX, TINY_CONFIG, make_encoding, random_model, rtn, write_tiny
from runtime_fixtures import CountingFetches, greedy, load_cached, prompts

import prism_load
from prism_load import packed
from prism_load.container.codecs import decode
from prism_load.container.format import Encoding
from prism_load.container.reader import Container
from prism_load.runtime.cache import footprint
from prism_load.runtime.stores import weights_nbytes, weights_tensors
from prism_load.runtime.tiers import Slab

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# rows a multiple of 16, columns a multiple of 32: shapes torch's int4 kernel takes
KERNEL_CONFIG = dict(TINY_CONFIG, hidden_size=64, intermediate_size=96, num_local_experts=4)
INT4_G32 = [dict(kind="int", bits=4, group_size=32)]


def stored(shape, bits, group_size, seed=0):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    return Encoding("int", shape, bits=bits, group_size=group_size), rtn(w, bits, group_size)


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


CASES = [((48, 96), 4, 32), ((64, 192), 4, 128), ((32, 72), 2, 16), ((48, 40), 3, 8), ((16, 100), 5, 32),
         ((32, 64), 6, 64), ((24, 50), 8, 16)]


@pytest.mark.parametrize("shape, bits, group_size", CASES)
def test_dequant_kernel_is_the_decoded_weight(shape, bits, group_size):
    """The dequant backend multiplies by exactly the decoded weight (fp32: bit for bit)."""
    enc, t = stored(shape, bits, group_size)
    op = packed.pack_int(enc, t, "dequant")
    x = torch.randn(3, shape[1])
    assert torch.equal(op.weight(), decode(enc, t))
    assert torch.equal(op(x), torch.nn.functional.linear(x, decode(enc, t)))
    assert all(a.data_ptr() == b.data_ptr() for a, b in zip(op.tensors, (t["qweight"], t["scales"], t["zeros"])))


@pytest.mark.parametrize("shape, bits, group_size", [c for c in CASES if c[1] <= 4 and c[0][0] % 16 == 0])
def test_int4pack_kernel_matches_the_fp32_matmul(shape, bits, group_size):
    """torch's int4 kernel on repacked codes: within bf16 rounding (bf16 activations, bf16 scale/zero pairs)
    of x @ decode()^T in fp32, for any group size it can split the stored groups into."""
    enc, t = stored(shape, bits, group_size)
    if packed.int4pack_group(shape, group_size) is None:
        pytest.skip("no exact group size for this shape")
    op = packed.pack_int(enc, t, "int4pack")
    x = torch.randn(5, shape[1])
    assert rel_error(op(x.bfloat16()), x @ decode(enc, t).t()) < 2e-2


def test_int4pack_group_sizes():
    assert packed.int4pack_group((768, 192), 128) == 64  # 192 = 128 + a partial 64: groups of 64, exactly
    assert packed.int4pack_group((768, 256), 128) == 128
    assert packed.int4pack_group((40, 256), 128) is None  # rows not a multiple of 16
    assert packed.int4pack_group((64, 100), 128) is None  # no supported group divides 100
    assert packed.int4pack_group((64, 96), 16) is None  # groups under 32: the kernel has none


@pytest.mark.skipif(not packed.native_available(), reason=f"native kernel: {packed.native_unavailable_reason()}")
@pytest.mark.parametrize("shape, bits, group_size", CASES)
@pytest.mark.parametrize("rows", [1, 7])
def test_native_kernel_matches_the_fp32_matmul(shape, bits, group_size, rows):
    """The native kernel reads 2-, 4- and 8-bit tensors as stored (views), others widened once; fp32 inside."""
    enc, t = stored(shape, bits, group_size)
    op = packed.pack_int(enc, t, "native")
    x = torch.randn(rows, shape[1])
    assert rel_error(op(x), x @ decode(enc, t).t()) < 1e-5
    assert (op.tensors[0].data_ptr() == t["qweight"].data_ptr()) == (bits in (2, 4, 8))


def test_choose_backend_prefers_the_request_then_the_fastest(monkeypatch):
    monkeypatch.setattr(packed, "native_available", lambda: False)
    cpu = torch.device("cpu")
    int4, int6 = Encoding("int", (64, 64), bits=4, group_size=32), Encoding("int", (64, 64), bits=6, group_size=32)
    assert packed.choose_backend(int4, torch.bfloat16, cpu) == "int4pack"
    assert packed.choose_backend(int4, torch.float32, cpu) == "dequant"  # the int4 kernel takes bf16 only
    assert packed.choose_backend(int6, torch.bfloat16, cpu) == "dequant"
    assert packed.choose_backend(int4, torch.bfloat16, cpu, "dequant") == "dequant"
    assert packed.choose_backend(int6, torch.bfloat16, cpu, "int4pack") == "dequant"  # cannot: falls back
    assert packed.choose_backend(int4, torch.bfloat16, torch.device("meta")) == "dequant"  # not a CPU
    with pytest.raises(ValueError, match="expert_kernel='fast'"):
        packed.choose_backend(int4, torch.bfloat16, cpu, "fast")


@pytest.fixture(scope="module")
def int4_container(tmp_path_factory):
    model = random_model(KERNEL_CONFIG)
    return write_tiny(tmp_path_factory.mktemp("packed") / "m.prism", model, config=KERNEL_CONFIG, mix=INT4_G32)


def expert_records(path):
    with Container(path) as c:
        return list(c.records)


@pytest.mark.parametrize("kernel", ["auto", "dequant"])
def test_resident_packed_model_holds_the_containers_bytes(int4_container, kernel):
    """Experts read as stored are views of their read buffer: the model's expert tensors are exactly the
    container's expert bytes, nothing decoded beside them."""
    model = prism_load.load(int4_container, expert_kernel=kernel)
    held = {}
    for _, block in model.moe_blocks():
        for w in block.experts.experts:
            for t in weights_tensors(w):
                held[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    if kernel == "dequant" or packed.native_available():
        assert sum(held.values()) == sum(r.length for r in expert_records(int4_container))
    else:  # int4pack repacks: the same bits a weight, its scale/zero pairs in bf16
        assert sum(held.values()) <= 1.05 * sum(r.length for r in expert_records(int4_container))


def test_packed_logits_track_the_decoded_fp32_reference(int4_container):
    """fp32 packed (dequant) is the decoded model bit for bit. The default (bf16 weights computing in fp32)
    stays far closer to fp32 than bf16 arithmetic does; with bf16 activations, packed adds little to what bf16
    arithmetic costs anyway (the decoded bf16 model's divergence; this random model's logits are large)."""
    reference = prism_load.load(int4_container, dtype=torch.float32, expert_form="decoded")
    fp32 = prism_load.load(int4_container, dtype=torch.float32, expert_kernel="dequant")
    ids = torch.randint(0, KERNEL_CONFIG["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = reference(ids)
        assert torch.equal(fp32(ids), ref)

    def kl(model, dtype=torch.bfloat16):
        with torch.no_grad():
            out = model(ids)
        assert out.dtype == dtype
        return float(torch.nn.functional.kl_div(out.float().log_softmax(-1), ref.log_softmax(-1), log_target=True,
                                                reduction="batchmean"))

    bf16 = torch.bfloat16
    bf16_decoded = kl(prism_load.load(int4_container, expert_form="decoded", compute_dtype=bf16))
    for kernel in ("auto", "int4pack", "dequant"):
        assert kl(prism_load.load(int4_container, expert_kernel=kernel, compute_dtype=bf16)) < 1.25 * bf16_decoded + 1e-4
    # this container stores its dense weights in fp32, so the default's bf16 weights cost something here (a
    # real checkpoint's are bf16 already); int4pack rounds x to bf16 inside, whatever the model computes in
    for kernel in ("auto", "dequant"):
        assert kl(prism_load.load(int4_container, expert_kernel=kernel), torch.float32) < 0.1 * bf16_decoded


def test_low_rank_operators_kept_factored_over_int_parts_are_read_as_stored(q8):
    """An expert whose projections are int + low-rank (or low-rank kept factored) with int factors is used as
    stored, so a cache reads it straight into its slab (and the native miss path may read it); bf16 factors are
    converted copies and a rank too large to keep factored is decoded dense: those are not."""
    packer = packed.ExpertPacker(torch.bfloat16, "cpu")

    def stored_form(**spec):
        return packer.reads_stored_form({"gate_proj": make_encoding(dict(kind="int", bits=4, group_size=32), (64, 96)),
                                         "down_proj": make_encoding(spec, (96, 64))})

    assert stored_form(kind="int+lowrank", bits=4, group_size=32, rank=8, factor_bits=8)
    assert stored_form(kind="lowrank", rank=8, factor_bits=4, group_size=32)
    assert not stored_form(kind="int+lowrank", bits=4, group_size=32, rank=8, factor_bits=16)
    assert not stored_form(kind="lowrank", rank="dense", factor_bits=4, group_size=8)
    assert not stored_form(kind="bf16")


def test_cache_budget_counts_packed_bytes_and_reads_into_slabs(int4_container):
    """'100%' is every expert's packed bytes (the container's, for experts read as stored); a miss is one
    read into a slab (no fetch-then-decode); a 50% cache gives the packed resident model's tokens."""
    records = expert_records(int4_container)
    full = load_cached(int4_container, "100%", prefetch=False, expert_kernel="dequant")
    assert full.stats()["expert_bytes_total"] == sum(footprint(r.length) for r in records)
    model = load_cached(int4_container, "50%", prefetch=False, expert_kernel="dequant")
    resident = prism_load.load(int4_container, expert_kernel="dequant")
    store = model.runtime.cache.store
    assert all(store.reads_into(r.layer, r.expert) for r in records)
    fetched = CountingFetches(store)
    store.fetch = lambda *key: pytest.fail("a packed expert read as stored needs no fetch-then-decode")
    for ids in prompts(3, KERNEL_CONFIG["vocab_size"], seed=2):
        assert torch.equal(greedy(model, ids, 8), greedy(resident, ids, 8))
    s = model.stats()
    assert s["loads"] == len(fetched.calls) > 0 and s["bytes_fetched"] == fetched.bytes()
    assert s["residency"]["reserved_bytes"] <= model.runtime.cache.budget_bytes
    model.runtime.cache.check()


@pytest.mark.parametrize("kernel", ["auto", "native", "dequant"])
def test_read_into_views_the_same_tensors_as_a_decode(tmp_path, kernel):
    """read_into builds an expert's operators once (on meta) and then only views each miss's buffer; what it
    returns must be what decoding the same bytes builds: same operators, backends, dtypes, shapes, strides
    and bytes, and views of the buffer itself. Experts it cannot serve so (widened codes) decode as before."""
    mix = [dict(kind="int", bits=b, group_size=g) for b, g in ((4, 32), (2, 16), (8, 32), (3, 32))]
    path = write_tiny(tmp_path / "m.prism", model=random_model(KERNEL_CONFIG), config=KERNEL_CONFIG, mix=mix)
    store = load_cached(path, "50%", prefetch=False, expert_kernel=kernel).runtime.cache.store
    served = 0
    for r in expert_records(path):
        if not store.reads_into(r.layer, r.expert):
            continue
        for _ in range(2):  # the plan is made on the first read and reused on the second
            buf = torch.empty(r.length, dtype=torch.uint8)
            got = store.read_into(r.layer, r.expert, lambda n, buf=buf: Slab(buf))
            want = store.decode(r.layer, r.expert, buf.clone())
            for a, b in zip(weights_tensors(got), weights_tensors(want), strict=True):
                assert (a.dtype, a.shape, a.stride()) == (b.dtype, b.shape, b.stride())
                assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
                assert a.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()
            assert [op.backend for op in got.gate_up.ops + [got.down]] == [op.backend for op in want.gate_up.ops + [want.down]]
        served += 1
    assert served > 0


def test_read_into_a_slab_reuses_the_operators_of_its_last_expert_of_that_layout(tmp_path):
    """A slab that held an expert of the same layout gives the next one read into it the same operators (their
    views and bound kernel arguments are the slab's): the same objects, now over the new expert's bytes, so they
    multiply as a fresh decode of that expert does. In another slab the views are new and the kernel calls are
    rebound from the layout's first bound call (native.BoundIntLinear.spec), and multiply as a fresh decode does."""
    mix = [dict(kind="int", bits=b, group_size=32) for b in (4, 8)]
    path = write_tiny(tmp_path / "m.prism", model=random_model(KERNEL_CONFIG), config=KERNEL_CONFIG, mix=mix)
    store = load_cached(path, "50%", prefetch=False).runtime.cache.store
    records = [r for r in expert_records(path) if store.reads_into(r.layer, r.expert)]
    by_layout = {}
    for r in records:
        by_layout.setdefault(store._view_plan(r.layer, r.expert)[3], []).append(r)
    first, second = next(rs for rs in by_layout.values() if len(rs) >= 2)[:2]
    slab = Slab(torch.empty(first.length, dtype=torch.uint8))
    a = store.read_into(first.layer, first.expert, lambda n: slab)
    b = store.read_into(second.layer, second.expert, lambda n: slab)
    assert b is a and len(slab.built) == 1
    want = store.decode(second.layer, second.expert, slab.buf.clone())
    gen = torch.Generator().manual_seed(0)
    for got_op, want_op in zip(b.gate_up.ops + [b.down], want.gate_up.ops + [want.down], strict=True):
        x = torch.randn(3, got_op.shape[1], generator=gen)
        assert torch.equal(got_op(x), want_op(x))
    assert not torch.equal(slab.buf, torch.frombuffer(bytearray(store.fetch(first.layer, first.expert).numpy()),
                                                      dtype=torch.uint8))
    # another expert of the layout in a fresh slab: new views, and kernel calls rebound from the spec the layout's
    # first bound call left
    other = Slab(torch.empty(first.length, dtype=torch.uint8))
    c = store.read_into(second.layer, second.expert, lambda n: other)
    assert c is not a
    fresh = store.decode(second.layer, second.expert, other.buf.clone())
    for got_op, want_op, old_op in zip(c.gate_up.ops + [c.down], fresh.gate_up.ops + [fresh.down],
                                       a.gate_up.ops + [a.down], strict=True):
        assert got_op.like is old_op.like and (got_op.backend not in packed.NATIVE or got_op.like[0] is not None)
        x = torch.randn(2, got_op.shape[1], generator=gen)
        assert torch.equal(got_op(x), want_op(x))


@pytest.mark.parametrize("mix", [[dict(kind="int", bits=b, group_size=32) for b in (4, 8)],
                                 [dict(kind="int", bits=4, group_size=32),
                                  dict(kind="int+lowrank", bits=4, group_size=32, rank=8, factor_bits=8)]],
                         ids=["int4-int8", "int4-int+lowrank"])
def test_an_expert_in_another_slab_gets_its_layouts_block_moved(tmp_path, mix):
    """The layout's first expert binds its native block the usual way; a later expert of the layout in another
    slab gets that block moved to its slab (BlockTemplate): the same kernel arguments as binding its own operators
    would give, pointers into its own slab, and the same expert_block output. Its Python operators wait until
    something asks for them (DeferredViews). int+lowrank projections are read as stored and moved too, their
    factors' arrays with them."""
    from prism_load.native.expert_block import (
        BlockOps,
        BlockTemplate,
        LowRankBound,
        expert_block,
        native_projection,
    )
    from prism_load.runtime.stores import DeferredViews

    path = write_tiny(tmp_path / "m.prism", model=random_model(KERNEL_CONFIG), config=KERNEL_CONFIG, mix=mix)
    store = load_cached(path, "50%", prefetch=False).runtime.cache.store
    records = [r for r in expert_records(path) if store.reads_into(r.layer, r.expert)]
    by_layout = {}
    for r in records:
        by_layout.setdefault(store._view_plan(r.layer, r.expert)[3], []).append(r)
    layout, (first, second) = next((k, rs[:2]) for k, rs in by_layout.items() if len(rs) >= 2)
    a = store.read_into(first.layer, first.expert, lambda n: Slab(torch.empty(n, dtype=torch.uint8)))
    if a.block() is None:
        pytest.skip("no native expert block on this machine (the template is for native blocks only)")
    assert isinstance(store._block_templates[layout], BlockTemplate)
    slab = Slab(torch.empty(second.length, dtype=torch.uint8))
    b = store.read_into(second.layer, second.expert, lambda n: slab)
    moved = b.block()
    # its Python operators are not built until asked for (the decode loop needs only the block); its size is known
    assert isinstance(b, DeferredViews) and b._views is None
    assert weights_nbytes(b) == store.nbytes(second.layer, second.expert) and b._views is None
    assert b.gate_up.ops[0].tensors[0].untyped_storage().data_ptr() == slab.buf.untyped_storage().data_ptr()
    assert b._views is not None and b.block() is moved and store.read_into(second.layer, second.expert,
                                                                           lambda n: slab) is b
    bound = BlockOps(*(native_projection(op) for op in (*b.gate_up.ops, b.down)))  # its own operators, bound anew
    assert moved is not bound and moved.wide == bound.wide and moved.hidden == bound.hidden
    composite = [isinstance(op, LowRankBound) for op in bound.keep]
    assert any(composite) == ("int+lowrank" in str(mix))
    got, want = moved.arguments().reshape(3, 3, -1), bound.arguments().reshape(3, 3, -1)
    assert (got[:, 0, 0] == 1).tolist() == (want[:, 0, 0] == 1).tolist() == composite  # the composites' marks
    assert (got[:, :, 3:10] == want[:, :, 3:10]).all()  # K, the three weight pointers, N, bits, group size
    base, end = slab.buf.data_ptr(), slab.buf.data_ptr() + slab.buf.numel()
    arrays = got[[j for j in range(3) for _ in range(3 if composite[j] else 1)],
                 [i for j in range(3) for i in range(3 if composite[j] else 1)]]
    assert ((arrays[:, 4:7] >= base) & (arrays[:, 4:7] < end)).all()
    x = torch.randn(1, moved.hidden, generator=torch.Generator().manual_seed(0))
    w = torch.tensor([0.7])
    assert torch.equal(expert_block(x, [moved], w), expert_block(x, [bound], w))


def test_low_rank_experts_read_as_stored_give_the_resident_logits(q8, tmp_path):
    """Experts with int+lowrank and pure low-rank projections over int factors are read straight into cache slabs
    (their operators views of the slab); behind a cache of 40% they give the resident model's greedy tokens, the
    sizes the cache budgets are the operators' own, and every expert is a native block (composites for both)."""
    mix = [dict(kind="int", bits=4, group_size=32),
           dict(kind="int+lowrank", bits=4, group_size=32, rank=8, factor_bits=8),
           dict(kind="int", bits=8, group_size=32),
           dict(kind="lowrank", rank=8, factor_bits=4, group_size=32)]  # cycled over each expert's three tensors
    path = write_tiny(tmp_path / "m.prism", model=random_model(KERNEL_CONFIG), config=KERNEL_CONFIG, mix=mix)
    cached = load_cached(path, "40%", prefetch=False)
    store = cached.runtime.cache.store
    read = [r for r in expert_records(path) if store.reads_into(r.layer, r.expert)]
    assert len(read) == len(expert_records(path))
    assert {e.kind for r in read for e in r.encodings.values()} == {"int", "int+lowrank", "lowrank"}
    for r in expert_records(path):
        assert weights_nbytes(store.load(r.layer, r.expert)) == store.nbytes(r.layer, r.expert)
    for r in expert_records(path):  # every expert a native block, its low-rank projections composites
        assert store.read_into(r.layer, r.expert, lambda n: Slab(torch.empty(n, dtype=torch.uint8))).block() is not None
    resident = prism_load.load(path)
    for ids in prompts(2, KERNEL_CONFIG["vocab_size"], seed=6):
        assert torch.equal(greedy(cached, ids, 10), greedy(resident, ids, 10))
    assert cached.stats()["misses"] > 0


def test_store_nbytes_is_exact_for_every_encoding(tmp_path):
    """The packed size the cache budgets before loading equals the built operators', for every kind."""
    path = write_tiny(tmp_path / "m.prism", mix=EXACT_MIX)
    model = load_cached(path, "100%", prefetch=False)
    store = model.runtime.cache.store
    for i in store.moe_layers:
        for e in range(store.num_experts):
            assert weights_nbytes(store.load(i, e)) == store.nbytes(i, e)
    resident = prism_load.load(path)
    ids = prompts(1, TINY_CONFIG["vocab_size"], seed=4)[0]
    assert torch.equal(greedy(model, ids, 6), greedy(resident, ids, 6))


@pytest.mark.parametrize("enc", [
    Encoding("int", (48, 96), bits=b, group_size=g) for b, g in ((2, 32), (3, 32), (4, 96), (5, 64), (6, 7), (8, 32))
] + [
    Encoding("int+lowrank", (48, 96), bits=3, group_size=16, rank=4, factor_bits=f) for f in (16, 6)
] + [Encoding("lowrank", (48, 96), rank=4, factor_bits=5, group_size=8), Encoding("bf16", (48, 96))],
    ids=lambda e: e.label() + (f"-f{e.factor_bits}" if e.factor_bits else ""))
def test_held_nbytes_is_what_the_native_form_holds(enc):
    """The runtime price of a candidate (bit_plan's --price runtime) is the bytes of the operator the native
    kernels build from it, widened codes included."""
    if not packed.native_available():
        pytest.skip(packed.native_unavailable_reason())
    from prism_load.runtime.stores import op_tensors

    tensors = {k: torch.empty(shape, dtype=dt, device="meta") for k, (dt, shape) in enc.tensor_specs().items()}
    op = packed.ExpertPacker(torch.bfloat16, "cpu", "native").linear(enc, tensors)
    held = sum(t.numel() * t.element_size() for t in op_tensors(op))
    assert packed.held_nbytes(enc) == held
    assert (held > enc.nbytes()) == any(b in (3, 5, 6) for b in (enc.bits, enc.factor_bits))


def test_a_tensor_without_a_kernel_warns_and_stays_packed(tmp_path, monkeypatch):
    """No native kernel here: int6 has no stock kernel either, so it is dequantised at each use, with a
    warning naming why; an int4/g32 container runs on torch's int4 kernel without one."""
    monkeypatch.setattr(packed, "native_available", lambda: False)
    model = random_model(KERNEL_CONFIG)
    six = write_tiny(tmp_path / "six.prism", model, config=KERNEL_CONFIG, mix=[dict(kind="int", bits=6, group_size=32)])
    with pytest.warns(UserWarning, match=r"24 of 24 packed expert tensors have no kernel here .* dequantised at every use"):
        loaded = prism_load.load(six)
    assert sum(weights_nbytes(w) for _, b in loaded.moe_blocks() for w in b.experts.experts) == \
        sum(r.length for r in expert_records(six))
    four = write_tiny(tmp_path / "four.prism", model, config=KERNEL_CONFIG, mix=INT4_G32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = prism_load.load(four)
    ops = [op for _, b in loaded.moe_blocks() for w in b.experts.experts for op in (*w.gate_up.ops, w.down)]
    assert {op.backend for op in ops} == {"int4pack"}


def test_experts_loaded_under_inference_mode_serve_plain_calls(int4_container):
    """generate() runs under inference_mode, so experts it loads are inference tensors; a later plain call
    (outside no_grad) must still use them: a loaded model's parameters ask autograd for nothing."""
    model = load_cached(int4_container, "25%", prefetch=False)
    assert not any(p.requires_grad for p in model.parameters())
    ids = prompts(1, KERNEL_CONFIG["vocab_size"], seed=7)[0]
    greedy(model, ids, 6)
    assert model(ids).shape == (1, ids.shape[1], KERNEL_CONFIG["vocab_size"])


# -- native-int16 / native-int8: activations rounded per group, integer products ---------------------------------
Q8_CONFIG = dict(TINY_CONFIG, hidden_size=128, intermediate_size=128, num_local_experts=4)
INT4_G64 = [dict(kind="int", bits=4, group_size=64)]


def test_integer_kernels_are_chosen_where_they_take_the_tensor(monkeypatch):
    from prism_load import native

    cpu = torch.device("cpu")
    monkeypatch.setattr(packed, "native_available", lambda: True)
    monkeypatch.setattr(native, "q8_available", lambda: True)
    taken, odd = Encoding("int", (128, 128), bits=4, group_size=64), Encoding("int", (128, 88), bits=4, group_size=64)
    g32, g16 = (Encoding("int", (128, 128), bits=4, group_size=g) for g in (32, 16))
    assert packed.choose_backend(taken, torch.bfloat16, cpu, "native") == "native"
    assert packed.choose_backend(taken, torch.bfloat16, cpu) == "native-int16"  # auto: int16 where it takes it
    assert packed.choose_backend(g16, torch.bfloat16, cpu) == "native"  # ... else the exact kernel
    assert packed.choose_backend(taken, torch.float32, cpu) == "native"  # fp32: the reference arithmetic
    assert packed.choose_backend(taken, torch.bfloat16, torch.device("meta")) == "dequant"  # not a CPU
    for kernel in ("native-int16", "native-int8"):
        assert packed.choose_backend(taken, torch.bfloat16, cpu, kernel) == kernel
        assert packed.choose_backend(odd, torch.bfloat16, cpu, kernel) == "native"  # 88 columns: not whole blocks
        assert packed.choose_backend(g16, torch.bfloat16, cpu, kernel) == "native"  # 8-byte groups
    assert packed.choose_backend(g32, torch.bfloat16, cpu, "native-int16") == "native-int16"  # 16-byte groups
    assert packed.choose_backend(g32, torch.bfloat16, cpu, "native-int8") == "native"  # int8 needs 32 bytes
    monkeypatch.setattr(native, "q8_available", lambda: False)
    assert packed.choose_backend(taken, torch.bfloat16, cpu, "native-int8") == "native"  # no integer kernel here
    assert packed.choose_backend(taken, torch.bfloat16, cpu, "native-int16") == "native"
    assert packed.choose_backend(taken, torch.bfloat16, cpu) == "native"


@pytest.mark.parametrize("kernel, cosine", [("native-int16", 1 - 1e-7), ("native-int8", 0.999)])
def test_integer_kernel_model_keeps_the_packed_bytes_and_tracks_the_exact_kernel(tmp_path, kernel, cosine):
    from prism_load import native

    if not (packed.native_available() and native.q8_available()):
        pytest.skip("the integer-activation kernels do not run here (no native kernels)")
    path = write_tiny(tmp_path / "q8.prism", random_model(Q8_CONFIG), config=Q8_CONFIG, mix=INT4_G64)
    exact, q8 = prism_load.load(path, expert_kernel="native"), prism_load.load(path, expert_kernel=kernel)
    backends = {op.backend for _, block in q8.moe_blocks() for w in block.experts.experts
                for op in (*w.gate_up.ops, w.down)}
    assert backends == {kernel}
    assert sum(weights_nbytes(w) for _, b in q8.moe_blocks() for w in b.experts.experts) == \
        sum(weights_nbytes(w) for _, b in exact.moe_blocks() for w in b.experts.experts)
    ids = torch.randint(0, Q8_CONFIG["vocab_size"], (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cache_a, cache_b = exact.new_cache(), q8.new_cache()
        exact(ids, cache=cache_a), q8(ids, cache=cache_b)
        a, b = exact(ids[:, -1:], cache=cache_a).float(), q8(ids[:, -1:], cache=cache_b).float()  # one decode step
    assert not torch.equal(a, b)  # the activations were rounded: not the exact kernel
    assert torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0) > cosine


# -- dense Linear layers stay packed too ---------------------------------------------------------------------
def dense_int_linears(path) -> set[str]:
    """Module paths of the dense `int` weights the model multiplies with a prism Linear (not the router)."""
    with Container(path) as c:
        dense = c.dense_encoded()
    return {n[: -len(".weight")] for n, (enc, _) in dense.items()
            if enc.kind == "int" and n.endswith(".weight") and ("_proj" in n or n == "lm_head.weight")}


def test_dense_int_linears_stay_packed_and_match_the_decoded_product(int4_container):
    from prism_load.packed import PackedDense

    if not packed.native_available():
        pytest.skip("the native kernel does not run here: dense layers are decoded")
    model = prism_load.load(int4_container, dtype=torch.float32)
    kept = {n for n, m in model.named_modules() if isinstance(m, PackedDense)}
    assert kept and kept == dense_int_linears(int4_container)
    for name in kept:
        assert model.get_submodule(name).op.backend == "native"
        assert f"{name}.weight" not in model.state_dict()  # no decoded copy beside the stored bytes
    with Container(int4_container) as c:  # held: the stored bytes of packed layers, fp32 for the others
        expected = sum(sum(t.numel() * t.element_size() for t in tensors.values())
                       if name.removesuffix(".weight") in kept else math.prod(enc.shape) * 4
                       for name, (enc, tensors) in c.dense_encoded().items())
    assert packed.dense_nbytes(model) == expected
    decoded = prism_load.load(int4_container, dtype=torch.float32, expert_kernel="dequant")
    assert not any(isinstance(m, PackedDense) for m in decoded.modules())  # the dequant reference decodes them
    ids = torch.randint(0, KERNEL_CONFIG["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a, b = model(ids), decoded(ids)
    assert rel_error(a, b) < 1e-5  # fp32 sums in another order: the same product


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="reads Linux's /proc/self/maps")
def test_a_loaded_model_keeps_no_mapping_of_its_dense_shards(int4_container):
    """The dense shards are read through safetensors' memory map; a packed dense layer that kept views of it
    kept the whole mapping, read in full while loading, resident beside the copies (28 MiB of the peer
    benchmark's RSS)."""
    import gc

    if not packed.native_available():
        pytest.skip("the native kernel does not run here: dense layers are decoded")
    from prism_load.packed import PackedDense

    model = prism_load.load(int4_container)
    gc.collect()
    assert any(isinstance(m, PackedDense) for m in model.modules())
    mapped = [line for line in Path("/proc/self/maps").read_text().splitlines() if str(int4_container) in line]
    assert mapped == []


def test_dense_layers_are_decoded_where_the_kernel_cannot_run(int4_container, monkeypatch):
    from prism_load.packed import PackedDense

    monkeypatch.setattr(packed, "native_available", lambda: False)
    model = prism_load.load(int4_container)
    assert not any(isinstance(m, PackedDense) for m in model.modules())


def test_dense_layers_follow_the_requested_integer_kernel():
    """expert_kernel="native-int16" / "native-int8" rounds the activations of dense int layers too, where the
    kernel takes them."""
    from prism_load import native
    from prism_load.packed import PackedDense, swap_dense

    if not (packed.native_available() and native.q8_available()):
        pytest.skip("the integer-activation kernels do not run here (no native kernels)")
    name = "layers.0.self_attn.q_proj.weight"
    for requested, expected in (("native-int8", "native-int8"), ("native-int16", "native-int16"),
                                ("auto", "native-int16"), ("native", "native")):
        model = random_model(Q8_CONFIG)
        w = model.get_parameter(name).detach()
        dense = {name: (Encoding("int", tuple(w.shape), bits=8, group_size=64), rtn(w, 8, 64))}
        swap_dense(model, dense, {name}, requested)
        layer = model.get_submodule(name.removesuffix(".weight"))
        assert isinstance(layer, PackedDense) and layer.op.backend == expected
        x = torch.randn(1, 3, w.shape[1])
        assert torch.allclose(layer(x), x @ decode(dense[name][0], dense[name][1]).T, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("requested", ["auto", "native-int16", "native-int8"])
def test_fused_qkv_gives_the_same_logits_as_three_calls(requested):
    """fuse_qkv concatenates q, k and v's stored rows into one operator: each row is computed as before, so
    the logits are bit-identical; an attention whose projections differ in packing is left alone."""
    from prism_load.packed import PackedDense, fuse_qkv, swap_dense

    if not packed.native_available():
        pytest.skip("the native kernel does not run here")
    model = random_model(Q8_CONFIG)
    names = [f"layers.{i}.self_attn.{p}.weight" for i in range(Q8_CONFIG["num_hidden_layers"])
             for p in ("q_proj", "k_proj", "v_proj")]
    dense = {}
    for n in names:
        w = model.get_parameter(n).detach()
        bits = 4 if n.startswith("layers.0.") and "v_proj" in n else 8  # layer 0: v packed unlike q and k
        dense[n] = (Encoding("int", tuple(w.shape), bits=bits, group_size=64), rtn(w, bits, 64))
    swap_dense(model, dense, set(names), requested)
    ids = torch.randint(0, Q8_CONFIG["vocab_size"], (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(ids)
        assert fuse_qkv(model) == Q8_CONFIG["num_hidden_layers"] - 1
        after = model(ids)
    assert torch.equal(before, after)
    assert not hasattr(model.layers[1].self_attn, "q_proj")
    assert isinstance(model.layers[1].self_attn.qkv_proj, PackedDense)
    assert isinstance(model.layers[0].self_attn.q_proj, PackedDense)  # not fused: v differs


def test_loading_a_container_imports_no_symbolic_machinery(int4_container):
    """The meta-device skeleton must not run torch's Python reference ops: their first use imports
    torch._dynamo and sympy, tens of MiB resident for values the container overwrites anyway."""
    import subprocess
    import sys

    code = ("import sys, prism_load\n"
            f"prism_load.load({str(int4_container)!r})\n"
            "print(sorted(m for m in ('sympy', 'torch._dynamo') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("kernel", ["native-int16", "native-int8"])
def test_decode_runs_a_layers_experts_in_one_block_call(tmp_path, kernel, monkeypatch):
    """A decode step of an integer-kernel model computes each MoE layer's routed experts in one expert_block
    call, and its logits match the experts computed one by one (which round each expert's output to the model's
    dtype before the weighted sum: the block sums in fp32) to within that rounding."""
    from prism_load import native
    from prism_load.models import moe

    if not (packed.native_available() and native.q8_available()):
        pytest.skip("the integer-activation kernels do not run here (no native kernels)")
    path = write_tiny(tmp_path / "q8.prism", random_model(Q8_CONFIG), config=Q8_CONFIG, mix=INT4_G64)
    model = prism_load.load(path, expert_kernel=kernel)
    ids = torch.randint(0, Q8_CONFIG["vocab_size"], (1, 6), generator=torch.Generator().manual_seed(0))
    calls = []
    real = moe.expert_block
    monkeypatch.setattr(moe, "expert_block", lambda *a: calls.append(len(a[1])) or real(*a))

    def decode_step():
        with torch.no_grad():
            cache = model.new_cache()
            model(ids, cache=cache)
            return model(ids[:, -1:], cache=cache).float()

    block = decode_step()
    assert calls == [Q8_CONFIG["num_experts_per_tok"]] * len(list(model.moe_blocks()))
    monkeypatch.setattr(moe.ExpertWeights, "block", lambda self: None)  # every expert one by one
    one_by_one = decode_step()
    assert len(calls) == len(list(model.moe_blocks()))
    cos = torch.nn.functional.cosine_similarity(block.double().flatten(), one_by_one.double().flatten(), dim=0)
    assert cos > 1 - 1e-4
    assert block.argmax() == one_by_one.argmax()
