"""bench/bench_batch.py on a tiny container: a batch touches at least the experts one row does, the cache
statistics come out, and the markdown table has a row per configuration and batch size."""

from pathlib import Path

from runtime_fixtures import write_runtime_container

BENCH = Path(__file__).resolve().parent.parent / "bench"


def test_batch_bench_runs_on_a_tiny_container(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import bench_batch

    path = write_runtime_container(tmp_path / "m.prism")
    rows = bench_batch.run(path, [1, 4], tokens=3, repeats=1, synthetic=True)
    assert [(r["name"], r["batch"]) for r in rows] == [(n, b) for n, *_ in bench_batch.CONFIGS for b in (1, 4)]
    for r in rows:
        assert r["decode_tokens"] == 2 * r["batch"] and r["decode_tokens_per_second"] > 0
        assert 1 <= r["experts_per_layer_step"] <= r["num_experts"]
    one, four = rows[0], rows[1]
    assert one["experts_per_layer_step"] == 2 and four["experts_per_layer_step"] >= 2  # top-2 routing
    cached = [r for r in rows if r["name"].startswith("cache")]
    assert cached and all(0 <= r["hit_rate"] <= 1 for r in cached)
    # the A/B row decodes the same tokens and touches the same experts as the resident row
    torch_ops = [r for r in rows if r["name"] == "resident, batch by torch ops"]
    assert [r["experts_per_layer_step"] for r in torch_ops] == [r["experts_per_layer_step"] for r in rows[:2]]
    table = bench_batch.markdown({"device": "cpu", "threads": 1, "tokens": 3, "container": str(path), "rows": rows})
    assert table.count("\n| ") == 1 + len(rows)  # the header and a line per row
