"""bench/bench_peer.py without llama-cpp-python: says how to install the extra, exits 0, writes nothing."""

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def test_skips_cleanly_without_llama_cpp(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(BENCH))
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp raises ImportError
    import bench_peer

    monkeypatch.setattr(bench_peer, "write_report", lambda *a: (_ for _ in ()).throw(AssertionError("wrote results")))
    monkeypatch.setattr(sys, "argv", ["bench_peer.py", "--work", str(tmp_path / "work"), "--name", "peer_test"])
    bench_peer.main()
    assert 'pip install -e ".[peer]"' in capsys.readouterr().out
    assert not (tmp_path / "work").exists()


def test_a_container_made_with_another_recipe_is_named(tmp_path):
    """bench_peer reuses made containers and work folders; one whose recorded recipe (manifest.json,
    compress/job.json) is not the one it would be made with now (a family recipe changed since) is named by the
    sections that differ, so it is made again."""
    import json

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    from bench_peer import UNIFORM_RECIPE, stale_recipe

    from prism_convert.recipe import load_recipe

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"model_type": "mixtral"}))
    record = tmp_path / "m.prism" / "manifest.json"
    assert stale_recipe(record, None, ckpt) is None  # not made yet
    record.parent.mkdir()
    recipe = load_recipe(None, "mixtral").to_dict()
    record.write_text(json.dumps({"recipe": recipe}))
    assert stale_recipe(record, None, ckpt) is None
    older = dict(recipe, dense=dict(recipe["dense"], lm_head="bf16"), description="older words")
    record.write_text(json.dumps({"recipe": older}))
    assert stale_recipe(record, None, ckpt) == "dense"
    assert stale_recipe(record, str(UNIFORM_RECIPE), ckpt) == "candidates, name"  # its head is bf16 too


def test_variants_name_each_configuration_once_with_its_flags(monkeypatch):
    """--mmap adds llama.cpp's two memory-mapped configurations and prism's load(mmap=True); --cache a prism
    row per budget; every row's name and logits file differ, and each carries the flags peer_measure.py takes."""
    from types import SimpleNamespace

    monkeypatch.syspath_prepend(str(BENCH))
    from bench_peer import Variant, baseline_name, variants

    made = lambda name: {"path": f"/m/{name}"}  # noqa: E731
    args = SimpleNamespace(gguf_types=("Q4_K_M", "Q4_0"), kernels="auto,native-int8", mmap=True,
                           cache=["40%", "40%+prefetch", "40%+lru", "40%+always", "40%+python", "40%+kernel-readahead"],
                           memory_cap=200)
    out = variants(args, {"Q4_K_M": made("q4km.gguf"), "Q4_0": made("q40.gguf")}, {"uniform": made("u.prism")})
    assert [v.name for v in out] == [
        "llama.cpp Q4_K_M", "llama.cpp Q4_0", "prism uniform", "prism uniform, native-int8",
        "llama.cpp Q4_K_M, mmap", "llama.cpp Q4_K_M, mmap, no repack", "prism uniform, mmap",
        "prism uniform, expert_cache 40%", "prism uniform, expert_cache 40%, prefetch",
        "prism uniform, expert_cache 40%, lru", "prism uniform, expert_cache 40%, always",
        "prism uniform, expert_cache 40%, python", "prism uniform, expert_cache 40%, kernel-readahead"]
    assert out[5].flags == ("--mmap", "--no-repack") and out[7].flags == ("--expert-cache", "40%")
    assert out[8].flags == ("--expert-cache", "40%", "--prefetch") and out[9].flags[-2:] == ("--eviction", "lru")
    assert out[10].flags == ("--expert-cache", "40%", "--verify-always")
    assert out[11].flags == ("--expert-cache", "40%", "--python-misses")
    assert out[12].flags == ("--expert-cache", "40%", "--kernel-readahead")
    assert len({v.tag for v in out}) == len(out)
    assert baseline_name(args) in {v.name for v in out}
    with pytest.raises(SystemExit, match=r"--cache 40%\+later: a budget, optionally followed by \+prefetch, "
                                         r"\+always, \+python, \+kernel-readahead and/or one of \+lru, \+frequency"):
        variants(SimpleNamespace(gguf_types=("Q4_K_M",), kernels="auto", mmap=False, cache=["40%+later"]),
                 {"Q4_K_M": made("a")}, {"own": made("b")})
    assert baseline_name(SimpleNamespace(memory_cap=None)) == "llama.cpp Q4_K_M"
    assert variants(SimpleNamespace(gguf_types=("Q4_K_M",), kernels="auto", mmap=False, cache=[]),
                    {"Q4_K_M": made("a")}, {"own": made("b")}) == [Variant("llama.cpp", "Q4_K_M", made("a")),
                                                                 Variant("prism", "own", made("b"))]


