"""Tiny random checkpoints in the exact Hugging Face layout of each family, built with transformers."""

from __future__ import annotations

from pathlib import Path

import torch

# Each case: (model_type, config kwargs). Shapes vary across cases on purpose: GQA ratios, expert counts,
# top-k, intermediate sizes that are not multiples of 64, tied and untied embeddings, mixed layers.
CASES: dict[str, tuple[str, dict]] = {
    "mixtral": ("mixtral", dict(
        vocab_size=211, hidden_size=48, intermediate_size=72, num_hidden_layers=3, num_attention_heads=6,
        num_key_value_heads=2, num_local_experts=5, num_experts_per_tok=2, tie_word_embeddings=False,
    )),
    "mixtral_tied_mha": ("mixtral", dict(
        vocab_size=150, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, num_local_experts=4, num_experts_per_tok=1, tie_word_embeddings=True,
    )),
    "qwen2_moe": ("qwen2_moe", dict(
        vocab_size=199, hidden_size=40, intermediate_size=56, moe_intermediate_size=24,
        shared_expert_intermediate_size=44, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        num_experts=6, num_experts_per_tok=3, norm_topk_prob=False, decoder_sparse_step=1,
        mlp_only_layers=[1], tie_word_embeddings=False,
    )),
    "qwen2_moe_sparse_step": ("qwen2_moe", dict(
        vocab_size=120, hidden_size=32, intermediate_size=48, moe_intermediate_size=20,
        shared_expert_intermediate_size=28, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=1,
        num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=2,
        tie_word_embeddings=True,
    )),
    "qwen3_moe": ("qwen3_moe", dict(
        vocab_size=177, hidden_size=32, intermediate_size=64, moe_intermediate_size=36, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=12, num_experts=8, num_experts_per_tok=3,
        norm_topk_prob=True, tie_word_embeddings=False,
    )),
    "olmoe": ("olmoe", dict(
        vocab_size=160, hidden_size=48, intermediate_size=30, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=3, num_experts=7, num_experts_per_tok=2, norm_topk_prob=False, clip_qkv=0.9,
        tie_word_embeddings=False,
    )),
    "olmoe_norm": ("olmoe", dict(
        vocab_size=130, hidden_size=32, intermediate_size=52, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, num_experts=4, num_experts_per_tok=2, norm_topk_prob=True,
        tie_word_embeddings=True,
    )),
}


def build_hf_model(name: str, seed: int = 0):
    """A transformers model with random weights (larger init std so routing and logits are not flat)."""
    import transformers

    model_type, kwargs = CASES[name]
    config = transformers.AutoConfig.for_model(model_type, **kwargs)
    config.initializer_range = 0.2
    torch.manual_seed(seed)
    config.eos_token_id = 2
    config.bos_token_id = 1
    model = transformers.AutoModelForCausalLM.from_config(
        config, attn_implementation="eager", experts_implementation="eager"
    )
    with torch.no_grad():  # norms default to ones; perturb them so a missed norm shows up in the logits
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
            if n.endswith("e_score_correction_bias"):
                p.copy_(0.05 * torch.randn_like(p))
    return model.eval()


def save_tiny(name: str, folder: Path, seed: int = 0, shard_size: str = "40KB"):
    """Builds and saves a tiny checkpoint (sharded) and returns the transformers model."""
    model = build_hf_model(name, seed)
    model.save_pretrained(folder, max_shard_size=shard_size)
    return model
