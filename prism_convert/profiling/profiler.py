"""`prism profile`: run calibration tokens through the model layer by layer and record what routing does.

Per MoE layer and expert: top-k hits, gate mass, per-channel second moments of the expert's inputs (the
gate/up input and the down-projection input, like llama.cpp's importance matrix), co-activation counts,
and how well the next MoE layer's router, applied to this layer's output, predicts the next layer's
experts (the shadow router the runtime prefetches with). Per MoE layer and each of the two MoE layers
before it, it also fits the prefetch predictor (predictor_fit.py: a ridge-regression map to the layer's
router logits) and scores it against the shadow router on held-back calibration tokens; the fit two MoE
layers ahead keeps the output of the MoE layer before the last, one more copy of the calibration hidden
states.
"""

from __future__ import annotations

import math
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from prism_convert.profiling.layer_stream import LayerStream
from prism_convert.profiling.predictor_fit import fit_predictor, set_overlap
from prism_convert.progress import Progress
from prism_load.atomic import atomic_folder, write_text
from prism_load.container import PREDICTOR_DISTANCES
from prism_load.models.moe import MoEBlock, RouterOutput
from prism_load.profile_format import (
    CALIBRATION_FILE,
    PROFILE_FORMAT,
    PROFILE_JSON,
    PROFILE_VERSION,
    STATS_FILE,
    TOKENIZER_FILE,
    config_sha256,
    predictor_key,
    to_json,
)


@dataclass
class LayerRecorder:
    """MoEObserver for one layer: accumulates statistics over every micro-batch of calibration tokens."""

    num_experts: int
    hidden_size: int
    intermediate_size: int
    tokens: torch.Tensor = field(init=False)
    gate_mass: torch.Tensor = field(init=False)
    input_sq: torch.Tensor = field(init=False)
    down_input_sq: torch.Tensor = field(init=False)
    coactivation: torch.Tensor = field(init=False)
    routed: list = field(default_factory=list)  # [n, K] chosen experts per micro-batch, in token order
    logits: list = field(default_factory=list)  # [n, E] router logits per micro-batch (the predictor's target)
    applied_weight: float = 0.0

    def __post_init__(self):
        e = self.num_experts
        self.tokens = torch.zeros(e, dtype=torch.int64)
        self.gate_mass = torch.zeros(e, dtype=torch.float64)
        self.input_sq = torch.zeros(e, self.hidden_size, dtype=torch.float64)
        self.down_input_sq = torch.zeros(e, self.intermediate_size, dtype=torch.float64)
        self.coactivation = torch.zeros(e, e, dtype=torch.int64)

    def on_route(self, layer_index: int, x: torch.Tensor, route: RouterOutput) -> None:
        self.routed.append(route.indices.clone())
        self.logits.append(route.logits.float().clone())
        self.applied_weight += float(route.weights.double().sum())
        onehot = torch.zeros(route.indices.shape[0], self.num_experts, dtype=torch.int64)
        onehot.scatter_(1, route.indices, 1)
        self.coactivation += onehot.T @ onehot

    def on_expert(self, layer_index: int, expert: int, x: torch.Tensor, h: torch.Tensor, weight: torch.Tensor) -> None:
        self.tokens[expert] += x.shape[0]
        self.gate_mass[expert] += weight.double().sum()
        self.input_sq[expert] += x.double().pow(2).sum(0)
        self.down_input_sq[expert] += h.double().pow(2).sum(0)

    def indices(self) -> torch.Tensor:
        return torch.cat(self.routed)  # [N*L, K]

    def mean_sq(self, which: torch.Tensor) -> torch.Tensor:
        return (which / self.tokens.clamp_min(1)[:, None].double()).float()


def routing_summary(tokens: torch.Tensor, top_k: int) -> dict:
    """Entropy and skew of the per-expert assignment distribution."""
    p = tokens.double() / tokens.sum().clamp_min(1)
    entropy = float(-(p[p > 0] * p[p > 0].log2()).sum())
    ordered = p.sort(descending=True).values
    quarter = max(1, math.ceil(len(p) / 4))
    return {
        "routing_entropy_bits": entropy,
        "max_entropy_bits": math.log2(len(p)),
        "top_expert_share": float(ordered[0]),
        "top_quarter_share": float(ordered[:quarter].sum()),
    }


def temporal_reuse(indices: torch.Tensor, seq_len: int, tokens: torch.Tensor) -> tuple[float, float]:
    """Share of token t's experts also chosen by token t-1 (same sequence), and its value under independence."""
    k = indices.shape[-1]
    seq = indices.reshape(-1, seq_len, k)
    reuse = set_overlap(seq[:, :-1].reshape(-1, k), seq[:, 1:].reshape(-1, k)).double().mean() / k
    p = tokens.double() / tokens.sum().clamp_min(1)
    baseline = float((p * p).sum() * k)  # P(a given expert of t was also in t-1's set) if independent
    return float(reuse), min(1.0, baseline)


