"""NUMA placement: topology from a simulated sysfs folder, the hottest experts on the compute node and the
cold tail on the other, a no-op on one node, libnuma (where present) binding and freeing real memory."""

from __future__ import annotations

import gc

import pytest
import torch
from containers import TINY_CONFIG
from runtime_fixtures import RUNTIME_CONFIG, greedy, prompts, write_runtime_container

import prism_load
from prism_load.models.moe import ExpertWeights
from prism_load.runtime import ExpertCache, MemoryStore
from prism_load.runtime.numa import (
    LibNuma,
    NumaError,
    NumaPlacement,
    Topology,
    auto_placement,
    compute_node,
    parse_cpulist,
    pci_numa_node,
    plan_placement,
)
from prism_load.runtime.stores import weights_tensors

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_topology(root, cpulists: list[str], free_kib: int = 1 << 20):
    """A sysfs node folder: online, nodeN/{cpulist, meminfo, distance}."""
    root.mkdir(parents=True, exist_ok=True)
    n = len(cpulists)
    (root / "online").write_text(f"0-{n - 1}\n" if n > 1 else "0\n")
    for i, cpus in enumerate(cpulists):
        node = root / f"node{i}"
        node.mkdir()
        (node / "cpulist").write_text(cpus + "\n")
        (node / "meminfo").write_text(f"Node {i} MemTotal:       {4 * free_kib} kB\nNode {i} MemFree:        "
                                      f"{free_kib} kB\nNode {i} MemUsed:        {3 * free_kib} kB\n")
        (node / "distance").write_text(" ".join("10" if j == i else "21" for j in range(n)) + "\n")
    return root


class FakeAllocator:
    """Records (bytes, node) of every allocation; memory from torch."""

    def __init__(self):
        self.calls, self.buffers = [], []

    def alloc(self, nbytes, node):
        buf = torch.empty(nbytes, dtype=torch.uint8)
        self.calls.append((nbytes, node))
        self.buffers.append((buf.data_ptr(), nbytes, node))
        return buf

    def node_of(self, tensor) -> int | None:
        p = tensor.data_ptr()
        return next((node for start, n, node in self.buffers if start <= p < start + n), None)


def skewed_store(layers=(0, 1)) -> MemoryStore:
    gen = torch.Generator().manual_seed(0)
    experts = {(i, e): ExpertWeights(torch.randn(8, 4, generator=gen), torch.randn(4, 4, generator=gen))
               for i in layers for e in range(4)}
    frequencies = {(i, e): [0.7, 0.2, 0.07, 0.03][e] for i in layers for e in range(4)}
    return MemoryStore(experts, num_experts=4, top_k=1, frequencies=frequencies)


def test_parse_cpulist():
    assert parse_cpulist("0-3,8,10-11\n") == {0, 1, 2, 3, 8, 10, 11}
    assert parse_cpulist("") == set()


def test_discover_two_nodes(tmp_path):
    topo = Topology.discover(write_topology(tmp_path / "node", ["0-1", "2-3"], free_kib=1024))
    assert [n.index for n in topo.nodes] == [0, 1] and topo.multi
    assert topo.node(1).cpus == {2, 3} and topo.node(0).mem_free_bytes == 1024 * 1024
    assert topo.node(0).mem_total_bytes == 4 * 1024 * 1024 and topo.node(1).distances == (21, 10)
    assert topo.node_of_cpus({2, 3}) == 1 and topo.node_of_cpus({0, 1, 2}) == 0 and topo.node_of_cpus({9}) == 0
    assert compute_node(topo, "cpu", cpus={3}) == 1
    with pytest.raises(NumaError, match="node 5 does not exist"):
        topo.node(5)


def test_discover_without_sysfs_is_one_node(tmp_path):
    topo = Topology.discover(tmp_path / "absent")
    assert not topo.multi and topo.nodes[0].cpus


def test_gpu_pci_node(tmp_path):
    for address, value in (("0000:3b:00.0", "1"), ("0000:af:00.0", "-1")):
        (tmp_path / address).mkdir()
        (tmp_path / address / "numa_node").write_text(value + "\n")
    assert pci_numa_node("0000:3b:00.0", tmp_path) == 1
    assert pci_numa_node("0000:af:00.0", tmp_path) is None  # the kernel does not know
    assert pci_numa_node("0000:00:02.0", tmp_path) is None


