"""bench/bench_peer.py without llama-cpp-python: says how to install the extra, exits 0, writes nothing."""

import sys
from pathlib import Path

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