def test_memory_cap_series_merge_each_caps_cache_row_and_mark_kills(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    from bench_memory_caps import markdown, series

    def result(cache: str, rows: dict) -> dict:
        return {"shapes": [{"rows": [{"name": n, "decode_tokens_per_second": v} if isinstance(v, float)
                                     else {"name": n, "killed": "memory"} if v == "killed"
                                     else {"name": n, "refused": "would hold"} for n, v in rows.items()]}]}

    results = {150: result("70MiB", {"llama.cpp Q4_K_M, mmap": "killed", "prism u, expert_cache 70MiB": 20.0,
                                     "prism u, expert_cache auto": 7.5, "prism u": "refused"}),
               200: result("120MiB", {"llama.cpp Q4_K_M, mmap": 3.1, "prism u, expert_cache 120MiB": 37.9,
                                      "prism u, expert_cache auto": 30.5, "prism u": "refused"})}
    got = series(results)
    assert got == {"llama.cpp Q4_K_M, mmap": {150: "killed", 200: 3.1},
                   "prism u, expert_cache (cap - overhead)": {150: 20.0, 200: 37.9},
                   "prism u, expert_cache auto": {150: 7.5, 200: 30.5}, "prism u": {150: "refused", 200: "refused"}}
    table = markdown({"caps": [150, 200], "overhead": 80, "tokens": 32, "repeats": 2, "rounds": 1, "series": got})
    assert "| llama.cpp Q4_K_M, mmap | killed | 3.1 |" in table
    assert "| prism u | refused | refused |" in table
    assert "| prism u, expert_cache (cap - overhead) | 20.0 | 37.9 |" in table


def test_a_killed_or_refused_row_has_no_figures_and_says_which(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    from bench_peer import COLUMNS, cells, stopped

    base = {"runtime": "prism", "format": "u", "file_bytes": 3 << 20, "rounds_stopped": 2}
    assert stopped({"decode_tokens_per_second": 1.0}) is None
    killed, refused = dict(base, killed="memory"), dict(base, refused="m.prism: ... would hold 9 bytes")
    assert (stopped(killed), stopped(refused)) == ("killed", "refused")
    assert cells(killed)[4] == "killed for memory (2 of the rounds)"
    assert cells(refused)[4] == "refused at load: would not fit (2 of the rounds)"
    assert len(cells(refused)) == len(COLUMNS) and cells(refused)[5:] == ["-"] * (len(COLUMNS) - 5)
    ratios = {"decode_tokens_per_second": 0.6, "prefill_tokens_per_second": 0.9, "peak_rss_bytes": 1.1}
    measured = dict(base, bits_per_weight=4.5, bits_per_expert_weight=4.25, decode_tokens_per_second=90.0,
                    prefill_tokens_per_second=400.0, peak_rss_bytes=400 << 20, rss_after_imports_bytes=200 << 20,
                    vs_q4_k_m=ratios, load_seconds=0.3, logits_cosine_vs_fp32=0.95, conversion_seconds=None)
    assert cells(measured)[1] == "u"
    assert cells(dict(measured, cache_hit_rate=0.554))[1] == "u (hit rate 55%)"
    assert cells(measured)[4:7] == ["90.0", "400.0", "400 (200)"]


def _capped(code: str, cap_bytes: int) -> tuple[int, str]:
    """(exit status, stdout) of `code` run in a fresh process that first joins a memory cap of cap_bytes; its
    cgroup is removed after, killed or not."""
    import subprocess

    sys.path.insert(0, str(BENCH))
    import memory_cap

    script = (f"import sys; sys.path.insert(0, {str(BENCH)!r})\n"
              "from memory_cap import MemoryCap, CapUnavailable\n"
              f"try:\n    cap = MemoryCap.join({cap_bytes})\n"
              "except CapUnavailable as e:\n    print('UNAVAILABLE', e); sys.exit(0)\n" + code)
    with subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True) as proc:
        out, _ = proc.communicate()
    for folder in memory_cap.folder_for(proc.pid):
        memory_cap.remove(folder)
    return proc.returncode, out


def test_memory_cap_kills_over_it_and_lets_page_cache_be_reclaimed(tmp_path):
    """bench/memory_cap.py, which the memory-cap figures rest on: anonymous memory past the cap kills the process;
    reading a file larger than the cap does not (its pages are reclaimed), and the peak stays at the cap."""
    import os
    import signal


    status, out = _capped("x = bytearray(96 << 20)\nprint('survived')\n", 32 << 20)
    if out.startswith("UNAVAILABLE"):
        pytest.skip(out.strip())
    assert status == -signal.SIGKILL and "survived" not in out
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(1 << 20) * 80)  # 80 MiB
    fd = os.open(big, os.O_RDONLY)
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    status, out = _capped(f"data = open({str(big)!r}, 'rb')\nwhile data.read(1 << 20):\n    pass\n"
                          "print(cap.peak_bytes())\ncap.leave()\n", 32 << 20)
    assert status == 0
    assert int(out.split()[-1]) <= 32 << 20
