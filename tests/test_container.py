"""The .prism container: golden bytes, exact round trips, one-read experts, damaged and hostile containers,
metadata overhead, and the verify/inspect commands."""

import json
import math
import os
import re
import shutil

import pytest
import torch
import xxhash
from containers import (
    FACTORED_MIX,
    TINY_CONFIG,
    assign_state,
    container_inputs,
    decoded_state,
    random_model,
    write_tiny,
)
from safetensors import safe_open
from tiny import CASES

import prism_load
from prism_convert.packing.container_writer import ExpertInput, write_container
from prism_load.container import ALIGNMENT_BYTES, TIERS, Container, expert_layout
from prism_load.container.format import Encoding
from prism_load.container.loader import ResidentExperts
from prism_load.container.reader import metadata_overhead, overhead_bits_per_expert_weight
from prism_load.container.verify import verify_container
from prism_load.errors import ContainerError
from prism_load.hf_loader import empty_model, load_hf
from prism_load.models.family import family_for

GOLDEN_CONFIG = {
    "model_type": "mixtral", "vocab_size": 16, "hidden_size": 8, "intermediate_size": 4, "num_hidden_layers": 1,
    "num_attention_heads": 2, "num_key_value_heads": 1, "num_local_experts": 2, "num_experts_per_tok": 1,
    "rope_theta": 10000.0, "max_position_embeddings": 32,
}


def _golden_inputs():
    """Fixed tensors: expert 0 all bf16 (hot); expert 1 int4 gate, fp32 up, bf16 down (cold)."""
    model = random_model(GOLDEN_CONFIG)
    dense = {n: (Encoding("fp32", tuple(t.shape)), {"weight": torch.full(t.shape, 0.5)})
             for n, t in model.state_dict().items() if ".mlp.experts." not in n}
    ar = lambda *shape: torch.arange(math.prod(shape), dtype=torch.float32).reshape(shape) / 64
    e0 = {n: (Encoding("bf16", s), {"weight": ar(*s).bfloat16()}) for n, s in
          (("gate_proj", (4, 8)), ("up_proj", (4, 8)), ("down_proj", (8, 4)))}
    e1 = {
        "gate_proj": (Encoding("int", (4, 8), bits=4, group_size=8),
                      {"qweight": torch.arange(16, dtype=torch.uint8).reshape(4, 4),
                       "scales": torch.ones(4, 1, dtype=torch.float16), "zeros": torch.zeros(4, 1, dtype=torch.float16)}),
        "up_proj": (Encoding("fp32", (4, 8)), {"weight": ar(4, 8)}),
        "down_proj": (Encoding("bf16", (8, 4)), {"weight": -ar(8, 4).bfloat16()}),
    }
    experts = [ExpertInput(0, 0, "hot", 0.75, 0.5, "fast", e0), ExpertInput(0, 1, "cold", 0.25, 0.125, "cold", e1)]
    return dense, experts


