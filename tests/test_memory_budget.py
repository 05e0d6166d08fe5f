"""expert_cache="auto": the budget from the memory this process may still take (runtime/memory.py)."""

from __future__ import annotations

import pytest
import torch
from containers import random_model, write_tiny
from test_packed import INT4_G32, KERNEL_CONFIG

import prism_load
from prism_load.errors import BudgetError
from prism_load.runtime import memory
from prism_load.runtime.cache import total_footprint


def write(path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v1_room_is_the_limit_less_anonymous_memory_charged(tmp_path):
    write(tmp_path / "proc", "12:pids:/x\n5:memory:/bench/job\n0::/\n")
    folder = tmp_path / "cg" / "memory" / "bench" / "job"
    write(folder / "memory.limit_in_bytes", "209715200\n")
    write(folder / "memory.stat", "cache 90000000\nrss 30000000\ntotal_rss 31000000\nhierarchical_memory_limit "
                                  "9223372036854771712\n")
    assert memory.cgroup_room(tmp_path / "proc", tmp_path / "cg") == 209715200 - 31000000  # page cache not counted
    write(folder / "memory.limit_in_bytes", "9223372036854771712\n")  # no limit of its own: a parent's binds
    write(folder / "memory.stat", "total_rss 1000\nhierarchical_memory_limit 5000000\n")
    assert memory.cgroup_room(tmp_path / "proc", tmp_path / "cg") == 5000000 - 1000
    write(folder / "memory.stat", "total_rss 1000\nhierarchical_memory_limit 9223372036854771712\n")
    assert memory.cgroup_room(tmp_path / "proc", tmp_path / "cg") is None


def test_cgroup_v2_room_and_no_limit(tmp_path):
    write(tmp_path / "proc", "0::/user.slice/app\n")
    folder = tmp_path / "cg" / "user.slice" / "app"
    write(folder / "memory.max", "1073741824\n")
    write(folder / "memory.stat", "anon 100000000\nfile 500000000\n")
    assert memory.cgroup_room(tmp_path / "proc", tmp_path / "cg") == 1073741824 - 100000000
    write(folder / "memory.max", "max\n")
    assert memory.cgroup_room(tmp_path / "proc", tmp_path / "cg") is None
    assert memory.cgroup_room(tmp_path / "absent", tmp_path / "cg") is None


def test_mem_available_reads_meminfo(tmp_path):
    write(tmp_path / "meminfo", "MemTotal:       24684000 kB\nMemAvailable:   21000000 kB\n")
    assert memory.mem_available(tmp_path / "meminfo") == 21000000 * 1024


def test_available_is_the_smaller_figure_and_names_it(monkeypatch):
    monkeypatch.setattr(memory, "mem_available", lambda: 8 << 30)
    monkeypatch.setattr(memory, "cgroup_room", lambda: 2 << 30)
    assert memory.available_bytes("cpu") == (2 << 30, "room under this process's memory cgroup limit")
    monkeypatch.setattr(memory, "cgroup_room", lambda: None)
    assert memory.available_bytes("cpu") == (8 << 30, "MemAvailable")
    monkeypatch.setattr(memory, "mem_available", lambda: None)
    with pytest.raises(BudgetError, match="reports no available memory"):
        memory.available_bytes("cpu")


@pytest.fixture(scope="module")
def container(tmp_path_factory):
    return write_tiny(tmp_path_factory.mktemp("auto") / "m.prism", random_model(KERNEL_CONFIG), config=KERNEL_CONFIG,
                      mix=INT4_G32)


def test_auto_budget_is_what_is_left_less_the_reserve(container, monkeypatch):
    def budget_with(available: int) -> int:
        monkeypatch.setattr(memory, "available_bytes", lambda device: (available, "test"))
        model = prism_load.load(container, expert_cache="auto")
        return model.runtime.cache.budget_bytes, total_footprint(model.runtime.cache.store)

    budget, total = budget_with(1 << 40)  # plenty: every expert
    assert budget == total
    budget, total = budget_with(memory.MIN_RESERVE + total // 2)  # the 64 MiB floor of the reserve
    assert budget == total // 2
    reference = prism_load.load(container)
    model = prism_load.load(container, expert_cache="auto")  # and it serves the same logits
    ids = torch.arange(12).view(2, 6)
    with torch.inference_mode():
        assert torch.equal(reference(ids), model(ids))


def test_the_reserve_is_a_tenth_of_a_larger_figure(monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda device: (10 << 30, "MemAvailable"))
    assert memory.auto_budget("cpu", 20 << 30)[0] == (10 << 30) - (1 << 30)
    assert memory.auto_budget("cpu", 4 << 30)[0] == 4 << 30  # never more than every expert


def test_auto_budget_too_small_names_the_figures(container, monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda device: (memory.MIN_RESERVE + 100, "MemAvailable"))
    with pytest.raises(BudgetError, match=r"expert_cache='auto': 67,108,964 bytes available \(MemAvailable\) less a "
                                          r"67,108,864-byte reserve .*: expert cache budget 100 bytes is smaller than "
                                          r"the largest expert"):
        prism_load.load(container, expert_cache="auto")
    monkeypatch.setattr(memory, "available_bytes", lambda device: (1000, "MemAvailable"))
    with pytest.raises(BudgetError, match="leave nothing for experts"):
        prism_load.load(container, expert_cache="auto")