def shadow_prediction(block: MoEBlock, x: torch.Tensor, k: int) -> torch.Tensor:
    """Experts the next MoE layer's router picks from x [n, H] (its norm of this layer's output) [n, k]: its
    own top-k choice (bias corrections and group limits included); past top-k, the next best by raw logit."""
    route = block.router(x)
    if k <= route.indices.shape[-1]:
        return route.indices[:, :k]
    logits = route.logits.float().scatter(-1, route.indices, float("inf"))  # the router's own picks first
    return torch.topk(logits, k, dim=-1).indices


def profile_tokens(stream: LayerStream, tokens: torch.Tensor, progress: Progress | None = None,
                   min_tokens: int = 16) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """Runs `tokens` [N, L] through every layer; returns per-MoE-layer JSON entries and statistic tensors."""
    args = stream.args
    hidden = stream.embed(tokens)
    seq_len = tokens.shape[1]
    entries: list[dict] = []
    tensors: dict[str, torch.Tensor] = {}
    history: list[tuple[dict, torch.Tensor]] = []  # (entry, output hidden) of the last MoE layers, nearest last
    if progress:
        progress("profile", 0, stream.num_layers)
    for i in range(stream.num_layers):
        layer = stream.load_layer(i)
        block = layer.mlp if isinstance(layer.mlp, MoEBlock) else None
        if block is not None:
            k = block.router.top_k
            recorder = LayerRecorder(args.num_experts, args.hidden_size, args.moe_intermediate_size)
            block.observer = recorder
            if history:
                with torch.inference_mode():
                    x_next = _norm_input(layer, history[-1][1])
                    preds = [shadow_prediction(block, x_next, n) for n in (k, min(2 * k, args.num_experts))]
        out = stream.run_layer(layer, hidden)
        if block is not None:
            actual = recorder.indices()
            if history:
                entry = history[-1][0]
                hits = set_overlap(preds[0], actual).sum().item()
                hits2 = set_overlap(preds[1], actual).sum().item()
                entry["next_layer"] = i
                entry["next_layer_recall"] = entry["next_layer_precision"] = hits / actual.numel()
                # with 2k >= E every expert is predicted: recall is trivially 1, so report nothing
                entry["next_layer_recall_at_2k"] = hits2 / actual.numel() if 2 * k < args.num_experts else None
                logits = torch.cat(recorder.logits)
                for distance, (source, source_out) in enumerate(reversed(history), start=1):
                    if distance > 1:  # the next layer's input and shadow prediction are those computed above
                        with torch.inference_mode():
                            x_next = _norm_input(layer, source_out)
                            preds = [shadow_prediction(block, x_next, k)]
                    _fit_layer_pair(block, source, x_next, preds[0], i, distance, logits, actual, tensors, seq_len)
                del logits, x_next, preds
            recorder.logits.clear()
            entry = layer_entry(i, recorder, seq_len, min_tokens)
            entries.append(entry)
            tensors[f"layers.{i}.input_sq"] = recorder.mean_sq(recorder.input_sq)
            tensors[f"layers.{i}.down_input_sq"] = recorder.mean_sq(recorder.down_input_sq)
            tensors[f"layers.{i}.coactivation"] = recorder.coactivation
            history = [*history, (entry, out)][-PREDICTOR_DISTANCES:]
        hidden = out
        del layer, block  # the block references the layer's experts: keep only one layer alive at a time
        if progress:
            progress(f"profile: layer {i + 1}/{stream.num_layers}", i + 1, stream.num_layers)
    return entries, tensors


def _norm_input(layer, hidden: torch.Tensor) -> torch.Tensor:
    """Layer `layer`'s post-attention norm of an earlier layer's output [T, H]: what its router would read
    if nothing happened in between (the shadow router's and the fitted predictor's input)."""
    return layer.post_attention_layernorm(hidden.reshape(-1, hidden.shape[-1]))


def _fit_layer_pair(block: MoEBlock, source: dict, x: torch.Tensor, shadow: torch.Tensor, j: int, distance: int,
                    logits: torch.Tensor, actual: torch.Tensor, tensors: dict, seq_len: int) -> None:
    """Fits MoE layer j's predictor from x, its norm of the output of the MoE layer `distance` before it
    (source), against the shadow router's top-k from the same x, and records it in the source's entry (JSON)
    and in `tensors`."""
    with torch.inference_mode():
        fit = fit_predictor(x, logits, actual, shadow, block.router.select, seq_len)
    if fit is None:
        return
    source["predictors"].append({"layer": j, "distance": distance, "recall": fit.recall,
                                 "shadow_recall": fit.shadow_recall, "validation_tokens": fit.validation_tokens})
    tensors[predictor_key(j, source["layer"], "weight")] = fit.weight
    tensors[predictor_key(j, source["layer"], "bias")] = fit.bias


