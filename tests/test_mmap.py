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


def test_mmap_applies_to_resident_packed_containers_only(container):
    with pytest.raises(TypeError, match="mmap applies to resident containers"):
        prism_load.load(container, mmap=True, expert_cache="50%")
    # options at their defaults apply everywhere (a wrapper that forwards every keyword)
    assert prism_load.load(container, mmap=False, expert_cache="50%").stats()["uses"] == 0
    assert not hasattr(prism_load.load(container, numa=None, prefetch_extra=0), "runtime")
    with pytest.raises(ContainerError, match="expert_form='decoded' does not keep"):
        prism_load.load(container, mmap=True, expert_form="decoded")


def test_prism_run_refuses_mmap_beside_a_cache_by_name(container):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "prism_convert.cli", "run", str(container), "--mmap", "--cache", "50%"],
                          capture_output=True, text=True)
    assert done.returncode != 0
    assert "--mmap maps every expert resident; --cache 50% serves them" in done.stdout + done.stderr
    assert "Traceback" not in done.stderr
