"""bench/miss_profile.py: every step it names exists (a rename would leave its table empty), its timers count
the decode tokens' calls of the miss path on a tiny container, and it puts the runtime back afterwards."""

from pathlib import Path

from runtime_fixtures import load_cached, prompts
from test_native_token import CONFIG, write_plain

from prism_load.container import reader
from prism_load.runtime.cache import ExpertCache

BENCH = Path(__file__).resolve().parent.parent / "bench"


def test_the_miss_profile_times_every_step_of_a_miss_and_restores_them(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import miss_profile

    # stored as the built-in recipes store a model (int8 attention, int4 experts): a decode token runs in the native
    # loop, which calls back into the cache for a layer with a miss
    path = write_plain(tmp_path)
    monkeypatch.setenv("PRISM_NATIVE_MISSES", "0")  # the Python path it times (misses served natively skip it)
    serve_now, pread_into = ExpertCache._serve_now, reader.pread_into
    totals: dict = {}
    restore = miss_profile.wrap(totals)
    try:
        assert ExpertCache._serve_now is not serve_now and reader.pread_into is not pread_into
        model = load_cached(path, "40%", prefetch=False)
        ids = prompts(2, CONFIG["vocab_size"], seed=3)
        rate, tokens, misses = miss_profile.decode_rate(model, ids, 6, totals)
    finally:
        restore()
    assert ExpertCache._serve_now is serve_now and reader.pread_into is pread_into
    assert rate > 0 and tokens == 2 * 5 and misses > 0
    calls = {key: slot[2] for key, slot in totals.items()}  # the decode tokens' calls
    assert set(calls) == {miss_profile.label(m, o, n) for _, m, o, n in miss_profile.STEPS}
    # each decode miss is one reservation and one read
    assert calls["ExpertCache._add_entry"] == misses == calls["reader.pread_into"]
    assert calls["ExpertServer._route"] >= calls["ExpertCache._serve_now"] > 0  # served through the native loop
    assert calls["ContainerStore.read_into"] == misses  # packed int4: every miss is a read into a slab
    assert all(slot[3] <= slot[1] for slot in totals.values())  # the decode's share of all the time
