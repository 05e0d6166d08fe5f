"""NUMA placement: the hottest experts in memory bound to the compute's node, the cold tail on the others.

On a multi-socket machine a matmul reading weights from the other socket's memory crosses the link
(KTransformers places experts by node for this reason). The topology comes from sysfs
(`/sys/devices/system/node`, root injectable for tests); the compute node is the node of the CPUs this
process may run on (pin them first: `numactl --cpunodebind`, taskset), or the GPU's PCI node on CUDA.
Memory is bound with libnuma through ctypes (`numa_alloc_onnode`, then filled with copy_, since a copy made
by `.to()` or `.clone()` would come from the default allocator again); each buffer is freed by
weakref.finalize once the last tensor viewing it is gone. With one node every call is a no-op.
Reference: numa(3); the pitfalls in /work/shared/reference/hf-moe-formats.md section 5.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import weakref
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from ..errors import PrismError
from ..models.moe import ExpertWeights
from .cuda import gpu_pci_address
from .stores import ExpertStore, Key, pack_into, packed_nbytes, prior_frequency

SYS_NODE_ROOT = "/sys/devices/system/node"
SYS_PCI_ROOT = "/sys/bus/pci/devices"


class NumaError(PrismError):
    """A NUMA option names a node the machine does not have, or the topology cannot be read."""


def parse_cpulist(text: str) -> set[int]:
    """sysfs list syntax: "0-3,8,10-11" -> {0, 1, 2, 3, 8, 10, 11}."""
    out: set[int] = set()
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


@dataclass(frozen=True)
class Node:
    index: int
    cpus: frozenset[int]
    mem_total_bytes: int | None = None
    mem_free_bytes: int | None = None
    distances: tuple[int, ...] = ()


@dataclass(frozen=True)
class Topology:
    nodes: tuple[Node, ...]

    @classmethod
    def discover(cls, root: str | Path = SYS_NODE_ROOT) -> Topology:
        """Nodes from sysfs; a machine without the folder is one node holding every CPU."""
        root = Path(root)
        if (root / "online").is_file():
            indices = sorted(parse_cpulist((root / "online").read_text()))
        else:
            indices = sorted(int(p.name[4:]) for p in root.glob("node[0-9]*")) if root.is_dir() else []
        if not indices:
            return cls((Node(0, frozenset(range(os.cpu_count() or 1))),))
        return cls(tuple(_read_node(root / f"node{i}", i) for i in indices))

    @property
    def multi(self) -> bool:
        return len(self.nodes) > 1

    def node(self, index: int) -> Node:
        for n in self.nodes:
            if n.index == index:
                return n
        raise NumaError(f"NUMA node {index} does not exist (nodes: {[n.index for n in self.nodes]})")

    def node_of_cpus(self, cpus: Iterable[int]) -> int:
        """The node holding most of these CPUs (the lowest index on a tie)."""
        cpus = set(cpus)
        return max(self.nodes, key=lambda n: (len(n.cpus & cpus), -n.index)).index


def _read_node(folder: Path, index: int) -> Node:
    def read(name: str) -> str | None:
        path = folder / name
        return path.read_text() if path.is_file() else None

    cpus = parse_cpulist(read("cpulist") or "")
    meminfo = {}
    for line in (read("meminfo") or "").splitlines():  # "Node 0 MemTotal:       24573504 kB"
        parts = line.split()
        if len(parts) == 5 and parts[4] == "kB":
            meminfo[parts[2].rstrip(":")] = int(parts[3]) * 1024
    distances = tuple(int(d) for d in (read("distance") or "").split())
    return Node(index, frozenset(cpus), meminfo.get("MemTotal"), meminfo.get("MemFree"), distances)


def pci_numa_node(address: str, pci_root: str | Path = SYS_PCI_ROOT) -> int | None:
    """NUMA node of a PCI device (a GPU) from sysfs; None when the kernel does not know (-1) or no such file."""
    path = Path(pci_root) / address / "numa_node"
    if not path.is_file():
        return None
    node = int(path.read_text().strip())
    return None if node < 0 else node


def compute_node(topology: Topology, device: torch.device | str = "cpu", cpus: Iterable[int] | None = None,
                 pci_root: str | Path = SYS_PCI_ROOT) -> int:
    """Node of the GPU's PCI slot on CUDA (when known), else of the CPUs this process may run on."""
    device = torch.device(device)
    if device.type == "cuda":
        node = gpu_pci_node(device.index or 0, pci_root)
        if node is not None:
            return node
    return topology.node_of_cpus(os.sched_getaffinity(0) if cpus is None else cpus)


def gpu_pci_node(device_index: int = 0, pci_root: str | Path = SYS_PCI_ROOT) -> int | None:
    """NUMA node of a GPU's PCI slot (sysfs `numa_node`; -1 or missing means unknown)."""
    address = gpu_pci_address(device_index)
    return None if address is None else pci_numa_node(address, pci_root)


def bind_thread(cpus: Iterable[int]) -> None:
    """Run the calling thread (only it: threads already running keep their mask) on these CPUs."""
    with contextlib.suppress(OSError):  # a container may forbid it; bound memory does not depend on it
        os.sched_setaffinity(0, set(cpus))


# -- allocators --------------------------------------------------------------------------------------------
class Allocator(Protocol):
    def alloc(self, nbytes: int, node: int) -> torch.Tensor:
        """A uint8 tensor of nbytes whose pages live on `node`."""


