"""`prism compress`: measure candidate encodings of every expert tensor, layer by layer, then allocate.

Per MoE layer (streamed: one layer resident; hidden states of the calibration tokens carried between
layers): capture each expert's routed inputs, build its input Hessian (gate/up share one, as in exllamav2;
down_proj gets the Hessian of its own inputs), encode every recipe candidate (GPTQ rounding from the
Hessian), measure its weighted output error (prism_convert.compression.candidates), keep the Pareto candidates, and
write the layer to the work folder. Once every layer of the model is there, one allocation over the whole
model picks a candidate per tensor under the budget (prism_convert.allocation.bit_plan).
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from prism_convert.compression.candidates import TensorStats, measure_candidates
from prism_convert.compression.capture import ExpertCapture
from prism_convert.compression.dense import encode_dense_layer, encode_top
from prism_convert.compression.encode import encode_many
from prism_convert.compression.workdir import WorkDir, WorkError, WorkJob
from prism_convert.profiling.layer_stream import LayerStream
from prism_convert.progress import Progress
from prism_convert.recipe import Recipe
from prism_load.models.moe import MoEBlock
from prism_load.profile_format import TOKENIZER_FILE, Profile, config_sha256

EXPERT_MATRICES = ("gate_proj", "up_proj", "down_proj")
EXPERT_BIASES = ("gate_bias", "up_bias", "down_bias")


@dataclass
class ExpertInputs:
    """What one expert's candidates are measured against."""

    x: torch.Tensor  # [n, H] routed inputs (or the layer's pooled inputs for a rare expert)
    rare: bool


def expert_statistics(block: MoEBlock, e: int, x: torch.Tensor) -> dict[str, TensorStats]:
    """Hessians and output sensitivities of one expert's three matrices, from its routed inputs x [n, H]."""
    w = block.experts.acquire(block.layer_index, [e])[e]
    inter = w.down.shape[1]
    n = max(x.shape[0], 1)
    with torch.no_grad():
        x = x.float().clone()  # out of inference mode, so autograd may use it
        gate_up = x @ w.gate_up.float().T  # [n, 2I]
        if w.gate_up_bias is not None:
            gate_up = gate_up + w.gate_up_bias.float()
    gate = gate_up[:, :inter].clone().requires_grad_(True)
    up = gate_up[:, inter:].clone().requires_grad_(True)
    with torch.enable_grad():
        h = block.activation(gate, up)
        # h_j depends only on gate_j and up_j, so one backward pass gives every elementwise derivative
        d_gate, d_up = torch.autograd.grad(h.sum(), (gate, up))
    h = h.detach()
    down_col_sq = w.down.detach().float().pow(2).sum(0)  # [I] ‖W_down[:, j]‖²
    hx = (x.T @ x / n).double()
    hh = (h.T @ h / n).double()
    return {
        "gate_proj": TensorStats(hx, hx.diagonal().float(), down_col_sq * d_gate.pow(2).mean(0)),
        "up_proj": TensorStats(hx, hx.diagonal().float(), down_col_sq * d_up.pow(2).mean(0)),
        "down_proj": TensorStats(hh, hh.diagonal().float(), None),
    }


def expert_matrices(block: MoEBlock, e: int) -> dict[str, torch.Tensor]:
    w = block.experts.acquire(block.layer_index, [e])[e]
    inter = w.down.shape[1]
    mats = {"gate_proj": w.gate_up[:inter], "up_proj": w.gate_up[inter:], "down_proj": w.down}
    if w.gate_up_bias is not None:
        mats.update(gate_bias=w.gate_up_bias[:inter], up_bias=w.gate_up_bias[inter:], down_bias=w.down_bias)
    return {k: v.detach().float().contiguous() for k, v in mats.items()}


def importance(capture: ExpertCapture, recipe: Recipe) -> torch.Tensor:
    """Per expert: expected squared routing weight per calibration token, smoothed by a neutral prior
    (pseudo-tokens at the layer's mean squared weight) and floored at a share of the uniform value."""
    tokens = capture.tokens.double()
    mean_w2 = capture.weight_sq.sum() / tokens.sum().clamp_min(1)
    prior = recipe.importance.prior_tokens
    imp = (capture.weight_sq + prior * mean_w2) / (capture.seen_tokens + prior * len(tokens))
    uniform = imp.mean()
    return torch.maximum(imp, recipe.importance.frequency_floor * uniform)


def compress_experts(block: MoEBlock, capture: ExpertCapture, recipe: Recipe, min_tokens: int,
                     profile_weights: torch.Tensor | None) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """Candidates of every expert tensor of one layer: (per-expert JSON records, stored tensors)."""
    i = block.layer_index
    imp = importance(capture, recipe)
    pooled = capture.pooled.sample()
    records, stored = [], {}
    for e in range(block.experts.num_experts):
        routed = capture.inputs[e].sample()
        rare = int(capture.tokens[e]) < min_tokens or routed is None
        x = pooled if rare else routed
        stats = expert_statistics(block, e, x)
        if profile_weights is not None and not recipe.quantization.gptq:
            stats["gate_proj"].channel_weights = stats["up_proj"].channel_weights = profile_weights[e]
        mats = expert_matrices(block, e)
        record = {
            "expert": e,
            "tokens": int(capture.tokens[e]),
            "gate_mass": float(capture.gate_mass[e]),
            "importance": float(imp[e]),
            "rare": rare,
            "hessian_tokens": int(x.shape[0]),
            "tensors": {},
        }
        for name in EXPERT_MATRICES:
            full = f"layers.{i}.experts.{e}.{name}"
            menu = recipe.expert_candidates(tuple(mats[name].shape), full)
            cands = measure_candidates(mats[name], menu, stats[name], encode_many, recipe.quantization.gptq)
            entries = []
            for j, c in enumerate(cands):
                for suffix, t in c.tensors.items():
                    stored[f"experts.{e}.{name}.c{j}.{suffix}"] = t
                entries.append({"encoding": c.encoding.to_dict(), "nbytes": c.nbytes, "error": c.error})
            record["tensors"][name] = entries
        for name in EXPERT_BIASES:
            if name in mats:
                stored[f"experts.{e}.{name}.weight"] = mats[name].float()
                record.setdefault("biases", {})[name] = {"encoding": {"kind": "fp32", "shape": list(mats[name].shape)}}
        records.append(record)
    return records, stored


