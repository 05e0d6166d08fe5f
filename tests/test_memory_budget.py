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


def available(monkeypatch, figure: int, swap: int = 0) -> None:
    monkeypatch.setattr(memory, "available_bytes", lambda device: (figure, "MemAvailable"))
    monkeypatch.setattr(memory, "swap_free", lambda: swap)


def test_swap_free_reads_meminfo(tmp_path):
    write(tmp_path / "meminfo", "SwapTotal:       2097148 kB\nSwapFree:        1048576 kB\n")
    assert memory.swap_free(tmp_path / "meminfo") == 1 << 30
    assert memory.swap_free(tmp_path / "absent") == 0


def test_check_fits_counts_free_swap_as_room_on_the_cpu(monkeypatch):
    available(monkeypatch, 1000, swap=500)
    memory.check_fits(1500, "cpu", "a load", "Do less.")  # fits only with the swap
    with pytest.raises(BudgetError, match=r"^a load would hold 1,501 bytes \(0 MiB\), more than this process may "
                                          r"still take: 1,000 bytes \(MemAvailable\) plus 500 bytes of free swap\. "
                                          r"Do less\.$"):
        memory.check_fits(1501, "cpu", "a load", "Do less.")
    available(monkeypatch, 1000)
    with pytest.raises(BudgetError, match=r"still take: 1,000 bytes \(MemAvailable\)\. Do less\.$"):
        memory.check_fits(1001, "cpu", "a load", "Do less.")


def test_check_fits_refuses_nothing_where_no_figure_is_known(monkeypatch):
    def unknown(device):
        raise BudgetError("no /proc/meminfo")

    monkeypatch.setattr(memory, "available_bytes", unknown)
    memory.check_fits(1 << 60, "cpu", "a load", "Do less.")


@pytest.mark.parametrize("form", ["packed", "decoded"])
def test_resident_expert_bytes_are_what_the_loaded_model_holds(container, form):
    from prism_load.container.loader import resident_expert_nbytes
    from prism_load.container.reader import Container
    from prism_load.packed import ExpertPacker
    from prism_load.runtime.stores import weights_nbytes

    model = prism_load.load(container, expert_form=form)
    held = 0
    for _, block in model.moe_blocks():
        if hasattr(block.experts, "experts"):  # ResidentExperts
            held += sum(weights_nbytes(w) for w in block.experts.experts)
        else:  # decoded experts stacked into one tensor per projection
            held += sum(p.numel() * p.element_size() for p in block.experts.parameters())
    with Container(container) as c:
        packer = ExpertPacker(torch.bfloat16, "cpu", "auto") if form == "packed" else None
        assert resident_expert_nbytes(c, packer, torch.bfloat16) == held


def test_resident_expert_bytes_of_mixed_encodings_decoded(tmp_path):
    """Every kind of encoding (low-rank ones stay factored where that is smaller), decoded resident."""
    from containers import TINY_CONFIG

    from prism_load.container.loader import resident_expert_nbytes
    from prism_load.container.reader import Container
    from prism_load.runtime.stores import weights_nbytes

    path = write_tiny(tmp_path / "mixed.prism", random_model(TINY_CONFIG), config=TINY_CONFIG)  # EXACT_MIX
    model = prism_load.load(path, expert_form="decoded")
    held = 0
    for _, block in model.moe_blocks():
        if hasattr(block.experts, "experts"):
            held += sum(weights_nbytes(w) for w in block.experts.experts)
        else:
            held += sum(p.numel() * p.element_size() for p in block.experts.parameters())
    with Container(path) as c:
        assert resident_expert_nbytes(c, None, torch.bfloat16) == held


def test_a_resident_load_larger_than_the_memory_left_is_refused_before_it_reads_experts(container, monkeypatch):
    from prism_load.container import reader

    reads = []
    read = reader.Container.read_expert_bytes
    monkeypatch.setattr(reader.Container, "read_expert_bytes", lambda self, *a, **k: reads.append(1) or read(self, *a, **k))
    available(monkeypatch, 1000)
    with pytest.raises(BudgetError, match=r"m\.prism: every expert resident, as stored \(packed\), would hold "
                                          r"[0-9,]+ bytes \(\d+ MiB\), more than this process may still take: "
                                          r"1,000 bytes \(MemAvailable\)\. Load it with expert_cache='auto' .* or "
                                          r"mmap=True"):
        prism_load.load(container)
    with pytest.raises(BudgetError, match=r"decoded to bfloat16, would hold .* expert_form='packed' \(the default\)"):
        prism_load.load(container, expert_form="decoded")
    assert reads == []
    mapped = prism_load.load(container, mmap=True)  # the way out the message names: the page cache holds them
    assert sum(1 for _ in mapped.moe_blocks()) > 0