class LibNuma:
    """libnuma through ctypes. Memory from numa_alloc_onnode is bound (MPOL_BIND) to the node, so its pages
    land there on first touch, whichever thread touches them."""

    def __init__(self, path: str = "libnuma.so.1"):
        lib = ctypes.CDLL(path, use_errno=True)
        if lib.numa_available() == -1:  # must be the first call (numa(3))
            raise OSError("numa_available() == -1: this kernel has no NUMA support")
        lib.numa_alloc_onnode.restype = ctypes.c_void_p
        lib.numa_alloc_onnode.argtypes = [ctypes.c_size_t, ctypes.c_int]
        lib.numa_free.restype = None
        lib.numa_free.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        lib.numa_move_pages.restype = ctypes.c_int
        lib.numa_move_pages.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.POINTER(ctypes.c_void_p),
                                        ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int), ctypes.c_int]
        self.lib = lib
        self.allocated_bytes = self.freed_bytes = 0

    @classmethod
    def load(cls) -> LibNuma | None:
        try:
            return cls()
        except OSError:
            return None

    def alloc(self, nbytes: int, node: int) -> torch.Tensor:
        ptr = self.lib.numa_alloc_onnode(nbytes, node)
        if not ptr:
            raise MemoryError(f"numa_alloc_onnode({nbytes}, {node}) failed")
        self.allocated_bytes += nbytes
        buf = (ctypes.c_char * nbytes).from_address(ptr)
        # torch.frombuffer keeps `buf` alive while any view of the tensor lives; free only after the last.
        weakref.finalize(buf, self._free, ptr, nbytes)
        return torch.frombuffer(buf, dtype=torch.uint8)

    def _free(self, ptr: int, nbytes: int) -> None:
        self.lib.numa_free(ptr, nbytes)  # needs the original size (numa(3))
        self.freed_bytes += nbytes

    def page_nodes(self, tensor: torch.Tensor) -> list[int]:
        """Node of each page of a tensor's memory (move_pages with nodes=NULL only queries); <0 = not present."""
        page = os.sysconf("SC_PAGE_SIZE")
        start = tensor.data_ptr() // page * page
        end = tensor.data_ptr() + tensor.numel() * tensor.element_size()
        addrs = list(range(start, end, page))
        pages = (ctypes.c_void_p * len(addrs))(*addrs)
        status = (ctypes.c_int * len(addrs))()
        if self.lib.numa_move_pages(0, len(addrs), pages, None, status, 0) != 0:
            raise OSError(ctypes.get_errno(), "numa_move_pages failed")
        return list(status)


# -- placement ---------------------------------------------------------------------------------------------
class NumaPlacement:
    """Where each expert's decoded weights live: `local_keys` on the compute node, the rest spread over the
    other nodes. `place` copies an expert into memory bound to its node (one buffer per expert)."""

    def __init__(self, topology: Topology, allocator: Allocator, compute: int, local_keys: Iterable[Key]):
        topology.node(compute)
        self.topology, self.allocator, self.compute = topology, allocator, compute
        self.local_keys = frozenset(local_keys)
        self.remote = [n.index for n in topology.nodes if n.index != compute]
        self.placed_bytes: Counter[int] = Counter()  # node -> bytes placed so far

    @property
    def active(self) -> bool:
        return self.topology.multi

    def node_for(self, key: Key) -> int:
        if key in self.local_keys or not self.remote:
            return self.compute
        return self.remote[(key[0] * 7919 + key[1]) % len(self.remote)]

    def place(self, key: Key, weights: ExpertWeights) -> ExpertWeights:
        if not self.active:
            return weights
        node, nbytes = self.node_for(key), packed_nbytes(weights)
        buf = self.allocator.alloc(nbytes, node)
        self.placed_bytes[node] += nbytes
        return pack_into(buf, weights)  # the first touch, under the buffer's bind policy


def plan_placement(store: ExpertStore, topology: Topology, compute: int, local_bytes: int,
                   allocator: Allocator | None = None) -> NumaPlacement:
    """The hottest experts (by the profile's frequency) that fit in local_bytes go on the compute node."""
    keys = [(i, e) for i in store.moe_layers for e in range(store.num_experts)]
    keys.sort(key=lambda k: -prior_frequency(store, *k))
    local, used = [], 0
    for key in keys:
        nbytes = store.nbytes(*key)
        if used + nbytes > local_bytes:
            break
        local.append(key)
        used += nbytes
    if allocator is None:
        allocator = LibNuma.load()
        if allocator is None and topology.multi:
            raise NumaError("numa placement needs libnuma (libnuma.so.1), which could not be loaded")
    return NumaPlacement(topology, allocator, compute, local)


def auto_placement(store: ExpertStore, device="cpu", local_bytes: int | None = None,
                   root: str | Path = SYS_NODE_ROOT, cpus: Iterable[int] | None = None,
                   allocator: Allocator | None = None) -> NumaPlacement | None:
    """`numa=True`: None on a one-node machine; else the hottest experts within local_bytes (default half
    the compute node's free memory) on the compute node (the GPU's, or that of `cpus`, default this
    process's CPUs)."""
    topology = Topology.discover(root)
    if not topology.multi:
        return None
    node = compute_node(topology, device, cpus)
    if local_bytes is None:
        free = topology.node(node).mem_free_bytes
        local_bytes = free // 2 if free else 0
    return plan_placement(store, topology, node, local_bytes, allocator)
