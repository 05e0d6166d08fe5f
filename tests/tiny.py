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
    # DeepSeek: MLA with rope/no-rope parts and v_head_dim != qk head dim; dense-then-MoE; shared experts.
    "deepseek_v2_group_limited": ("deepseek_v2", dict(
        vocab_size=173, hidden_size=48, intermediate_size=56, moe_intermediate_size=20, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=3,
        first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=24, qk_nope_head_dim=12, qk_rope_head_dim=8,
        v_head_dim=10, topk_method="group_limited_greedy", n_group=4, topk_group=2, routed_scaling_factor=1.5,
        tie_word_embeddings=False,
    )),
    "deepseek_v2_greedy_yarn": ("deepseek_v2", dict(
        vocab_size=150, hidden_size=32, intermediate_size=40, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, n_routed_experts=5, n_shared_experts=1, num_experts_per_tok=2,
        first_k_dense_replace=0, q_lora_rank=20, max_position_embeddings=32, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=6,
        v_head_dim=8, topk_method="greedy", routed_scaling_factor=1.0, tie_word_embeddings=True,
        rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=8,
                             mscale=0.707, mscale_all_dim=0.707),
    )),
    "deepseek_v3": ("deepseek_v3", dict(
        vocab_size=190, hidden_size=40, intermediate_size=52, moe_intermediate_size=18, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=12, n_shared_experts=1, num_experts_per_tok=3,
        first_k_dense_replace=1, max_position_embeddings=64, n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True,
        q_lora_rank=24, kv_lora_rank=20, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12,
        rope_interleave=True, tie_word_embeddings=False,
        rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=8.0, original_max_position_embeddings=8,
                             mscale=1.0, mscale_all_dim=0.8, beta_fast=32, beta_slow=1),
    )),
    "deepseek_v3_halves_bias": ("deepseek_v3", dict(
        vocab_size=140, hidden_size=32, intermediate_size=44, moe_intermediate_size=14, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, n_routed_experts=6, n_shared_experts=2, num_experts_per_tok=2,
        first_k_dense_replace=0, n_group=1, topk_group=1, routed_scaling_factor=1.0, norm_topk_prob=False,
        q_lora_rank=None, kv_lora_rank=12, qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=6,
        rope_interleave=False, attention_bias=True, tie_word_embeddings=True,
    )),
    # GPT-OSS: hidden and intermediate multiples of 32 so the MXFP4 test can reuse this config; H != 2I.
    "gpt_oss": ("gpt_oss", dict(
        vocab_size=180, hidden_size=96, intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=12, num_local_experts=5, num_experts_per_tok=2, sliding_window=4,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"], swiglu_limit=1.0,
        tie_word_embeddings=False,
    )),
}


# families whose bias tensors are also randomised (the older cases keep the weights their tests were written for)
BIASED_TYPES = ("deepseek_v2", "deepseek_v3", "gpt_oss")


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
        # biases start at zero (DeepSeek's score correction is a buffer): make a dropped or misplaced one visible
        for n, p in [*model.named_parameters(), *model.named_buffers()]:
            if n.endswith("e_score_correction_bias") or (model_type in BIASED_TYPES and n.endswith("bias")):
                p.copy_(0.05 * torch.randn_like(p))
    return model.eval()


def save_tiny(name: str, folder: Path, seed: int = 0, shard_size: str = "40KB"):
    """Builds and saves a tiny checkpoint (sharded) and returns the transformers model."""
    model = build_hf_model(name, seed)
    model.save_pretrained(folder, max_shard_size=shard_size)
    return model


def save_char_tokenizer(path: Path) -> Path:
    """A character-level tokenizer (32 ids, `<|endoftext|>` among them) that fits every tiny vocabulary here:
    for checkpoints that ship none (transformers writes no tokenizer) and for the tiny containers."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    chars = list(" etaoinshrdlcumwfgypbvkjxqz.,\n")
    vocab = {"<unk>": 0, "<|endoftext|>": 1, **{c: i + 2 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(".|\n"), behavior="isolated")
    tok.save(str(path))
    return path


def prefill_then_steps(model, ids: torch.Tensor, prefix: int):
    """(logits of a prefill of `prefix` tokens then one-token steps through the KV cache, logits of one forward
    over all of ids, the cache): incremental decoding must reproduce the full forward."""
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache()
        steps = [model(ids[:, :prefix], cache=cache)]
        steps += [model(ids[:, t : t + 1], cache=cache) for t in range(prefix, ids.shape[1])]
    return torch.cat(steps, dim=1), full, cache
