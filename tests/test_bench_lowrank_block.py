"""bench/bench_lowrank_block.py at a small shape: the composite block and the plain one both run, the factors'
share of the bytes is the arithmetic of the shapes, and the table has a row per shape."""

from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"


def test_lowrank_block_bench_runs_at_a_small_shape(q8, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import bench_lowrank_block as bench

    row = bench.measure(64, 128, 8, repeats=2)
    assert row["plain_ms"] > 0 and row["composite_ms"] > 0 and row["one_by_one_ms"] > 0
    assert row["factor_share"] == 8 * (64 + 128) * bench.FACTOR_BITS / (3 * 64 * 128 * bench.BASE_BITS)
    table = bench.markdown({"threads": 1, "repeats": 2, "machine": {"cpu": "test"}, "rows": [row, row]})
    assert table.count("\n| 64 x 128 | 8 |") == 2