def parse_layers(spec: str | None, num_layers: int) -> range:
    if spec is None:
        return range(num_layers)
    try:
        a, b = (int(s) if s else None for s in spec.split(":"))
    except ValueError:
        raise WorkError(f"--layers {spec!r}: expected a:b (for example 0:16)") from None
    a, b = a or 0, num_layers if b is None else b
    if not 0 <= a < b <= num_layers:
        raise WorkError(f"--layers {spec!r} is out of range: the model has layers 0..{num_layers - 1} (use a:b with 0 <= a < b <= {num_layers})")
    return range(a, b)


IDENTITY_KEYS = WorkJob.IDENTITY  # what a resumed work folder must share with the job


def compress_job(model: Path, config: dict, args, profile_dir: Path, profile: dict, recipe: Recipe, span: range) -> WorkJob:
    """The job a work folder records; its IDENTITY_KEYS decide whether earlier work may be resumed."""
    return WorkJob(
        model={"path": str(model), "model_type": args.model_type, "config_sha256": config_sha256(config),
               "num_hidden_layers": args.num_hidden_layers},
        profile={"path": str(profile_dir), "tokens": profile["tokens"], "dataset": profile["dataset"]},
        recipe=recipe.to_dict(),
        layers=[span.start, span.stop],
    )


def run_compress(model: Path, profile_dir: Path, recipe: Recipe, out: Path, layers: str | None = None,
                 workers: int = 1, progress: Progress | None = None) -> dict:
    """Measure every layer in the range into the work folder `out` (resuming finished layers)."""
    stream = LayerStream(Path(model))
    args = stream.args
    profile = Profile.load(profile_dir)
    profile.check_model(stream.ckpt.config)
    span = parse_layers(layers, args.num_hidden_layers)
    work = WorkDir(out)
    job = compress_job(model, stream.ckpt.config, args, profile_dir, profile.data, recipe, span)
    tokenizer = profile.folder / TOKENIZER_FILE
    work.start(job, Path(model), IDENTITY_KEYS, tokenizer if tokenizer.is_file() else None)
    if not (work.folder / "top.json").is_file():
        encode_top(stream, recipe, work)
    tokens = profile.calibration_tokens()
    start = time.perf_counter()
    done = [0]  # layers finished, for the progress callback
    if progress:
        progress("compress", 0, len(span))
    hidden = stream.embed(tokens)
    if span.start:
        hidden = stream.forward_to(hidden, span.start)  # original layers before the range: hidden states only
    pending: list[tuple[int, Future]] = []
    done_before = set(work.done_layers())
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for i in span:
            layer = stream.load_layer(i)
            block = layer.mlp if isinstance(layer.mlp, MoEBlock) else None
            todo = i not in done_before
            capture = None
            if todo and block is not None:
                capture = ExpertCapture(args.num_experts, recipe.quantization.max_tokens_per_expert, seed=i)
                block.observer = capture
            out_hidden = stream.run_layer(layer, hidden)
            if block is not None:
                block.observer = None
            if todo:
                pending.append((i, pool.submit(_finish_layer, work, i, layer, capture, recipe, profile)))
            hidden = out_hidden
            del layer
            while len(pending) > max(1, workers):  # bound memory: at most `workers` layers in flight
                _collect(pending.pop(0), progress, done, len(span))
            if not todo and progress:
                done[0] += 1
                progress(f"compress: layer {i} (resumed)", done[0], len(span))
        for item in pending:
            _collect(item, progress, done, len(span))
    return {"layers": list(span), "resumed": sorted(done_before & set(span)), "seconds": time.perf_counter() - start}


def _collect(item, progress: Progress | None, done: list[int], total: int) -> None:
    i, future = item
    future.result()
    if progress:
        done[0] += 1
        progress(f"compress: layer {i} done", done[0], total)


def _finish_layer(work: WorkDir, i: int, layer, capture: ExpertCapture | None, recipe: Recipe, profile: Profile) -> None:
    meta: dict = {"layer": i}
    stored: dict[str, torch.Tensor] = {}
    meta["dense"] = encode_dense_layer(layer, recipe, stored)
    if capture is not None:
        block = layer.mlp
        weights = profile.channel_weights(i) if any(x["layer"] == i for x in profile.layers) else None
        meta["experts"], expert_tensors = compress_experts(block, capture, recipe, profile.data["min_tokens"], weights)
        stored.update(expert_tensors)
        meta["seen_tokens"] = capture.seen_tokens
        meta["predictors"] = []  # carried to the container (pack) with the layer
        for p in profile.predictors_for(i):
            stored[f"predictor.{p['from_layer']}.weight"], stored[f"predictor.{p['from_layer']}.bias"] = p.pop("weight"), p.pop("bias")
            meta["predictors"].append(p)
    work.write_layer(i, meta, stored)
