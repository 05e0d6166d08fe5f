"""Write a prism Mixtral model as a standard Hugging Face checkpoint folder, in the Hub's per-expert layout
(`model.layers.N.block_sparse_moe.experts.E.w1|w2|w3.weight`, `...block_sparse_moe.gate.weight`), which is
what mistralai/Mixtral-8x7B-v0.1 ships and what transformers and prism_load both read."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from prism_load.models.model import MoEForCausalLM
from prism_load.models.moe import MoEBlock


def mixtral_config(*, vocab_size: int, hidden_size: int, layers: int, heads: int, kv_heads: int, experts: int,
                   top_k: int, expert_intermediate: int, max_positions: int, eos_id: int, bos_id: int,
                   router_aux_loss_coef: float = 0.01) -> dict:
    """config.json of a Mixtral model (the fields transformers' MixtralConfig reads)."""
    return {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": expert_intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": hidden_size // heads,
        "hidden_act": "silu",
        "max_position_embeddings": max_positions,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "sliding_window": None,
        "attention_dropout": 0.0,
        "num_local_experts": experts,
        "num_experts_per_tok": top_k,
        "router_aux_loss_coef": router_aux_loss_coef,
        "router_jitter_noise": 0.0,
        "output_router_logits": False,
        "tie_word_embeddings": False,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "torch_dtype": "float32",
    }


def mixtral_state_dict(model: MoEForCausalLM) -> dict[str, torch.Tensor]:
    """Checkpoint name -> tensor (contiguous copies; no storage shared between entries)."""
    family, args = model.family, model.args
    inter = args.moe_intermediate_size
    state = {}
    own = model.state_dict()
    for key, name in family.top_level_names(args).items():
        state[name] = own[key]
    for layer in model.layers:
        i = layer.index
        for key, tensor in layer.state_dict().items():
            if not key.startswith("mlp.experts."):
                state[family.checkpoint_name(args, i, key)] = tensor
        assert isinstance(layer.mlp, MoEBlock)
        gate_up, down = layer.mlp.experts.gate_up_proj, layer.mlp.experts.down_proj
        for e in range(args.num_experts):
            prefix = f"model.layers.{i}.block_sparse_moe.experts.{e}"
            state[f"{prefix}.w1.weight"] = gate_up[e, :inter]  # gate [I, H]
            state[f"{prefix}.w3.weight"] = gate_up[e, inter:]  # up [I, H]
            state[f"{prefix}.w2.weight"] = down[e]  # down [H, I]
    return {name: t.detach().contiguous().clone() for name, t in state.items()}


def save_mixtral(model: MoEForCausalLM, config: dict, folder: Path) -> None:
    """config.json + model.safetensors into an existing (temporary) folder."""
    from safetensors.torch import save_file

    (folder / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    save_file(mixtral_state_dict(model), str(folder / "model.safetensors"), metadata={"format": "pt"})
