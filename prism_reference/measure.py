"""Quick measurements of a trained model on fixed token windows: mean loss, and what its routers do
(how evenly each layer spreads tokens over experts, how decisive each token's routing is, and how far
the expert mix moves between two domains). `prism profile` measures routing in depth; this is the short
summary the reference model records about itself in training.json.

Shape key: N tokens, E experts, K top-k.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from prism_load.models.model import MoEForCausalLM


@torch.no_grad()
def mean_loss(model: MoEForCausalLM, windows: torch.Tensor, batch_size: int = 8) -> float | None:
    """Mean next-token cross-entropy (nats) over windows [n, T+1]; None when there are none."""
    if len(windows) == 0:
        return None
    total, count = 0.0, 0
    for chunk in windows.split(batch_size):
        logits = model(chunk[:, :-1])
        total += F.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum").item()
        count += chunk[:, 1:].numel()
    return total / count


class _RoutingCounter:
    """MoEObserver: per layer, top-k assignment counts [E] and the summed per-token router entropy."""

    def __init__(self, num_experts: int):
        self.num_experts = num_experts
        self.counts: dict[int, torch.Tensor] = {}
        self.entropy_sum: dict[int, float] = {}
        self.tokens: dict[int, int] = {}

    def on_route(self, layer_index, x, route):
        probs = torch.softmax(route.logits.float(), dim=-1)  # [N, E]
        counts = torch.bincount(route.indices.flatten(), minlength=self.num_experts)
        self.counts[layer_index] = self.counts.get(layer_index, 0) + counts
        entropy = -(probs * probs.clamp_min(1e-30).log2()).sum(-1)  # [N] bits
        self.entropy_sum[layer_index] = self.entropy_sum.get(layer_index, 0.0) + entropy.sum().item()
        self.tokens[layer_index] = self.tokens.get(layer_index, 0) + probs.shape[0]

    def on_expert(self, layer_index, expert, x, h, weight):
        pass


@torch.no_grad()
def routing_summary(model: MoEForCausalLM, windows: dict[str, torch.Tensor], batch_size: int = 8) -> dict:
    """Per domain and MoE layer: expert shares of the top-k assignments, their entropy as a fraction of
    log2(E) (1 = perfectly even), the top expert's share, and the mean per-token router entropy (bits);
    per layer, the total-variation distance between the first two domains' shares."""
    num_experts = model.args.num_experts
    shares: dict[str, dict[int, torch.Tensor]] = {}
    result: dict = {"domains": {}}
    for domain, w in windows.items():
        counter = _RoutingCounter(num_experts)
        blocks = model.moe_blocks()
        for _, block in blocks:
            block.observer = counter
        try:
            for chunk in w.split(batch_size):
                model(chunk[:, :-1])
        finally:
            for _, block in blocks:
                block.observer = None
        layers, shares[domain] = [], {}
        for layer, counts in sorted(counter.counts.items()):
            share = counts.double() / counts.sum()
            shares[domain][layer] = share
            entropy = -(share * share.clamp_min(1e-30).log2()).sum().item()
            layers.append({
                "layer": layer,
                "shares": [round(s, 4) for s in share.tolist()],
                "usage_entropy": round(entropy / math.log2(num_experts), 4),
                "top_expert_share": round(share.max().item(), 4),
                "router_entropy_bits": round(counter.entropy_sum[layer] / counter.tokens[layer], 4),
            })
        result["domains"][domain] = layers
    names = list(windows)
    if len(names) >= 2:
        a, b = shares[names[0]], shares[names[1]]
        result["tv_distance"] = {f"{names[0]}_vs_{names[1]}": [
            round(0.5 * (a[layer] - b[layer]).abs().sum().item(), 4) for layer in sorted(a)
        ]}
    return result
