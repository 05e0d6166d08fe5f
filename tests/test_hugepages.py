"""prism_load/hugepages.py and the resident loader's expert arena: buffers start on a huge-page boundary and
carry MADV_HUGEPAGE where the kernel offers transparent huge pages, PRISM_HUGEPAGES=0 turns the advice off,
and a model whose experts live in arenas gives the same logits as one whose experts do not."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from containers import TINY_CONFIG, random_model, write_tiny

import prism_load
from prism_load import hugepages
from prism_load.runtime.stores import weights_tensors

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def vma_flags(address: int) -> dict[str, str]:
    """The /proc/self/smaps fields of the mapping holding `address`."""
    fields, inside = {}, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        m = re.match(r"^([0-9a-f]+)-([0-9a-f]+) ", line)
        if m:
            inside = int(m.group(1), 16) <= address < int(m.group(2), 16)
        elif inside and ":" in line:
            key, value = line.split(":", 1)
            fields[key] = value.strip()
    return fields


def thp_offered() -> bool:
    return THP.exists() and re.search(r"\[(always|madvise)\]", THP.read_text()) is not None


def test_huge_buffer_is_aligned_and_advised(monkeypatch):
    monkeypatch.delenv("PRISM_HUGEPAGES", raising=False)
    buf = hugepages.huge_buffer(3 * hugepages.HUGE_PAGE + 123)
    assert buf.dtype == torch.uint8 and buf.numel() == 3 * hugepages.HUGE_PAGE + 123 and buf.is_contiguous()
    if hugepages._madvise() is None:
        pytest.skip("no madvise on this platform: ordinary pages")
    assert buf.data_ptr() % hugepages.HUGE_PAGE == 0
    if not thp_offered():
        pytest.skip("the kernel offers no transparent huge pages here")
    buf.fill_(1)
    flags = vma_flags(buf.data_ptr())
    assert "hg" in flags.get("VmFlags", "").split()  # MADV_HUGEPAGE took


def test_small_or_disabled_buffers_are_plain(monkeypatch):
    small = hugepages.huge_buffer(1000)
    assert small.numel() == 1000 and small.untyped_storage().nbytes() == 1000
    monkeypatch.setenv("PRISM_HUGEPAGES", "0")
    plain = hugepages.huge_buffer(3 * hugepages.HUGE_PAGE)
    assert plain.untyped_storage().nbytes() == 3 * hugepages.HUGE_PAGE  # no slack for alignment: torch.empty


def test_resident_experts_share_an_arena_and_keep_their_logits(tmp_path, monkeypatch):
    """Each MoE layer's experts view one arena (here on 4 KiB 'huge pages' so the tiny model takes the aligned
    path), read into it as stored; the logits equal a load without arenas' advice, bit for bit."""
    config = dict(TINY_CONFIG, hidden_size=64, intermediate_size=96, num_local_experts=4)
    path = write_tiny(tmp_path / "m.prism", random_model(config), config=config,
                      mix=[dict(kind="int", bits=4, group_size=32)])
    ids = torch.randint(0, config["vocab_size"], (1, 7), generator=torch.Generator().manual_seed(0))
    monkeypatch.setenv("PRISM_HUGEPAGES", "0")
    plain = prism_load.load(path)
    monkeypatch.setenv("PRISM_HUGEPAGES", "1")
    monkeypatch.setattr(hugepages, "HUGE_PAGE", 4096)
    arena = prism_load.load(path)
    for _, block in arena.moe_blocks():
        storages = {t.untyped_storage().data_ptr() for w in block.experts.experts for t in weights_tensors(w)}
        assert len(storages) == 1  # one arena per layer
    first = next(iter(arena.moe_blocks()))[1].experts.experts[0]
    if hugepages._madvise() is not None:
        assert min(t.data_ptr() for t in weights_tensors(first)) % 4096 == 0
    with torch.no_grad():
        assert torch.equal(plain(ids), arena(ids))


def test_cache_slabs_are_huge_page_buffers(monkeypatch):
    """The expert cache's slabs (runtime/tiers.SlabPool) are huge_buffer()s, so a cached expert streams from 2 MiB
    pages as a resident one does; the pool counts what it was asked for, not the alignment slack."""
    from prism_load.runtime.tiers import SlabPool

    monkeypatch.delenv("PRISM_HUGEPAGES", raising=False)
    nbytes = 2 * hugepages.HUGE_PAGE + 4096
    pool = SlabPool(budget_bytes=4 * nbytes)
    held = pool.take(nbytes)
    slab = held.buf
    assert slab.numel() == nbytes and pool.total_bytes == nbytes
    if hugepages._madvise() is None:
        pytest.skip("no madvise on this platform: ordinary pages")
    assert slab.data_ptr() % hugepages.HUGE_PAGE == 0
    pool.give(held)
    assert pool.take(nbytes) is held  # reused as it is
    if thp_offered():
        slab.fill_(1)
        assert "hg" in vma_flags(slab.data_ptr()).get("VmFlags", "").split()
    monkeypatch.setenv("PRISM_HUGEPAGES", "0")
    plain = SlabPool(budget_bytes=4 * nbytes).take(nbytes).buf
    assert plain.untyped_storage().nbytes() == nbytes


@pytest.mark.parametrize("mix", [[dict(kind="int", bits=4, group_size=32)],
                                 [dict(kind="int", bits=3, group_size=32), dict(kind="bf16")]],
                         ids=["views-of-the-read", "decoded-or-widened"])
def test_cached_experts_in_offset_slabs_keep_their_logits(tmp_path, monkeypatch, mix):
    """A huge-page slab views its allocation from a 2 MiB boundary further in; a miss's operators must view the
    slab's bytes, not its allocation's start (as_strided counts from the storage). Here on 4 KiB 'huge pages' so
    the tiny experts take the aligned path: greedy decode through a 50% cache equals the resident model's, for
    experts the cache views as read and for experts it widens or decodes into the slab."""
    from runtime_fixtures import RUNTIME_CONFIG, write_runtime_container

    config = dict(RUNTIME_CONFIG, hidden_size=128, intermediate_size=256)  # experts of 50 KB: above 4 KiB
    path = write_runtime_container(tmp_path / "m.prism", config=config, mix=mix)
    ids = torch.randint(0, config["vocab_size"], (1, 6), generator=torch.Generator().manual_seed(1))
    resident = prism_load.load(path)
    monkeypatch.setattr(hugepages, "HUGE_PAGE", 4096)
    cached = prism_load.load(path, expert_cache="50%", prefetch=False)
    with torch.no_grad():
        want = resident.generate(ids, max_new_tokens=12, eos_token_id=[])
        got = cached.generate(ids, max_new_tokens=12, eos_token_id=[])
        assert torch.equal(resident(want), cached(want))
    assert torch.equal(got, want) and cached.stats()["misses"] > 0
    slabs = [e.slab.buf for e in cached.runtime.cache._entries.values() if e.slab is not None]
    if hugepages._madvise() is not None:
        assert slabs and any(s.storage_offset() > 0 for s in slabs)  # the case this test is about
