"""CUDA transfers for the expert cache: pinned host tier, non-blocking copies on a side stream, events.

A miss on CUDA: the stored (encoded) bytes come from the host tier, or from the cold tier and are then
copied into page-locked memory (the host tier keeps that copy: encoded, so more experts fit than decoded
ones would, by the ratio of the decoded dtype's bits to the stored bits per weight). The bytes are copied to the GPU with non_blocking=True on a dedicated side stream and
decoded there (the decode's factory calls land on the GPU through `torch.device`), and an event is recorded
after the decode. Before a matmul uses the expert, the compute stream waits on that event (on the GPU; the
CPU does not block) and the tensors are recorded on the compute stream, so the caching allocator does not
reuse their memory, after an eviction, before the compute queued on them has finished. Pinned buffers
come from torch's caching host allocator, which keeps a buffer alive until the copies reading it are done.

`decode_on="cpu"` decodes on the CPU instead and copies the decoded weights (more bytes over PCIe; for
codecs that cannot run on the device).
"""

from __future__ import annotations

import torch

from ..models.moe import ExpertWeights
from .stores import map_raw, map_weights, weights_tensors


def available() -> bool:
    return torch.cuda.is_available()


class CudaTransfer:
    def __init__(self, device: torch.device, decode_on: str = "device"):
        if not available():
            raise RuntimeError("CUDA is not available (the expert cache was asked for a CUDA device)")
        if decode_on not in ("device", "cpu"):
            raise ValueError(f"decode_on={decode_on!r}: expected 'device' or 'cpu'")
        self.device = device if device.index is not None else torch.device("cuda", torch.cuda.current_device())
        self.decode_on = decode_on
        self.stream = torch.cuda.Stream(self.device)

    @staticmethod
    def pin(raw):
        """The host tier's form of a fetched expert: page-locked copies (needed for asynchronous copies)."""
        return map_raw(raw, lambda t: t if t.is_pinned() else t.pin_memory())

    def load(self, store, layer: int, expert: int, pinned) -> tuple[ExpertWeights, torch.cuda.Event]:
        """Copy and decode on the side stream; returns device weights and the event that marks them done."""
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            if self.decode_on == "device":
                on_device = map_raw(pinned, lambda t: t.to(self.device, non_blocking=True))
                with torch.device(self.device):  # factory calls inside the codecs (arange, zeros) land here
                    weights = store.decode(layer, expert, on_device)
            else:
                weights = store.decode(layer, expert, pinned)
                weights = map_weights(weights, lambda t: t.pin_memory().to(self.device, non_blocking=True))
            event = torch.cuda.Event()
            event.record(self.stream)
        return weights, event

    def ready_for_compute(self, weights: ExpertWeights, event: torch.cuda.Event) -> None:
        """Order the compute stream after the copy and tie the tensors' memory to the compute stream."""
        stream = torch.cuda.current_stream(self.device)
        stream.wait_event(event)
        for t in weights_tensors(weights):
            t.record_stream(stream)


def gpu_pci_address(device_index: int = 0) -> str | None:
    """The GPU's PCI address as sysfs names it (domain:bus:device.function), from the device properties."""
    if not available():
        return None
    props = torch.cuda.get_device_properties(device_index)
    parts = [getattr(props, name, None) for name in ("pci_domain_id", "pci_bus_id", "pci_device_id")]
    if any(p is None for p in parts):
        return None
    domain, bus, device = parts
    return f"{domain:04x}:{bus:02x}:{device:02x}.0"