def test_golden_bytes(tmp_path):
    dense, experts = _golden_inputs()
    out = write_container(tmp_path / "g.prism", config=GOLDEN_CONFIG, source={"model_id": "golden", "revision": None},
                          tokenizer_files=[], dense=dense, experts=experts, recipe={}, budget={})
    assert sorted(p.name for p in out.iterdir()) == [
        "dense-00000.safetensors", "experts-cold-00000.safetensors", "experts-hot-00000.safetensors", "manifest.json"]

    # Expert 1's stored tensors: 4-byte elements first, then 2-byte, then bytes; by key within a size.
    layout = [(t.key, t.start, t.nbytes) for t in expert_layout({n: enc for n, (enc, _) in experts[1].tensors.items()})]
    assert layout == [("up_proj.weight", 0, 128), ("down_proj.weight", 128, 64), ("gate_proj.scales", 192, 8),
                      ("gate_proj.zeros", 200, 8), ("gate_proj.qweight", 208, 16)]

    raw = (out / "experts-cold-00000.safetensors").read_bytes()
    header = (b'{"__metadata__":{"format":"prism-experts","format_version":"1"},'
              b'"layers.0.experts.1":{"dtype":"U8","shape":[4096],"data_offsets":[0,4096]}}')
    assert len(raw) == 8192
    assert raw[:8] == (4088).to_bytes(8, "little")
    assert raw[8 : 8 + len(header)] == header and raw[8 + len(header) : 4096] == b" " * (4088 - len(header))
    t = experts[1].tensors
    body = b"".join(x.contiguous().view(torch.uint8).numpy().tobytes() for x in (
        t["up_proj"][1]["weight"], t["down_proj"][1]["weight"], t["gate_proj"][1]["scales"],
        t["gate_proj"][1]["zeros"], t["gate_proj"][1]["qweight"]))
    assert raw[4096 : 4096 + 224] == body and raw[4096 + 224 :] == bytes(4096 - 224)

    hot = (out / "experts-hot-00000.safetensors").read_bytes()
    e0 = b"".join(experts[0].tensors[n][1]["weight"].view(torch.uint8).numpy().tobytes()
                  for n in ("down_proj", "gate_proj", "up_proj"))
    assert len(hot) == 8192 and hot[4096 : 4096 + 192] == e0 and hot[4096 + 192 :] == bytes(4096 - 192)

    records = [line for line in (out / "manifest.json").read_text().splitlines() if line.startswith('{"layer"')]
    assert records == [
        '{"layer":0,"expert":0,"tier":"hot","frequency":0.75,"gate_mass":0.5,"placement":"fast","shard":0,'
        '"offset":4096,"length":192,"checksum":"59766d731896bd1c","tensors":{"gate_proj":5,"up_proj":5,"down_proj":6}},',
        '{"layer":0,"expert":1,"tier":"cold","frequency":0.25,"gate_mass":0.125,"placement":"cold","shard":1,'
        '"offset":4096,"length":224,"checksum":"6c491e592ab3a759","tensors":{"gate_proj":7,"up_proj":2,"down_proj":6}}',
    ]
    assert (xxhash.xxh3_64_hexdigest(e0), xxhash.xxh3_64_hexdigest(body)) == ("59766d731896bd1c", "6c491e592ab3a759")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["encodings"][5:] == [{"kind": "bf16", "shape": [4, 8]}, {"kind": "bf16", "shape": [8, 4]},
                                         {"bits": 4, "group_size": 8, "kind": "int", "shape": [4, 8]}]
    assert manifest["expert_shards"] == [{"name": "experts-hot-00000.safetensors", "bytes": 8192, "tier": "hot"},
                                         {"name": "experts-cold-00000.safetensors", "bytes": 8192, "tier": "cold"}]
    with safe_open(out / "dense-00000.safetensors", framework="pt") as f:  # the stock reader, key order by size, then name
        assert f.metadata() == {"format": "prism-dense"}
        assert list(f.offset_keys()) == sorted(f.keys())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random model and its container (every encoding kind), written once."""
    model = random_model()
    return model, write_tiny(tmp_path_factory.mktemp("tiny") / "tiny.prism", model)


@pytest.fixture
def damaged(tiny, tmp_path):
    """A fresh copy of the tiny container to damage."""
    path = tmp_path / "copy.prism"
    shutil.copytree(tiny[1], path)
    return path


ALL_FAMILIES = [pytest.param(name, dtype, marks=pytest.mark.slow) for name in CASES
                for dtype in (torch.float32, torch.bfloat16)]


@pytest.mark.parametrize("name, dtype", [("mixtral", torch.float32), ("qwen2_moe", torch.float32),
                                         ("mixtral", torch.bfloat16), ("gpt_oss", torch.float32), *ALL_FAMILIES])
def test_round_trip_is_bit_exact(name, dtype, tiny_checkpoint, tmp_path):
    """Logits of the loaded container (decoded form) equal those of the original model with the same decoded
    weights (gpt_oss: expert biases; slow: every family in both dtypes). test_packed.py holds the packed
    form to the decoded one."""
    folder, _ = tiny_checkpoint(name)
    model = load_hf(folder)
    config = json.loads((folder / "config.json").read_text())
    dense, experts = container_inputs(model)
    out = write_container(tmp_path / "m.prism", config=config, source={"model_id": name, "revision": "r1"},
                          tokenizer_files=[], dense=dense, experts=experts, recipe={}, budget={}, shard_size_bytes=50_000)
    reference = load_hf(folder, dtype=dtype)
    assign_state(reference, decoded_state(dense, experts, dtype, reference))
    loaded = prism_load.load(out, dtype=dtype, compute_dtype=dtype, expert_form="decoded")  # the reference's arithmetic
    ids = torch.randint(0, config["vocab_size"], (2, 11))
    with torch.no_grad():
        assert torch.equal(loaded(ids), reference(ids))
    if name == "mixtral":
        kinds = {enc.kind for x in experts for enc, _ in x.tensors.values()}
        assert kinds == {"int", "bf16", "fp16", "fp32", "lowrank", "int+lowrank"}


def test_factored_low_rank_experts_stay_factored(tmp_path):
    model = random_model()
    out = write_tiny(tmp_path / "f.prism", model, mix=FACTORED_MIX)
    loaded = prism_load.load(out, dtype=torch.float32)
    assert all(isinstance(block.experts, ResidentExperts) for _, block in loaded.moe_blocks())
    dense, experts = container_inputs(model, FACTORED_MIX)
    assign_state(model, decoded_state(dense, experts))
    ids = torch.randint(0, TINY_CONFIG["vocab_size"], (2, 9))
    with torch.no_grad():
        a, b = loaded(ids), model(ids)
    assert (a - b).abs().max() <= 1e-5 * b.abs().max()


def test_tokenizer_is_attached(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    out = write_tiny(tmp_path / "t.prism", tokenizer_files=[tmp_path / "tokenizer.json"])
    assert prism_load.load(out).tokenizer.encode("hello world").ids == [1, 2]


def test_layout_hot_first_aligned_in_file_order(tiny):
    with Container(tiny[1]) as c:
        shards = c.manifest.expert_shards
        assert [s.tier for s in shards] == sorted((s.tier for s in shards), key=["hot", "cold"].index)
        assert {(r.layer, r.expert) for r in c.records if r.tier == "hot"} == {(0, 0), (1, 0)}
        assert all(r.offset % ALIGNMENT_BYTES == 0 and shards[r.shard].tier == r.tier for r in c.records)
        assert [(r.shard, r.offset) for r in c.records] == sorted((r.shard, r.offset) for r in c.records)
        assert all(s.bytes <= 40_000 or sum(r.shard == i for r in c.records) == 1 for i, s in enumerate(shards))


def test_one_read_per_expert_and_stock_safetensors(tiny, monkeypatch):
    reads = []
    real = os.preadv
    monkeypatch.setattr(os, "preadv", lambda fd, bufs, off: reads.append(off) or real(fd, bufs, off))
    with Container(tiny[1]) as c:
        r = c.record(1, 2)
        encoded = c.read_expert(1, 2, verify_checksum=True)
        assert reads == [r.offset]
        assert set(encoded) == {"gate_proj", "up_proj", "down_proj"}
        shard = c.path(c.manifest.expert_shards[r.shard].name)
        with safe_open(shard, framework="pt") as f:
            blob = f.get_tensor("layers.1.experts.2")
            assert f.metadata() == {"format": "prism-experts", "format_version": "1"}
        assert bytes(blob.numpy()) == bytes(c.read_expert_bytes(r)) + bytes(len(blob) - r.length)
        w = c.expert_weights(1, 2)
        assert w.gate_up.shape == (2 * 40, 32) and w.down.shape == (32, 40)


def test_concurrent_reads_with_descriptor_eviction(tiny, monkeypatch):
    """Threads read experts while the descriptor cache holds one shard: every read returns its own bytes."""
    from concurrent.futures import ThreadPoolExecutor

    import prism_load.container.reader as reader

    monkeypatch.setattr(reader, "MAX_OPEN_SHARDS", 1)
    with Container(tiny[1]) as c:
        ids = [(r.layer, r.expert) for r in c.records] * 25
        with ThreadPoolExecutor(8) as pool:
            blobs = list(pool.map(lambda le: bytes(c.read_expert_bytes(c.record(*le), verify_checksum=True)), ids))
        assert len(c._fds) <= 1
    assert len(set(zip(ids, blobs))) == len(c.records)


def test_close_leaves_a_held_descriptor_to_its_reader(tiny, monkeypatch):
    """close() closes the descriptors no reader holds at once; one held in shard_fd (another thread's read) closes
    when its reader lets go, never under it; reads after close() open their shard again."""
    closed = []
    real = os.close
    monkeypatch.setattr(os, "close", lambda fd: closed.append(fd) or real(fd))
    with Container(tiny[1]) as c:
        held, other = c.records[0].shard, next(r.shard for r in c.records if r.shard != c.records[0].shard)
        c.read_expert_bytes(c.record(c.records[0].layer, c.records[0].expert))
        with c.shard_fd(other):
            pass  # open, not held
        other_fd = c._fds[other]
        with c.shard_fd(held) as fd:
            c.close()
            assert closed == [other_fd]
            assert os.fstat(fd).st_size > 0  # still this shard's, still open
            assert c._fds == {held: fd}
        assert closed == [other_fd, fd] and not c._fds
        r = c.records[-1]
        assert bytes(c.read_expert_bytes(r, verify_checksum=True))  # opens again
        c.close()
        c.close()
    assert not c._fds


def test_close_while_other_threads_read(tiny):
    """close() called over and over while eight threads read experts with their checksums: every read returns its
    expert's bytes (no descriptor closed under a reader, none read from another file), nothing raises."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    with Container(tiny[1]) as c:
        ids = [(r.layer, r.expert) for r in c.records] * 20
        want = {le: bytes(c.read_expert_bytes(c.record(*le), verify_checksum=True)) for le in set(ids)}
        done = threading.Event()

        def closer():
            while not done.is_set():
                c.close()

        thread = threading.Thread(target=closer)
        thread.start()
        try:
            with ThreadPoolExecutor(8) as pool:
                got = list(pool.map(lambda le: bytes(c.read_expert_bytes(c.record(*le), verify_checksum=True)), ids))
        finally:
            done.set()
            thread.join()
    assert got == [want[le] for le in ids]
    assert not c._fds


def test_a_cache_reads_its_shards_randomly_and_a_resident_load_does_not(tiny, monkeypatch):
    """An expert cache's misses are random reads: every expert shard is advised POSIX_FADV_RANDOM (the kernel's
    readahead would read past each expert), those open when the cache is attached and those opened later; a
    resident load reads shards as before; read_randomly(False) gives the open ones the kernel's default back."""
    import prism_load

    calls = []
    real = os.posix_fadvise
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, off, n, advice: calls.append((fd, off, n, advice)) or
                        real(fd, off, n, advice))
    resident = prism_load.load(tiny[1])
    assert not [c for c in calls if c[3] == os.POSIX_FADV_RANDOM]
    del resident
    cached = prism_load.load(tiny[1], expert_cache="50%", prefetch=False)
    container = cached.runtime.cache.store.container
    with torch.inference_mode():
        cached(torch.tensor([[1, 2, 3, 4]]))  # misses: the shards open
    advised = {c[0] for c in calls if c[1:] == (0, 0, os.POSIX_FADV_RANDOM)}
    assert container._fds and set(container._fds.values()) <= advised
    with Container(tiny[1]) as c:
        c.read_randomly()
        r = c.records[0]
        c.read_expert_bytes(r)  # its shard opens now: advised as it opens
        fd = c._fds[r.shard]
        assert (fd, 0, 0, os.POSIX_FADV_RANDOM) in calls
        c.read_randomly(False)
        assert calls[-1] == (fd, 0, 0, os.POSIX_FADV_NORMAL)


