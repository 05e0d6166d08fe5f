"""Encoders on the reference model's real experts: output error on held-out prose and code.

For every expert matrix of the reference MoE, the Hessian comes from its routed inputs on calibration
prose; each encoder's output error E‖ΔW x‖² is then measured on held-out prose and on held-out code (the
distribution-shift case), summed over experts and tensors and divided by E‖W x‖² on the same inputs.
This is where GPTQ variants and the clipping search are compared on real statistics rather than
synthetic ones. Writes bench/results/codecs_reference.json.

    python bench/bench_codecs_reference.py [--samples 32] [--seq-len 256] [--group 128]
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch
from common import reference, write_result

from prism_convert.compression.encode import encode
from prism_convert.compression.math.gptq import gptq
from prism_convert.compression.math.measure import output_error
from prism_convert.compression.math.quantize import clipped, rtn
from prism_convert.profiling.layer_stream import LayerStream
from prism_convert.profiling.profiler import calibration_tokens
from prism_load.container.codecs import decode
from prism_load.container.format import Encoding
from prism_load.models.moe import MoEBlock


class Inputs:
    """MoE observer keeping every routed input x [n, H] and activation h [n, I] per expert."""

    def __init__(self):
        self.x, self.h = defaultdict(list), defaultdict(list)

    def on_route(self, *args) -> None:
        pass

    def on_expert(self, layer: int, e: int, x: torch.Tensor, h: torch.Tensor, weight: torch.Tensor) -> None:
        self.x[e].append(x.float().clone())
        self.h[e].append(h.float().clone())

    def get(self, e: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        return (torch.cat(self.x[e]), torch.cat(self.h[e])) if self.x[e] else None


METHODS = {
    "rtn": lambda w, enc, hx: rtn(w, enc),
    "clipped_diag": lambda w, enc, hx: clipped(w, enc, hx.diagonal()),
    "gptq": lambda w, enc, hx: encode(w, enc, hessian=hx),
    "gptq_static": lambda w, enc, hx: gptq(w, enc, hx, static_groups=True),
    "gptq_act_order": lambda w, enc, hx: encode(w, enc, hessian=hx, act_order=True),
}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--group", type=int, default=128)
    p.add_argument("--bits", default="2,3,4")
    args = p.parse_args()
    torch.set_num_threads(1)
    model = reference()
    stream = LayerStream(model)
    sets = {
        "calibration": calibration_tokens(model, "builtin:prose", args.samples, args.seq_len, 0, "calibration"),
        "prose": calibration_tokens(model, "builtin:prose", args.samples // 2, args.seq_len, 1, "heldout"),
        "code": calibration_tokens(model, "builtin:code", args.samples // 2, args.seq_len, 1, "heldout"),
    }
    hidden = {k: stream.embed(t) for k, t in sets.items()}
    bits = [int(b) for b in args.bits.split(",")]
    err = defaultdict(float)  # (method, bits, eval set) -> Σ E‖ΔW x‖²
    energy = defaultdict(float)  # eval set -> Σ E‖W x‖²
    for i in range(stream.num_layers):
        layer = stream.load_layer(i)
        block = layer.mlp if isinstance(layer.mlp, MoEBlock) else None
        seen = {}
        for k in sets:
            if block is not None:
                seen[k] = block.observer = Inputs()
            hidden[k] = stream.run_layer(layer, hidden[k])
        if block is None:
            continue
        block.observer = None
        for e in range(block.experts.num_experts):
            calib = seen["calibration"].get(e)
            if calib is None or calib[0].shape[0] < 16:
                continue
            w = block.experts.acquire(i, [e])[e]
            inter = w.down.shape[1]
            for weight, which in ((w.gate_up[:inter], 0), (w.gate_up[inter:], 0), (w.down, 1)):  # gate, up, down
                weight = weight.detach().float()
                xc = calib[which]
                hx = xc.T @ xc / xc.shape[0]
                evals = {k: seen[k].get(e)[which] for k in ("prose", "code") if seen[k].get(e) is not None}
                for k, x in evals.items():
                    energy[k] += output_error(weight, torch.zeros_like(weight), inputs=x) * x.shape[0]
                for b in bits:
                    enc = Encoding("int", tuple(weight.shape), bits=b, group_size=args.group)
                    for method, fn in METHODS.items():
                        decoded = decode(enc, fn(weight, enc, hx))
                        for k, x in evals.items():
                            err[(method, b, k)] += output_error(weight, decoded, inputs=x) * x.shape[0]
        print(f"layer {i} done", flush=True)
    table = {f"{m}_int{b}_{k}": err[(m, b, k)] / energy[k] for (m, b, k) in sorted(err)}
    for key, value in table.items():
        print(f"{key:32s} {value:.5f}")
    print(write_result("codecs_reference", {"relative_error": table, "samples": args.samples, "seq_len": args.seq_len,
                                            "group_size": args.group}))


if __name__ == "__main__":
    main()
