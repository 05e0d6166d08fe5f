"""`prism plan`: what fits where, and how fast decode can be at best, by arithmetic on config.json alone.

Parameters are counted on the family's own model built on the meta device (so the count is what prism
loads); weights are priced with the codecs' exact `Encoding.nbytes()`; placement fills GPU, then RAM,
then disk; decode speed is bounded by the bytes each token reads from each tier over that tier's link.
Units: GB = 10^9 bytes, GB/s = 10^9 bytes per second.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from prism_convert.tools.model_shape import CLASSES, ContainerBytes, ModelShape, classify, load_shape
from prism_load.container.format import INT_BITS, Encoding
from prism_load.errors import BudgetError

DENSE_POLICIES = ("bf16", "int8", "same")
KV_BYTES_PER_ELEMENT = 2  # the KV cache is assumed bf16
_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_bytes(text: str | int | float, what: str = "size") -> int:
    """'32GB' -> 32e9 (decimal units; KiB/MiB/GiB binary); '25GB/s' for bandwidths."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*(/\s*s)?\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise BudgetError(f"{what} {text!r} not understood (examples: 32GB, 24GiB, 25GB/s)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def human_bytes(n: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


# -- how it is stored ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WeightFormat:
    """bits 16: bf16; bits in INT_BITS: group-wise int with fp16 scale and zero per group (the codecs'
    `int`); any other bits: an average stored bits per weight, overhead included (as `prism compress --bits`)."""

    bits: float
    group_size: int = 128

    def __post_init__(self):
        if not 1 <= self.bits <= 16:
            raise BudgetError(f"--bits {self.bits:g} is out of range [1, 16]")
        if self.group_size <= 0:
            raise BudgetError(f"--group-size {self.group_size} must be positive")

    def encoding(self, shape: tuple[int, ...]) -> Encoding | None:
        if self.bits == 16:
            return Encoding("bf16", shape)
        if self.bits in INT_BITS and len(shape) == 2:
            return Encoding("int", shape, bits=int(self.bits), group_size=self.group_size)
        return None

    def nbytes(self, shape: tuple[int, ...]) -> int:
        enc = self.encoding(shape)
        return enc.nbytes() if enc is not None else math.ceil(math.prod(shape) * self.bits / 8)

    def label(self) -> str:
        if self.bits == 16:
            return "bf16"
        if self.bits in INT_BITS:
            return f"int{int(self.bits)}/g{self.group_size}"
        return f"{self.bits:g} bits average"


@dataclass(frozen=True)
class Storage:
    expert: WeightFormat
    dense_policy: str = "bf16"

    def __post_init__(self):
        if self.dense_policy not in DENSE_POLICIES:
            raise BudgetError(f"--dense {self.dense_policy!r} is not one of {', '.join(DENSE_POLICIES)}")

    @property
    def dense(self) -> WeightFormat:
        bits = {"bf16": 16, "int8": 8, "same": self.expert.bits}[self.dense_policy]
        return WeightFormat(bits, self.expert.group_size)

    def nbytes(self, cls: str, shape: tuple[int, ...]) -> int:
        if cls in ("routers", "norms"):
            return 4 * math.prod(shape)  # fp32, as prism's default recipe keeps them
        if len(shape) == 1:
            return 2 * math.prod(shape)  # biases and sinks stay bf16
        return (self.expert if cls == "routed_experts" else self.dense).nbytes(shape)

    def describe(self) -> str:
        dense = {
            "bf16": "bf16",
            "int8": f"int8/g{self.expert.group_size}",
            "same": f"{self.dense.label()} (same as experts)",
        }
        return (
            f"routed experts {self.expert.label()}; attention, shared experts, dense MLP layers, embedding and "
            f"LM head {dense[self.dense_policy]}; routers and norms fp32; biases and sinks bf16"
        )


# -- the machine -----------------------------------------------------------------------------------------
DEFAULT_BANDWIDTHS = {
    "gpu": (1000e9, "GPU memory ~1000 GB/s (RTX 4090-class GDDR6X; an H100's HBM3 is ~3350)"),
    "pcie": (25e9, "PCIe 4.0 x16 ~25 GB/s effective"),
    "ram": (60e9, "DDR5 dual channel ~60 GB/s"),
    "disk": (5e9, "NVMe ~5 GB/s"),
}


@dataclass(frozen=True)
class Machine:
    gpu_bytes: int
    ram_bytes: int
    gpu_bandwidth: float = DEFAULT_BANDWIDTHS["gpu"][0]
    pcie_bandwidth: float = DEFAULT_BANDWIDTHS["pcie"][0]
    ram_bandwidth: float = DEFAULT_BANDWIDTHS["ram"][0]
    disk_bandwidth: float = DEFAULT_BANDWIDTHS["disk"][0]

    def __post_init__(self):
        for name in ("gpu_bytes", "ram_bytes"):
            if getattr(self, name) < 0:
                raise BudgetError(f"{name} {getattr(self, name)} must not be negative")
        for name in ("gpu_bandwidth", "pcie_bandwidth", "ram_bandwidth", "disk_bandwidth"):
            if getattr(self, name) <= 0:
                raise BudgetError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")


# -- placement and speed ---------------------------------------------------------------------------------
def routing_frequencies(num_experts: int, top_k: int, zipf: float = 0.0) -> list[float]:
    """Expected share of tokens routed to each expert of a layer, hottest first; sums to top_k.

    zipf 0 is uniform routing (top_k / E each). zipf a > 0 weighs the r-th hottest expert by (r+1)^-a,
    scaled so the layer's k picks sum to k; an expert can hold at most every token (share capped at 1,
    the excess spread over the rest)."""
    weights = [(r + 1) ** -zipf for r in range(num_experts)]
    freq, free, mass = [0.0] * num_experts, list(range(num_experts)), float(top_k)
    while free:
        total = sum(weights[r] for r in free)
        capped = [r for r in free if mass * weights[r] / total > 1]
        if not capped:
            break
        for r in capped:
            freq[r] = 1.0
            mass -= 1
        free = [r for r in free if r not in capped]
    for r in free:
        freq[r] = mass * weights[r] / sum(weights[q] for q in free)
    return freq


@dataclass
class Tier:
    name: str
    capacity_bytes: float
    bandwidth: float  # bytes/s of the path from this tier to the compute
    stored_bytes: int = 0
    read_bytes_per_token: float = 0.0
    experts: int = 0

    @property
    def free_bytes(self) -> float:
        return self.capacity_bytes - self.stored_bytes

    def to_dict(self) -> dict:
        capacity = None if math.isinf(self.capacity_bytes) else int(self.capacity_bytes)
        return {
            "name": self.name,
            "capacity_bytes": capacity,
            "stored_bytes": self.stored_bytes,
            "read_bytes_per_token": round(self.read_bytes_per_token),
            "experts": self.experts,
            "path_bandwidth_bytes_per_second": self.bandwidth,
        }


def make_tiers(machine: Machine) -> list[Tier]:
    """GPU (when there is one), RAM, disk. With a GPU, RAM and disk bytes cross PCIe to reach it."""
    if machine.gpu_bytes == 0:
        return [
            Tier("ram", machine.ram_bytes, machine.ram_bandwidth),
            Tier("disk", math.inf, machine.disk_bandwidth),
        ]
    return [
        Tier("gpu", machine.gpu_bytes, machine.gpu_bandwidth),
        Tier("ram", machine.ram_bytes, min(machine.ram_bandwidth, machine.pcie_bandwidth)),
        Tier("disk", math.inf, min(machine.disk_bandwidth, machine.pcie_bandwidth)),
    ]


def place_block(tiers: list[Tier], stored: int, read: float) -> None:
    """A block read every token (dense weights, KV cache) goes to the fastest tiers with room, split if it must."""
    left = stored
    for tier in tiers:
        take = left if math.isinf(tier.free_bytes) else max(0, min(left, int(tier.free_bytes)))
        if take:
            tier.stored_bytes += take
            tier.read_bytes_per_token += read * take / stored
            left -= take
        if not left:
            return


def place_experts(tiers: list[Tier], experts: list[tuple[int, float]]) -> None:
    """Experts as (bytes, routed share), hottest first: each goes to the fastest tier it fits in."""
    for nbytes, share in experts:
        tier = next(t for t in tiers if t.free_bytes >= nbytes)
        tier.stored_bytes += nbytes
        tier.read_bytes_per_token += share * nbytes
        tier.experts += 1


def decode_ceiling(tiers: list[Tier], machine: Machine) -> dict:
    """Tokens/s bound by bytes moved: serial (a miss stalls, no overlap between tiers) and with perfect
    overlap (only the busiest link counts). Compute, latency and activations are free here."""
    read = {t.name: t.read_bytes_per_token for t in tiers}
    serial = sum(t.read_bytes_per_token / t.bandwidth for t in tiers)
    busy = {"ram": read["ram"] / machine.ram_bandwidth, "disk": read["disk"] / machine.disk_bandwidth}
    if "gpu" in read:
        busy["gpu"] = read["gpu"] / machine.gpu_bandwidth
        busy["pcie"] = (read["ram"] + read["disk"]) / machine.pcie_bandwidth
    bottleneck = max(busy, key=busy.get)
    return {
        "tokens_per_second_ceiling": 1 / serial if serial else None,
        "tokens_per_second_overlap_ceiling": 1 / busy[bottleneck] if busy[bottleneck] else None,
        "seconds_per_token": serial,
        "bottleneck": bottleneck,
        "busy_seconds_per_token": busy,
    }


# -- the plan --------------------------------------------------------------------------------------------
@dataclass
class Inventory:
    """What placement needs: parameters and stored bytes per class, each expert's bytes and routed share."""

    params: dict[str, int]
    class_bytes: dict[str, int]
    active_params: int
    experts: list[tuple[int, float]]  # (stored bytes, expected share of tokens), hottest first
    kv_layers: list[tuple[int, int | None]]  # per layer: (KV bytes per cached token, sliding window)
    vocab_size: int
    expert_bits_per_weight: float
    expert_label: str  # "int2/g128", or "the container's encodings"
    storage: str  # how every class is stored, in words
    routing: str  # where the expected shares come from, in words


def inventory(shape: ModelShape, storage: Storage, zipf: float = 0.0) -> Inventory:
    params, class_bytes = dict.fromkeys(CLASSES, 0), dict.fromkeys(CLASSES, 0)
    vocab = 0
    for cls, s in shape.tensors:
        params[cls] += math.prod(s)
        class_bytes[cls] += storage.nbytes(cls, s)
        vocab = s[0] if cls == "embedding" else vocab
    active = sum(n for cls, n in params.items() if cls != "embedding")  # the embedding is a one-row lookup
    e, k = shape.experts_per_layer, shape.experts_per_token
    shares = routing_frequencies(e, k, zipf)
    ranked = []
    for i, tensors in sorted(shape.expert_tensors.items()):
        layer_params = sum(math.prod(s) * n for s, n in tensors)
        layer_bytes = sum(storage.nbytes("routed_experts", s) * n for s, n in tensors)
        params["routed_experts"] += layer_params
        class_bytes["routed_experts"] += layer_bytes
        active += k * layer_params // e
        ranked += [(-share, r, i, layer_bytes // e, share) for r, share in enumerate(shares)]
    expert_params = params["routed_experts"]
    bpw = 8 * class_bytes["routed_experts"] / expert_params if expert_params else 0.0
    experts = [(nbytes, share) for *_, nbytes, share in sorted(ranked)]
    routing = (
        "uniform (each expert gets top_k/E of tokens)"
        if zipf == 0
        else (f"Zipf-skewed: the r-th hottest expert of a layer weighs (r+1)^-{zipf:g}")
    )
    return Inventory(
        params,
        class_bytes,
        active,
        experts,
        kv_bytes(shape),
        vocab,
        bpw,
        storage.expert.label(),
        storage.describe(),
        routing,
    )


def kv_bytes(shape: ModelShape) -> list[tuple[int, int | None]]:
    return [(KV_BYTES_PER_ELEMENT * n, window) for n, window in shape.kv_elements]


def container_inventory(shape: ModelShape, container: ContainerBytes) -> Inventory:
    """Real stored bytes from a container's manifest; parameters from its embedded config. Routing shares are
    the calibration frequencies the manifest records, scaled per layer to sum to top_k (uniform if absent)."""
    base = inventory(shape, Storage(WeightFormat(16)))
    class_bytes = dict.fromkeys(CLASSES, 0)
    moe = set(shape.expert_tensors)
    for d in container.dense:
        class_bytes[classify(d.name, moe)] += d.nbytes
    k = shape.experts_per_token
    by_layer: dict[int, list[tuple[int, int, float]]] = {}
    for x in container.experts:
        by_layer.setdefault(x.layer, []).append((x.expert, x.nbytes, x.frequency))
    ranked = []
    for layer, xs in by_layer.items():
        total = sum(f for _, _, f in xs)
        for expert, nbytes, freq in xs:
            share = k * freq / total if total > 0 else k / len(xs)
            ranked.append((-share, expert, layer, nbytes, share))
    class_bytes["routed_experts"] = sum(nbytes for *_, nbytes, _ in ranked)
    bpw = 8 * class_bytes["routed_experts"] / base.params["routed_experts"]
    return Inventory(
        base.params,
        class_bytes,
        base.active_params,
        [(n, sh) for *_, n, sh in sorted(ranked)],
        base.kv_layers,
        base.vocab_size,
        bpw,
        "the container's encodings",
        f"as stored in {container.path}: routed experts {bpw:.3f} bits per weight on average, dense tensors as "
        "its manifest records them",
        "calibration routing frequencies from the manifest, scaled to top_k per layer",
    )


BLOCK_ORDER = ("lm_head", "attention", "norms", "routers", "shared_experts", "dense_mlp", "embedding")


def placement_plan(inv: Inventory, machine: Machine, context: int = 4096) -> dict:
    """Placement (KV cache and dense weights first, then experts hottest first; GPU, RAM, disk) and the
    byte counts behind `fits`: weights plus a KV cache of `context` tokens within GPU + RAM."""
    if context < 1:
        raise BudgetError(f"--context {context} must be at least 1 token")
    tiers = make_tiers(machine)
    kv_per_token = sum(b for b, _ in inv.kv_layers)
    kv_bytes = context * kv_per_token
    kv_read = sum(b * (context if w is None else min(w, context)) for b, w in inv.kv_layers)
    place_block(tiers, kv_bytes, kv_read)
    for cls in BLOCK_ORDER:
        stored = inv.class_bytes[cls]
        if stored:
            place_block(tiers, stored, stored / inv.vocab_size if cls == "embedding" else stored)
    place_experts(tiers, inv.experts)
    total = sum(inv.class_bytes.values())
    needed = total + kv_bytes
    memory = machine.gpu_bytes + machine.ram_bytes
    by_name = {t.name: t for t in tiers}
    return {
        "fits": needed <= memory,
        "total_bytes": total,
        "kv_cache_bytes": kv_bytes,
        "needed_bytes": needed,
        "memory_bytes": memory,
        "shortfall_bytes": max(0, needed - memory),
        "gpu_bytes": by_name["gpu"].stored_bytes if "gpu" in by_name else 0,
        "ram_bytes": by_name["ram"].stored_bytes,
        "disk_bytes": by_name["disk"].stored_bytes,
        "dense_bytes": total - inv.class_bytes["routed_experts"],
        "expert_bytes": inv.class_bytes["routed_experts"],
        "experts": {t.name: t.experts for t in tiers} | {"total": len(inv.experts)},
        "read_bytes_per_token": {t.name: round(t.read_bytes_per_token) for t in tiers},
        "tiers": [t.to_dict() for t in tiers],
        **decode_ceiling(tiers, machine),
    }


def plan(
    source: str | Path,
    bits: float | None,
    gpu_bytes: int,
    ram_bytes: int,
    *,
    context: int = 4096,
    group_size: int = 128,
    dense: str = "bf16",
    zipf: float = 0.0,
    machine: Machine | None = None,
) -> dict:
    """The whole answer for `prism plan`, as a JSON-able dict. `source`: config.json, a folder holding one, or
    a .prism container (then its real bytes and routing frequencies replace bits, dense policy and skew)."""
    machine = machine or Machine(gpu_bytes, ram_bytes)
    shape, container = load_shape(source)
    if container is None:
        if bits is None:
            raise BudgetError(f"{source}: give --bits (only a .prism container knows its own stored bytes)")
        storage = Storage(WeightFormat(bits, group_size), dense)
        inv = inventory(shape, storage, zipf)
    else:
        if bits is not None or zipf or dense != "bf16" or group_size != 128:
            raise BudgetError(
                f"{source} is a .prism container: its stored bytes and routing frequencies are known, "
                "so --bits, --group-size, --dense and --zipf do not apply"
            )
        storage = None
        inv = container_inventory(shape, container)
    result = placement_plan(inv, machine, context)
    result["model"] = {
        "source": str(source),
        "model_type": shape.model_type,
        "num_hidden_layers": shape.num_hidden_layers,
        "moe_layers": len(shape.expert_tensors),
        "experts_per_layer": shape.experts_per_layer,
        "experts_per_token": shape.experts_per_token,
        "parameter_count": shape.method,
    }
    result["parameters"] = inv.params | {
        "total": sum(inv.params.values()),
        "active_per_token": inv.active_params,
    }
    result["class_bytes"] = inv.class_bytes
    result["assumptions"] = assumptions(storage, machine, inv, context)
    if container is not None:
        hot = [x for x in container.experts if x.tier == "hot"]
        result["container"] = {
            "file_bytes": container.file_bytes,
            "hot_experts": len(hot),
            "hot_bytes": sum(x.nbytes for x in hot),
            "cold_bytes": sum(x.nbytes for x in container.experts) - sum(x.nbytes for x in hot),
        }
    result["verdict"] = verdict(result, inv, machine)
    result["warnings"] = plan_warnings(result, machine)
    return result


def assumptions(storage: Storage | None, machine: Machine, inv: Inventory, context: int) -> dict:
    return {
        "bits": storage.expert.bits if storage else None,
        "group_size": storage.expert.group_size if storage else None,
        "dense_policy": storage.dense_policy if storage else None,
        "expert_encoding": inv.expert_label,
        "expert_bits_per_weight": inv.expert_bits_per_weight,
        "storage": inv.storage,
        "resident_form": "every tier holds weights as stored (packed); a runtime that decodes experts to bf16 in "
        "its fast tier needs 16 / bits times more there",
        "context_tokens": context,
        "kv_cache": f"bf16, {sum(b for b, _ in inv.kv_layers):,} bytes per token; sliding-window layers read "
        "only their window but the cache keeps every token",
        "routing": inv.routing,
        "placement": "KV cache, then LM head, attention, norms, routers, shared experts, dense MLP layers and "
        "embedding in the fastest tier with room; then routed experts, hottest first, spread "
        "evenly over layers; GPU, then RAM, then disk (memory-mapped)",
        "bandwidths_bytes_per_second": {
            "gpu": machine.gpu_bandwidth,
            "pcie": machine.pcie_bandwidth,
            "ram": machine.ram_bandwidth,
            "disk": machine.disk_bandwidth,
        },
        "default_bandwidths": {k: text for k, (_, text) in DEFAULT_BANDWIDTHS.items()},
        "per_token_reads": "every dense weight except the embedding (one row), the KV cache, and top_k experts "
        "per MoE layer; with a GPU, RAM and disk bytes cross PCIe (path = slower link)",
        "ceiling": "tokens_per_second_ceiling = 1 / sum over tiers of read bytes / path bandwidth (a miss stalls); "
        "tokens_per_second_overlap_ceiling = 1 / busiest link time (perfect prefetch); compute is free",
    }


def verdict(result: dict, inv: Inventory, machine: Machine) -> str:
    need, have = result["needed_bytes"], result["memory_bytes"]
    at = f"at {inv.expert_label} ({inv.expert_bits_per_weight:.3f} bits per expert weight)"
    memory = (
        f"GPU {human_bytes(machine.gpu_bytes)} + RAM {human_bytes(machine.ram_bytes)} = {human_bytes(have)}"
    )
    if not result["fits"]:
        return (
            f"does not fit: needs {human_bytes(need)} ({need:,} bytes) {at}: weights "
            f"{human_bytes(result['total_bytes'])} + KV cache {human_bytes(result['kv_cache_bytes'])}; {memory}; "
            f"{human_bytes(need - have)} short ({need - have:,} bytes), so {human_bytes(result['disk_bytes'])} "
            "stays on disk, memory-mapped"
        )
    where = "entirely in GPU memory" if result["ram_bytes"] == 0 and machine.gpu_bytes else "in GPU + RAM"
    if not machine.gpu_bytes:
        where = "in RAM"
    return f"fits {where}: needs {human_bytes(need)} ({need:,} bytes) {at}; {memory}; {human_bytes(have - need)} spare"


def plan_warnings(result: dict, machine: Machine) -> list[str]:
    """What the verdict alone hides: dense weights outside the GPU, experts read from disk."""
    out = []
    resident = result["dense_bytes"] + result["kv_cache_bytes"]
    if machine.gpu_bytes and resident > machine.gpu_bytes:
        out.append(
            f"dense weights + KV cache ({human_bytes(resident)}) exceed the GPU ({human_bytes(machine.gpu_bytes)}): "
            f"{human_bytes(resident - machine.gpu_bytes)} of what every token reads crosses PCIe"
        )
    if result["experts"]["disk"]:
        disk = next(t for t in result["tiers"] if t["name"] == "disk")
        seconds = disk["read_bytes_per_token"] / disk["path_bandwidth_bytes_per_second"]
        out.append(
            f"{result['experts']['disk']:,} of {result['experts']['total']:,} experts stay on disk: "
            f"{human_bytes(disk['read_bytes_per_token'])} of each token's reads, "
            f"{100 * seconds / result['seconds_per_token']:.0f}% of its time at these bandwidths"
        )
    return out


