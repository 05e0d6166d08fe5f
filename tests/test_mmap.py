"""load(container, mmap=True): packed experts view a memory map of their shards instead of a copy."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch
from containers import random_model, write_tiny
from test_packed import INT4_G32, KERNEL_CONFIG

import prism_load
from prism_load.container.reader import Container
from prism_load.errors import ContainerError
from prism_load.runtime.stores import weights_tensors


@pytest.fixture(scope="module")
def container(tmp_path_factory):
    model = random_model(KERNEL_CONFIG)
    return write_tiny(tmp_path_factory.mktemp("mmap") / "m.prism", model, config=KERNEL_CONFIG, mix=INT4_G32)


def mapped_files(folder: Path) -> set[str]:
    """Files of `folder` this process maps right now (/proc/self/maps)."""
    found = set()
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5].startswith(str(folder.resolve())):
            found.add(Path(parts[5]).name)
    return found


def expert_shard_names(folder: Path) -> set[str]:
    with Container(folder) as c:
        return {s.name for s in c.manifest.expert_shards}


def ids(n: int = 10) -> torch.Tensor:
    return torch.randint(0, KERNEL_CONFIG["vocab_size"], (2, n), generator=torch.Generator().manual_seed(1))


def test_mapped_experts_give_the_logits_of_read_experts(container):
    read = prism_load.load(container)
    mapped = prism_load.load(container, mmap=True)
    with torch.inference_mode():
        assert torch.equal(read(ids()), mapped(ids()))
    cache_read, cache_mapped = read.new_cache(), mapped.new_cache()
    token = ids(1)[:1]
    with torch.inference_mode():
        for _ in range(6):  # decode steps: the one-call token path where it runs
            a, b = read(token, cache=cache_read), mapped(token, cache=cache_mapped)
            assert torch.equal(a, b)
            token = a[:, -1:].argmax(-1)


def test_mapped_experts_view_the_shards_and_hold_no_copy(container):
    gc.collect()
    assert not mapped_files(container) & expert_shard_names(container)
    model = prism_load.load(container, mmap=True)
    gc.collect()
    assert expert_shard_names(container) <= mapped_files(container)  # still mapped after the container closed
    maps = {}  # shard storage -> bytes; every expert tensor lives in one of the mappings
    for _, block in model.moe_blocks():
        for w in block.experts.experts:
            for t in weights_tensors(w):
                maps[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    with Container(container) as c:
        assert sorted(maps.values()) == sorted(s.bytes for s in c.manifest.expert_shards)
    del model, block, w, t
    gc.collect()
    assert not mapped_files(container) & expert_shard_names(container)  # the maps go with the model


def test_a_write_through_a_mapped_expert_never_reaches_the_file(container, tmp_path):
    import shutil

    copy = shutil.copytree(container, tmp_path / "copy.prism")
    shard = copy / sorted(expert_shard_names(copy))[0]
    before = shard.read_bytes()
    model = prism_load.load(copy, mmap=True)
    tensor = weights_tensors(model.layers[0].mlp.experts.experts[0])[0]
    tensor.view(torch.uint8).fill_(0x5A)
    del model, tensor
    gc.collect()
    assert shard.read_bytes() == before


def test_mmap_checks_checksums_and_names_the_damaged_expert(container, tmp_path):
    import shutil

    copy = shutil.copytree(container, tmp_path / "damaged.prism")
    with Container(copy) as c:
        record = c.record(0, 1)
        path = c.path(c.manifest.expert_shards[record.shard].name)
    data = bytearray(path.read_bytes())
    data[record.offset + 7] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ContainerError, match=r"layer 0 expert 1.*checksum|checksum.*are damaged"):
        prism_load.load(copy, mmap=True)
    prism_load.load(copy, mmap=True, verify_checksums=False)  # asked not to read every page: loads


def test_mmap_applies_to_packed_containers_on_a_cpu(container, tmp_path):
    from prism_load.errors import BudgetError

    with pytest.raises(ContainerError, match="expert_form='decoded' does not keep"):
        prism_load.load(container, mmap=True, expert_form="decoded")
    with pytest.raises(BudgetError, match="expert_form='codes' does not keep"):
        prism_load.load(container, mmap=True, expert_cache="50%", expert_form="codes")
    with pytest.raises(BudgetError, match="numa places copies of experts on a node; mmap=True views the page cache"):
        prism_load.load(container, mmap=True, expert_cache="50%", numa=True)


def shard_rss(folder: Path) -> int:
    """Bytes of `folder`'s expert shards this process holds in memory through its maps now (/proc/self/smaps)."""
    total, counting, shards = 0, False, {str(folder.resolve() / name) for name in expert_shard_names(folder)}
    for line in Path("/proc/self/smaps").read_text().splitlines():
        parts = line.split()
        if parts and "-" in parts[0] and len(parts) >= 5:  # a mapping's header line
            counting = len(parts) == 6 and parts[5] in shards
        elif counting and parts[0] == "Rss:":
            total += int(parts[1]) * 1024
    return total


@pytest.mark.parametrize("prefetch", [False, True])
@pytest.mark.parametrize("experts_in_budget", [2, 5])
def test_a_cache_over_the_map_gives_the_resident_logits_and_maps_no_more_than_its_budget(
        container, prefetch, experts_in_budget):
    """expert_cache with mmap=True: a miss maps the expert's pages instead of copying them, an eviction unmaps
    them: the resident model's logits and greedy tokens, statistics that add up, and the shards' pages held by
    this process within the budget (each expert's range rounded to whole pages)."""
    resident = prism_load.load(container)
    with Container(container) as c:
        largest = max(r.length for r in c.records)
    gc.collect()  # the maps of models of other tests are gone
    assert shard_rss(container) == 0
    model = prism_load.load(container, expert_cache=experts_in_budget * (largest + 4096), mmap=True,
                            prefetch=prefetch)
    cache = model.runtime.cache
    gen = torch.Generator().manual_seed(3)
    with torch.inference_mode():
        for _ in range(3):
            prompt = torch.randint(0, KERNEL_CONFIG["vocab_size"], (1, 6), generator=gen)
            assert torch.equal(model(prompt), resident(prompt))
            assert torch.equal(model.generate(prompt, max_new_tokens=6), resident.generate(prompt, max_new_tokens=6))
    model.runtime.close()
    s = model.stats()
    assert s["mapped"] and s["misses"] > 0 and s["hits"] + s["misses"] == s["uses"] and s["evictions"] > 0
    assert s["loads"] == s["demand_loads"] + s["prefetch_loads"] + s["ahead_loads"]
    assert all(e.mapped and e.slab is None for e in cache._entries.values() if e.ready)  # int4/g32: all as stored
    cache.check()
    pages = -(-largest // 4096) * 4096
    assert 0 < shard_rss(container) <= len(cache._entries) * pages <= experts_in_budget * pages


def test_prism_run_serves_a_cache_over_the_map(container, tmp_path):
    import subprocess
    import sys

    from tiny import save_char_tokenizer

    tokenizer = str(save_char_tokenizer(tmp_path / "tokenizer.json"))
    done = subprocess.run([sys.executable, "-m", "prism_convert.cli", "run", str(container), "--mmap", "--cache", "50%",
                           "-p", "hi", "-n", "4", "--tokenizer", tokenizer], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "maps (memory-mapped: no copies)" in done.stdout and "Traceback" not in done.stderr