def layer_entry(i: int, rec: LayerRecorder, seq_len: int, min_tokens: int) -> dict:
    reuse, baseline = temporal_reuse(rec.indices(), seq_len, rec.tokens)
    experts = [
        {"expert": e, "tokens": int(rec.tokens[e]), "gate_mass": float(rec.gate_mass[e])}
        for e in range(rec.num_experts)
    ]
    return {
        "layer": i,
        "experts": experts,
        "applied_weight": rec.applied_weight,
        "next_layer": None,
        "next_layer_recall": None,
        "next_layer_precision": None,
        "next_layer_recall_at_2k": None,
        "predictors": [],
        **routing_summary(rec.tokens, rec.indices().shape[-1]),
        "temporal_reuse": reuse,
        "temporal_reuse_baseline": baseline,
        "rare_experts": [e for e in range(rec.num_experts) if rec.tokens[e] < min_tokens],
    }


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run_profile(model: Path, tokens: torch.Tensor, out: Path, dataset: dict, min_tokens: int = 16,
                progress: Progress | None = None, tokenizer=None) -> dict:
    """Profile `model` on calibration `tokens` [N, L] and write the profile folder atomically; `tokenizer` (a
    tokenizer.ResolvedTokenizer) is saved beside it when it is not the checkpoint's own tokenizer.json."""
    from safetensors.torch import save_file

    stream = LayerStream(Path(model))
    start = time.perf_counter()
    entries, tensors = profile_tokens(stream, tokens, progress, min_tokens)
    seconds = time.perf_counter() - start
    args = stream.args
    data = {
        "format": PROFILE_FORMAT,
        "version": PROFILE_VERSION,
        "model": {
            "path": str(model),
            "model_type": args.model_type,
            "num_hidden_layers": args.num_hidden_layers,
            "num_experts": args.num_experts,
            "hidden_size": args.hidden_size,
            "moe_intermediate_size": args.moe_intermediate_size,
            "config_sha256": config_sha256(stream.ckpt.config),
        },
        "dataset": dataset,
        "tokens": int(tokens.numel()),
        "top_k": args.num_experts_per_tok,
        "min_tokens": min_tokens,
        "layers": entries,
        "rare_experts": [[x["layer"], e] for x in entries for e in x["rare_experts"]],
        "seconds": seconds,
        "tokens_per_second": tokens.numel() / seconds if seconds > 0 else None,
        "peak_rss_bytes": peak_rss_bytes(),
    }
    with atomic_folder(out) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp / STATS_FILE)
        save_file({"tokens": tokens.to(torch.int64).contiguous()}, tmp / CALIBRATION_FILE)
        if tokenizer is not None and not tokenizer.from_checkpoint:
            tokenizer.save(tmp / TOKENIZER_FILE)
        write_text(tmp / PROFILE_JSON, to_json(data))
    return data


def calibration_tokens(model: Path, dataset: str, samples: int, seq_len: int, seed: int,
                       split: str = "calibration", tokenizer=None) -> torch.Tensor:
    """Token samples [samples, seq_len] of a calibration source, tokenised with `tokenizer` (a
    tokenizers.Tokenizer) or else the checkpoint's (prism_convert.tokenizer)."""
    import calibration
    from prism_convert.preflight import model_folder
    from prism_convert.tokenizer import resolve_tokenizer

    if tokenizer is None:
        tokenizer = resolve_tokenizer(None, model_folder(model)).tokenizer
    source = calibration.resolve(dataset)
    return calibration.token_samples(source, tokenizer, samples, seq_len, seed=seed, split=split)


def profile_model(model: Path, dataset: str, samples: int, seq_len: int, seed: int, out: Path,
                  min_tokens: int = 16, progress: Progress | None = None, tokenizer: str | None = None) -> dict:
    """`prism profile`: every input checked and the calibration tokens drawn (preflight), then run_profile,
    then the heatmap beside it. `tokenizer`: --tokenizer (a path or Hub id), else the checkpoint's."""
    from prism_convert import preflight
    from prism_convert.profiling.routing_report import write_heatmap

    checked = preflight.model_args(model)
    preflight.check_output(Path(out), "a profile folder", PROFILE_JSON)
    cal = preflight.calibration(dataset, samples, seq_len, seed, preflight.tokenizer_for(checked, tokenizer))
    data = run_profile(model, cal.tokens, out, cal.dataset, min_tokens=min_tokens, progress=progress,
                       tokenizer=cal.tokenizer)
    data["heatmap"] = str(write_heatmap(data, Path(out)))
    return data