def test_resolve_file_is_lazy(tiny, damaged, tmp_path):
    """A shard absent from the folder is fetched through resolve_file, only when first needed."""
    elsewhere = tmp_path / "remote"
    elsewhere.mkdir()
    shutil.move(damaged / "experts-cold-00001.safetensors", elsewhere)
    asked = []
    hook = lambda name: asked.append(name) or elsewhere / name
    with Container(damaged, resolve_file=hook) as c:
        assert asked == []
        c.read_expert(0, 0)
        assert asked == []
        cold = next(r for r in c.records if c.manifest.expert_shards[r.shard].name == "experts-cold-00001.safetensors")
        c.read_expert(cold.layer, cold.expert)
        assert asked == ["experts-cold-00001.safetensors"]
    assert prism_load.load(damaged, resolve_file=hook) is not None
    with pytest.raises(ContainerError, match=r"experts-cold-00001.safetensors: missing"):
        prism_load.load(damaged)


def _edit_manifest(path, edit):
    data = json.loads((path / "manifest.json").read_text())
    edit(data)
    (path / "manifest.json").write_text(json.dumps(data))


def _flip(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x10]))


def _first(path, tier="cold"):
    data = json.loads((path / "manifest.json").read_text())
    return next(r for r in data["experts"] if r["tier"] == tier), data