def test_hot_experts_bound_to_compute_node(tmp_path):
    """Compute on node 1 (CPUs 2-3); room there for the 2 hottest experts of each of 2 layers (4 of 8)."""
    topo = Topology.discover(write_topology(tmp_path / "node", ["0-1", "2-3"]))
    store, allocator = skewed_store(), FakeAllocator()
    placement = plan_placement(store, topo, compute=compute_node(topo, cpus={2, 3}),
                               local_bytes=4 * store.nbytes(0, 0), allocator=allocator)
    assert placement.local_keys == {(0, 0), (0, 1), (1, 0), (1, 1)}
    cache = ExpertCache(store, 8 * 4096, placement=placement)
    for layer in (0, 1):
        for e in range(4):
            w = cache.acquire(layer, [e])[e]
            expected = store.experts[(layer, e)]
            assert torch.equal(w.gate_up, expected.gate_up) and torch.equal(w.down, expected.down)
            nodes = {allocator.node_of(t) for t in weights_tensors(w)}
            assert nodes == {1 if e < 2 else 0}  # every tensor inside a buffer bound to the right node
            cache.release_thread()
    assert sorted(node for _, node in allocator.calls) == [0] * 4 + [1] * 4
    assert placement.placed_bytes[1] == placement.placed_bytes[0] > 0


def test_placed_model_matches_resident(tmp_path):
    """A container loaded with a 2-node placement: same tokens as resident; allocations follow frequency."""
    path = write_runtime_container(tmp_path / "m.prism")
    resident = prism_load.load(path)
    from test_runtime_cache import resident_store

    store = resident_store(path)
    topo = Topology.discover(write_topology(tmp_path / "node", ["0-1", "2-3"]))
    allocator = FakeAllocator()
    local = 6 * store.nbytes(0, 0)
    placement = plan_placement(store, topo, compute=0, local_bytes=local, allocator=allocator)
    model = prism_load.load(path, expert_cache="100%", prefetch=True, numa=placement)
    assert model.runtime.cache.placement is placement and model.runtime.cache.slabs is None
    for ids in prompts(2, RUNTIME_CONFIG["vocab_size"], seed=5):
        assert torch.equal(greedy(model, ids, 8), greedy(resident, ids, 8))
    least_local = min(store.frequency(*k) for k in placement.local_keys)
    most_remote = max(store.frequency(i, e) for i in store.moe_layers for e in range(store.num_experts)
                      if (i, e) not in placement.local_keys)
    assert len(placement.local_keys) == 6 and least_local >= most_remote  # the local set is the hottest
    placed = model.stats()["numa"]["placed_bytes"]
    assert set(placed) == {0, 1} and {node for _, node in allocator.calls} == {0, 1}


def test_one_node_is_a_noop(tmp_path):
    topo = Topology.discover(write_topology(tmp_path / "node", ["0-3"]))
    store, allocator = skewed_store(), FakeAllocator()
    placement = NumaPlacement(topo, allocator, 0, [(0, 0)])
    w = store.experts[(0, 0)]
    assert not placement.active and placement.place((0, 0), w) is w
    assert auto_placement(store, root=tmp_path / "node", allocator=allocator) is None
    model_path = write_runtime_container(tmp_path / "m.prism", config=TINY_CONFIG)
    model = prism_load.load(model_path, expert_cache="50%", numa=placement)
    greedy(model, prompts(1, 64)[0], 4)
    assert model.runtime.cache.placement is None and allocator.calls == []


def test_auto_placement_on_simulated_two_nodes(tmp_path):
    """numa=True's planner: compute node from the CPUs, local room = half the node's free memory."""
    store = skewed_store()
    assert store.nbytes(0, 0) == 192
    root = write_topology(tmp_path / "node", ["0-1", "2-3"], free_kib=1)  # 512 B local: 2 experts of 192 B
    placement = auto_placement(store, root=root, cpus={2, 3}, allocator=FakeAllocator())
    assert placement.compute == 1 and placement.local_keys == {(0, 0), (1, 0)}


@pytest.mark.skipif(LibNuma.load() is None, reason="libnuma.so.1 not available")
def test_libnuma_binds_and_frees_memory():
    lib = LibNuma.load()
    page = 4096
    t = lib.alloc(3 * page, 0)
    view = t[page:].view(torch.float32)
    t.fill_(1)  # first touch
    assert lib.page_nodes(t) == [0, 0, 0]
    assert lib.allocated_bytes == 3 * page and lib.freed_bytes == 0
    del t
    gc.collect()
    assert lib.freed_bytes == 0  # a view still holds the buffer
    assert bool(view.view(torch.uint8).eq(1).all())  # still readable: the memory was not freed under it
    del view
    gc.collect()
    assert lib.freed_bytes == 3 * page