def test_an_expert_cache_budget_larger_than_the_memory_left_is_refused(container, monkeypatch):
    model = prism_load.load(container, expert_cache="100%")
    total = total_footprint(model.runtime.cache.store)
    available(monkeypatch, total - 1)
    with pytest.raises(BudgetError, match=r"^expert_cache='100%': the cache would hold .* Give a smaller budget, or "
                                          r"expert_cache='auto'"):
        prism_load.load(container, expert_cache="100%")
    half = prism_load.load(container, expert_cache="50%")  # what fits loads
    assert half.runtime.cache.budget_bytes == total // 2
    available(monkeypatch, total)
    assert prism_load.load(container, expert_cache="1TB").runtime.cache.budget_bytes == 10**12  # counted at most total


def test_prism_run_serves_experts_that_do_not_fit_from_an_expert_cache(container, monkeypatch, capsys, tmp_path):
    """Without --cache or --mmap, prism run loads every expert resident; where that would not fit (the load
    refuses it) it says so and runs behind expert_cache="auto". Asked for explicitly, a cache budget larger than
    what is left is an error in one line."""
    import sys

    from prism_convert.cli.app import main

    with prism_load.container.Container(container) as c:
        from prism_load.container.loader import resident_expert_nbytes
        from prism_load.packed import ExpertPacker

        resident = resident_expert_nbytes(c, ExpertPacker(torch.bfloat16, "cpu", "auto"), torch.bfloat16)
    monkeypatch.setattr(memory, "MIN_RESERVE", 0)  # a tiny model: "auto" keeps a tenth of the room
    room = resident - 1
    available(monkeypatch, room)
    from tiny import save_char_tokenizer

    tokenizer = str(save_char_tokenizer(tmp_path / "tokenizer.json"))
    monkeypatch.setattr(sys, "argv", ["prism", "run", str(container), "-p", "hi", "--max-new-tokens", "2",
                                      "--tokenizer", tokenizer])
    with pytest.raises(SystemExit) as done:
        main()
    assert done.value.code == 0
    out = capsys.readouterr().out.replace("\n", " ")  # rich wraps long lines
    assert (f"every expert resident would hold {resident:,} bytes, more than the {room:,} this process may still "
            "take (MemAvailable): serving them from an expert cache") in out
    assert "hits" in out  # the cache's statistics table follows the text
    monkeypatch.setattr(sys, "argv", ["prism", "run", str(container), "-p", "hi", "--cache", "100%",
                                      "--tokenizer", tokenizer])
    with pytest.raises(SystemExit) as done:
        main()
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert "expert_cache='100%': the cache would hold" in err and "Traceback" not in err


def test_a_refusal_carries_its_figures(monkeypatch):
    from prism_load.errors import DoesNotFit

    available(monkeypatch, 1000, swap=24)
    with pytest.raises(DoesNotFit) as refused:
        memory.check_fits(2000, "cpu", "a load", "Do less.")
    assert (refused.value.need_bytes, refused.value.available_bytes, refused.value.source) == (2000, 1024,
                                                                                              "MemAvailable")


def test_under_a_real_memory_cgroup_a_resident_load_is_refused_where_it_would_be_killed(tmp_path):
    """The whole chain on a real cgroup (bench/memory_cap.py; skips where none can be made): a process capped at
    8 MiB past its imports, loading a container with 16 MiB of packed experts, is refused with the cgroup's room
    named, instead of being killed by the kernel midway; mmap=True, the way out the message names, loads and runs
    under the same cap."""
    import subprocess
    import sys
    from pathlib import Path

    config = dict(KERNEL_CONFIG, hidden_size=512, intermediate_size=1024, num_local_experts=8)
    path = write_tiny(tmp_path / "big.prism", random_model(config), config=config, mix=INT4_G32,
                      shard_size_bytes=4 << 20)
    bench = Path(__file__).resolve().parent.parent / "bench"
    script = f"""
import sys
sys.path.insert(0, {str(bench)!r})
import torch
import prism_load
import prism_load.container.loader
from prism_load.errors import BudgetError
from memory_cap import CapUnavailable, MemoryCap
try:
    cap = MemoryCap.join(8 << 20)
except CapUnavailable as e:
    print("UNAVAILABLE", e)
    sys.exit(0)
try:
    prism_load.load({str(path)!r})
    print("LOADED")
except BudgetError as e:
    print("REFUSED", e)
model = prism_load.load({str(path)!r}, mmap=True)
with torch.inference_mode():
    print("MAPPED", tuple(model(torch.arange(8).view(1, 8)).shape))
cap.leave()
"""
    sys.path.insert(0, str(bench))
    import memory_cap

    with subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True) as proc:
        out, err = proc.communicate()
    for folder in memory_cap.folder_for(proc.pid):
        memory_cap.remove(folder)
    if out.startswith("UNAVAILABLE"):
        pytest.skip(out.strip())
    assert proc.returncode == 0, err[-2000:]
    assert "REFUSED" in out and "LOADED" not in out
    assert "(room under this process's memory cgroup limit)" in out
    assert "MAPPED (1, 8, 64)" in out
