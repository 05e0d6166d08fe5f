"""native/read_range: a file range read by several OpenMP threads is the same bytes as one pread, at any offset
and length (the 64 KiB shares, a last share shorter or empty), fewer only where the file ends, and a failed read
is an OSError with its errno; a container's expert read this way is the same expert."""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest

from prism_load import native
from prism_load.native import read_range
from prism_load.native.read_range import PARALLEL_READ_BYTES, pread_into

pytestmark = pytest.mark.skipif(not native.available(), reason=f"native kernels: {native.unavailable_reason()}")


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("read") / "blob"
    data = np.random.default_rng(0).integers(0, 256, (5 << 20) + 12345, dtype=np.uint8)
    path.write_bytes(data.tobytes())
    return path, data


@pytest.fixture
def data_fd(data_file):
    """(an open descriptor of the data file, its bytes), closed after the test."""
    path, data = data_file
    fd = os.open(path, os.O_RDONLY)
    yield fd, data
    os.close(fd)


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("offset, length", [(0, PARALLEL_READ_BYTES), (7, PARALLEL_READ_BYTES + 1),
                                            (65536 * 3 + 1, 3 * PARALLEL_READ_BYTES + 99), (12345, 131073 * 9),
                                            (5, (1 << 20) * 4 + 3)])
def test_a_split_read_is_the_same_bytes(data_fd, threads, offset, length):
    fd, data = data_fd
    out = np.zeros(length, np.uint8)
    assert pread_into(fd, out, offset, threads) == length
    assert np.array_equal(out, data[offset : offset + length])


def test_a_split_read_into_a_bytearray(data_fd):
    """read_expert_bytes reads into a fresh bytearray where it has no slab (the resident load's other experts)."""
    fd, data = data_fd
    out = bytearray(2 * PARALLEL_READ_BYTES + 3)
    assert pread_into(fd, out, 11, 2) == len(out) and bytes(out) == data[11 : 11 + len(out)].tobytes()


def test_a_split_read_past_the_end_returns_what_the_file_has(data_fd):
    fd, data = data_fd
    offset = len(data) - PARALLEL_READ_BYTES - 100
    out = np.zeros(2 * PARALLEL_READ_BYTES, np.uint8)
    assert pread_into(fd, out, offset, 2) == PARALLEL_READ_BYTES + 100
    assert np.array_equal(out[: PARALLEL_READ_BYTES + 100], data[offset:]) and not out[PARALLEL_READ_BYTES + 100 :].any()


def test_a_failed_split_read_raises_its_errno(tmp_path):
    out = np.zeros(PARALLEL_READ_BYTES, np.uint8)
    fd = os.open(tmp_path, os.O_RDONLY)  # a directory: pread fails with EISDIR
    try:
        with pytest.raises(OSError) as caught:
            pread_into(fd, out, 0, 2)
        assert caught.value.errno == errno.EISDIR
    finally:
        os.close(fd)
    with pytest.raises(OSError) as caught:
        pread_into(10_000, out, 0, 2)  # not an open descriptor
    assert caught.value.errno == errno.EBADF


def test_small_or_one_thread_reads_stay_one_preadv(data_fd, monkeypatch):
    """Below PARALLEL_READ_BYTES, or with one thread, the native call is not made (a parallel region costs more)."""
    fd, data = data_fd
    monkeypatch.setattr(read_range, "load", lambda: pytest.fail("the native read was called"))
    small = np.zeros(PARALLEL_READ_BYTES - 1, np.uint8)
    assert pread_into(fd, small, 5, 2) == len(small) and np.array_equal(small, data[5 : 5 + len(small)])
    big = np.zeros(PARALLEL_READ_BYTES, np.uint8)
    assert pread_into(fd, big, 5, 1) == len(big) and np.array_equal(big, data[5 : 5 + len(big)])


def test_a_cache_and_a_resident_load_reading_every_expert_split_give_the_same_logits(tmp_path, monkeypatch):
    """With the threshold at one byte every expert read of a resident load and of a cache's misses is split
    across two threads (read_range.c's path, on the tiny container's small experts): the logits are those of
    one-thread reads, and the cache reads what a resident load reads."""
    import torch
    from containers import random_model, write_tiny
    from runtime_fixtures import greedy, load_cached, prompts
    from test_packed import INT4_G32, KERNEL_CONFIG

    import prism_load

    path = write_tiny(tmp_path / "m.prism", random_model(KERNEL_CONFIG), config=KERNEL_CONFIG, mix=INT4_G32)
    ids = prompts(2, KERNEL_CONFIG["vocab_size"], seed=5)
    plain = prism_load.load(path)
    calls = []
    native_pread = read_range.load()[0].pread

    def counted(*args):
        calls.append(args[4])  # the threads asked for
        return native_pread(*args)

    monkeypatch.setattr(read_range, "PARALLEL_READ_BYTES", 1)
    monkeypatch.setattr(read_range, "load", lambda: (type("Fn", (), {"pread": staticmethod(counted)}), None, 0.0))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        split = prism_load.load(path)
        cached = load_cached(path, "40%", prefetch=False)
        for x in ids:
            assert torch.equal(split(x), plain(x)) and torch.equal(cached(x), plain(x))
            want = greedy(plain, x, 6)  # (greedy decodes on one thread)
            torch.set_num_threads(2)
            assert torch.equal(cached.generate(x, max_new_tokens=6, eos_token_id=[]), want)
    finally:
        torch.set_num_threads(threads)
    # the resident load read every expert once, the cache each of its misses (and its warm experts) at least
    experts = KERNEL_CONFIG["num_hidden_layers"] * KERNEL_CONFIG["num_local_experts"]
    assert cached.stats()["misses"] > 0 and len(calls) >= experts + cached.stats()["misses"] and set(calls) == {2}
