"""Fuzzing the container boundary: mutated manifests (values, types, deletions, unknown keys) and mutated
safetensors headers must either load and verify or raise ContainerError — never anything else."""

import json
import math
import shutil

import pytest
import torch
from containers import random_model, write_tiny
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import prism_load
from prism_load.container.verify import verify_container
from prism_load.errors import ContainerError

OPAQUE = ("recipe", "budget", "quality", "extra")  # free-form objects: any JSON is valid there
FAST = settings(max_examples=60, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
LONG = settings(FAST, max_examples=600, derandomize=False)


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    model = random_model()
    path = write_tiny(tmp_path_factory.mktemp("fuzz") / "good.prism", model)
    ids = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = prism_load.load(path)(ids)
    return path, ids, logits


def _paths(node, prefix=()):
    """Every path into the manifest tree, except inside opaque objects."""
    yield prefix
    if prefix and prefix[0] in OPAQUE:
        return
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for k, v in items:
        yield from _paths(v, (*prefix, k))


def _get(node, path):
    for k in path:
        node = node[k]
    return node


scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.integers(-5, 70_000),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(["hot", "cold", "fast", "host", "int", "bf16", "lowrank", "../x", "/etc/passwd", "a" * 300]),
)
json_values = st.recursive(scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                           max_leaves=5)


def _mutate(manifest: dict, data) -> dict:
    path = data.draw(st.sampled_from(list(_paths(manifest))[1:]), label="path")
    parent, key = _get(manifest, path[:-1]), path[-1]
    value = parent[key]
    ops = ["replace", "delete", "unknown key"]
    if isinstance(value, int) and not isinstance(value, bool):
        ops += ["nudge", "nudge"]  # near-valid integers reach the deeper checks (offsets, indices, lengths)
    op = data.draw(st.sampled_from(ops), label="op")
    if op == "replace":
        parent[key] = data.draw(json_values, label="value")
    elif op == "nudge":
        parent[key] = value + data.draw(st.sampled_from([-4096, -1, 1, 4096, 8192, -value]), label="delta")
    elif op == "delete":
        del parent[key]
    else:
        target = value if isinstance(value, dict) else parent if isinstance(parent, dict) else manifest
        target[data.draw(st.text(min_size=1, max_size=6), label="new key")] = data.draw(scalars, label="value")
    return manifest


def _outcome(path, good_ids, good_logits, verify_checksums=True) -> str:
    """'loaded' or 'refused'; anything but ContainerError propagates and fails the test."""
    problems = verify_container(path)
    try:
        model = prism_load.load(path, verify_checksums=verify_checksums)
    except ContainerError:
        return "refused"
    with torch.no_grad():
        logits = model(good_ids)
    assert logits.shape == good_logits.shape
    if verify_checksums:  # it loaded and every byte it read was checked: verify agrees
        assert problems == [] or all("padding" in p for p in problems), problems
    return "loaded"


def _fresh_copy(good_path, tmp_path_factory):
    path = tmp_path_factory.mktemp("case") / "c.prism"
    shutil.copytree(good_path, path)
    return path


def _check_manifest_mutation(good, tmp_path_factory, data):
    good_path, ids, logits = good
    path = _fresh_copy(good_path, tmp_path_factory)
    manifest = _mutate(json.loads((path / "manifest.json").read_text()), data)
    try:
        text = json.dumps(manifest)
    except ValueError:
        return
    (path / "manifest.json").write_text(text)
    _outcome(path, ids, logits)
    shutil.rmtree(path.parent)


def _check_header_mutation(good, tmp_path_factory, data):
    good_path, ids, logits = good
    path = _fresh_copy(good_path, tmp_path_factory)
    shard = data.draw(st.sampled_from(sorted(p.name for p in path.glob("*.safetensors"))), label="shard")
    raw = bytearray((path / shard).read_bytes())
    header_end = 8 + int.from_bytes(raw[:8], "little")
    for _ in range(data.draw(st.integers(1, 3), label="bytes")):
        at = data.draw(st.integers(0, header_end - 1), label="offset")
        raw[at] = data.draw(st.sampled_from([0, 32, 34, 44, 48, 49, 57, 91, 93, 123, 125, raw[at] ^ 1, 255]), label="byte")
    (path / shard).write_bytes(raw)
    _outcome(path, ids, logits, verify_checksums=data.draw(st.booleans(), label="checksums"))
    shutil.rmtree(path.parent)


@FAST
@given(data=st.data())
def test_manifest_mutations(good, tmp_path_factory, data):
    _check_manifest_mutation(good, tmp_path_factory, data)


@FAST
@given(data=st.data())
def test_header_mutations(good, tmp_path_factory, data):
    _check_header_mutation(good, tmp_path_factory, data)


@pytest.mark.slow
@LONG
@given(data=st.data())
def test_manifest_mutations_long(good, tmp_path_factory, data):
    _check_manifest_mutation(good, tmp_path_factory, data)


@pytest.mark.slow
@LONG
@given(data=st.data())
def test_header_mutations_long(good, tmp_path_factory, data):
    _check_header_mutation(good, tmp_path_factory, data)


def test_a_harmless_mutation_loads(good, tmp_path_factory):
    """Statistics are descriptive: changing one keeps the model identical (the fuzz accepts such loads)."""
    good_path, ids, logits = good
    path = _fresh_copy(good_path, tmp_path_factory)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["experts"][0]["frequency"] = 0.999
    (path / "manifest.json").write_text(json.dumps(manifest))
    with torch.no_grad():
        assert torch.equal(prism_load.load(path)(ids), logits)
    assert not math.isnan(manifest["experts"][0]["frequency"])