def _truncate(p):
    name = "experts-cold-00000.safetensors"
    os.truncate(p / name, os.path.getsize(p / name) - 4096)


def _flip_expert(p):
    r, data = _first(p)
    _flip(p / data["expert_shards"][r["shard"]]["name"], r["offset"] + 100)


def _escape_symlink(p):
    outside = p.parent / "outside.safetensors"
    shutil.move(p / "experts-hot-00000.safetensors", outside)
    os.symlink(outside, p / "experts-hot-00000.safetensors")


def _past_end(p):
    def edit(d):
        r = d["experts"][-1]
        r["offset"] = d["expert_shards"][r["shard"]]["bytes"]
    _edit_manifest(p, edit)


def _overlap(p):
    def edit(d):
        d["experts"][3]["offset"] = d["experts"][2]["offset"] if d["experts"][3]["shard"] == d["experts"][2]["shard"] else 0
    _edit_manifest(p, edit)


def _rename_blob(p):
    """Same length, other name: the shard header no longer matches the manifest."""
    f = p / "experts-hot-00000.safetensors"
    raw = f.read_bytes()
    f.write_bytes(raw.replace(b'"layers.1.experts.0"', b'"layers.1.experts.9"', 1))


DAMAGE = {
    "truncated shard": (_truncate, r"experts-cold-00000.safetensors: \d+ bytes on disk, manifest.json says \d+ \(truncated\)"),
    "flipped expert byte": (_flip_expert, r"layer \d+ expert \d+: checksum [0-9a-f]{16} != [0-9a-f]{16} .*damaged"),
    "flipped dense byte": (lambda p: _flip(p / "dense-00000.safetensors", 5000), r"dense-00000.safetensors: checksum .* \(file damaged\)"),
    "missing shard": (lambda p: os.remove(p / "experts-cold-00001.safetensors"), r"experts-cold-00001.safetensors: missing"),
    "path outside the folder": (lambda p: _edit_manifest(p, lambda d: d["expert_shards"][0].update(name="../x.safetensors")),
                                r"expert_shards\[0\]\.name: '\.\./x\.safetensors' is not allowed"),
    "absolute path": (lambda p: _edit_manifest(p, lambda d: d["dense_shards"][0].update(name="/etc/passwd")),
                      r"dense_shards\[0\]\.name: '/etc/passwd' is not allowed"),
    "symlink out of the folder": (_escape_symlink, r"experts-hot-00000.safetensors: symlink leads outside the container folder"),
    "range past the file end": (_past_end, r"experts\[\d+\] \(layer \d+ expert \d+\): range \[\d+, \d+\) ends past the end of"),
    "overlapping ranges": (_overlap, r"experts\[3\] .*(overlaps the previous expert's|records must be in file order)"),
    "unknown format version": (lambda p: _edit_manifest(p, lambda d: d.update(format_version=2)),
                               r"format_version: 2 is not supported \(this reader knows version 1\)"),
    "unparseable manifest": (lambda p: (p / "manifest.json").write_text('{"format": "prism", '), r"manifest.json: not valid JSON"),
    "unknown manifest key": (lambda p: _edit_manifest(p, lambda d: d.update(foo=1)), r"manifest: unknown key 'foo'"),
    "unknown record key": (lambda p: _edit_manifest(p, lambda d: d["experts"][1].update(bits=3)),
                           r"experts\[1\]: unknown key 'bits'"),
    "length vs encodings": (lambda p: _edit_manifest(p, lambda d: d["experts"][0].update(length=d["experts"][0]["length"] + 1)),
                            r"experts\[0\] \(layer 0 expert 0\)\.length: \d+ bytes, but its encodings store \d+ bytes"),
    "expert missing from the manifest": (lambda p: _edit_manifest(p, lambda d: d["experts"].pop()),
                                         r"experts: 7 records, the config has 8 routed experts \(first missing: layer 1 expert 3\)|holds no expert"),
    "header does not match the manifest": (_rename_blob, r"experts-hot-00000.safetensors: safetensors header: tensors do not match"),
    "bool where an integer belongs": (lambda p: _edit_manifest(p, lambda d: d["experts"][0].update(layer=True)),
                                      r"experts\[0\]\.layer: expected an integer, got True"),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_damaged_container(case, damaged):
    damage, message = DAMAGE[case]
    damage(damaged)
    with pytest.raises(ContainerError, match=message):
        prism_load.load(damaged)
    problems = verify_container(damaged)
    assert any(re.search(message, p) for p in problems), problems


def test_verify_intact_and_progress(tiny):
    seen = []
    assert verify_container(tiny[1], progress=lambda n, total: seen.append((n, total))) == []
    total = seen[0][1]
    assert sum(n for n, _ in seen) == total == sum(p.stat().st_size for p in tiny[1].iterdir() if p.name != "manifest.json")


def test_flipped_byte_loads_only_without_checksums(damaged):
    _flip_expert(damaged)
    prism_load.load(damaged, verify_checksums=False)  # the caller asked not to check: documented behaviour
    with pytest.raises(ContainerError, match="checksum"):
        prism_load.load(damaged)


def test_padding_must_be_zero(damaged):
    r, data = _first(damaged)
    _flip(damaged / data["expert_shards"][r["shard"]]["name"], r["offset"] + r["length"] + 1)
    assert any("padding after byte" in p for p in verify_container(damaged))


def test_writer_is_atomic_and_refuses_bad_input(tiny, tmp_path):
    out = tmp_path / "w.prism"
    shutil.copytree(tiny[1], out)
    dense, experts = container_inputs(tiny[0])
    enc, tensors = experts[5].tensors["up_proj"]
    experts[5].tensors["up_proj"] = (enc, {k: v.float() if v.dtype != torch.float32 else v.half() for k, v in tensors.items()})
    with pytest.raises(ContainerError, match=r"layer \d+ expert \d+ up_proj"):
        write_container(out, config=TINY_CONFIG, source={"model_id": "x"}, tokenizer_files=[], dense=dense,
                        experts=experts, recipe={}, budget={})
    assert verify_container(out) == []  # the old container is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.prism"]  # no partial folder left behind
    dense, experts = container_inputs(tiny[0])
    with pytest.raises(ContainerError, match=r"first missing: layer 1 expert 3"):
        write_container(tmp_path / "n.prism", config=TINY_CONFIG, source={"model_id": "x"}, tokenizer_files=[],
                        dense=dense, experts=experts[:-1], recipe={}, budget={})
    with pytest.raises(ContainerError, match=r"layer 0 expert 1 is given twice"):
        write_container(tmp_path / "n.prism", config=TINY_CONFIG, source={"model_id": "x"}, tokenizer_files=[],
                        dense=dense, experts=[*experts, experts[1]], recipe={}, budget={})
    assert not (tmp_path / "n.prism").exists()


def _synthetic_container(path, hidden, inter, layers, experts_per_layer, bits_cycle, group_size=128):
    """A container whose experts have realistic sizes: random stored bytes, real layout and manifest."""
    config = dict(TINY_CONFIG, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                  num_local_experts=experts_per_layer, vocab_size=256, num_attention_heads=8, num_key_value_heads=8)
    family = family_for(config)
    meta = empty_model(family, family.parse_config(config))
    dense = {n: (Encoding("bf16", tuple(t.shape)), {"weight": torch.zeros(t.shape, dtype=torch.bfloat16)})
             for n, t in meta.state_dict().items() if ".mlp.experts." not in n}
    gen = torch.Generator().manual_seed(0)

    def stored(enc):
        return {k: torch.randint(0, 255, shape, dtype=torch.uint8, generator=gen).view(dtype) if dtype == torch.uint8
                else torch.rand(shape, generator=gen).to(dtype) for k, (dtype, shape) in enc.tensor_specs().items()}

    xs, n = [], 0
    for layer in range(layers):
        for e in range(experts_per_layer):
            tensors = {}
            for name, shape in (("gate_proj", (inter, hidden)), ("up_proj", (inter, hidden)), ("down_proj", (hidden, inter))):
                enc = Encoding("int", shape, bits=bits_cycle[n % len(bits_cycle)], group_size=group_size)
                tensors[name] = (enc, stored(enc))
                n += 1
            xs.append(ExpertInput(layer, e, "hot" if e < experts_per_layer // 8 else "cold", 1 / (e + 1), 0.1,
                                  "fast" if e < 2 else "cold", tensors))
    return write_container(path, config=config, source={"model_id": "synthetic/moe", "revision": "0" * 40},
                           tokenizer_files=[], dense=dense, experts=xs, recipe={"name": "default", "bits": 3.0},
                           budget={"bits": 3.0}, quality={"kl": 0.01})


def test_metadata_overhead_at_realistic_expert_size(tmp_path):
    """~0.42 M weights per expert at mixed 2/3/4 bits (the low end of 0.4-1.5 M): at most 0.05 bits per weight."""
    out = _synthetic_container(tmp_path / "s.prism", hidden=512, inter=272, layers=2, experts_per_layer=32,
                               bits_cycle=[3, 3, 2, 4, 3])
    with Container(out) as c:
        o = metadata_overhead(c)
        assert o.expert_weights == 2 * 32 * 3 * 512 * 272
        assert o.bits_per_expert_weight == overhead_bits_per_expert_weight(out) <= 0.05
        assert o.manifest_bytes / len(c.records) < 400  # compact records


def test_cli_verify_and_inspect(tiny, damaged):
    from typer.testing import CliRunner

    from prism_convert.cli.app import app

    runner = CliRunner()
    ok = runner.invoke(app, ["verify", str(tiny[1])])
    assert ok.exit_code == 0 and "intact" in ok.output
    summary = json.loads(runner.invoke(app, ["inspect", str(tiny[1]), "--json"]).output)
    assert summary["tiers"]["hot"]["experts"] == 2 and summary["tiers"]["cold"]["experts"] == 6
    from prism_load.packed import held_nbytes

    with Container(tiny[1]) as c:  # what the packed runtime holds: each tensor's packed form, widened codes counted
        held = {t: sum(held_nbytes(e) for r in c.records if r.tier == t for e in r.encodings.values()) for t in TIERS}
    assert {t: summary["tiers"][t]["runtime_bytes"] for t in TIERS} == held
    assert "held by the runtime" in runner.invoke(app, ["inspect", str(tiny[1])]).output
    assert summary["hottest_experts"][0]["frequency"] == 0.5
    assert summary["overhead"]["bits_per_expert_weight"] > 0
    assert "hottest experts" in runner.invoke(app, ["inspect", str(tiny[1])]).output
    _flip_expert(damaged)
    bad = runner.invoke(app, ["verify", str(damaged)])
    assert bad.exit_code == 1 and "checksum" in bad.output
