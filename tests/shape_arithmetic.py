"""An independent count of DeepSeek-V3 and GPT-OSS weights and KV cache by explicit arithmetic, written
from the published configs, not from prism's model code: the tests hold `prism plan`'s meta-device count
(prism_convert/tools/model_shape.py) to it."""

from __future__ import annotations

from prism_convert.tools.model_shape import ModelShape


def deepseek_v3_shape(config: dict) -> ModelShape:
    """DeepSeek-V3 by explicit arithmetic (MLA attention, first_k_dense_replace dense layers, shared experts).

    The MTP layer (num_nextn_predict_layers) is not counted: prism does not load it. KV: MLA caches the
    compressed latent (kv_lora_rank) plus the shared rope key (qk_rope_head_dim) per token and layer.
    """
    c = {k: v for k, v in config.items() if v is not None}
    h, n_layers, heads = c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"]
    q_lora, kv_lora = c.get("q_lora_rank"), c["kv_lora_rank"]
    nope, rope, v_dim = c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"]
    experts, inter = c["n_routed_experts"], c["moe_intermediate_size"]
    shared = c.get("n_shared_experts", 0) * inter
    moe = {
        i
        for i in range(n_layers)
        if i >= c.get("first_k_dense_replace", 0) and i % c.get("moe_layer_freq", 1) == 0
    }
    tensors = [("embedding", (c["vocab_size"], h)), ("norms", (h,))]
    if not c.get("tie_word_embeddings", False):
        tensors.append(("lm_head", (c["vocab_size"], h)))
    expert_tensors = {}
    for i in range(n_layers):
        q = (
            [("attention", (q_lora, h)), ("norms", (q_lora,)), ("attention", (heads * (nope + rope), q_lora))]
            if q_lora
            else [("attention", (heads * (nope + rope), h))]
        )
        tensors += q + [
            ("attention", (kv_lora + rope, h)),
            ("norms", (kv_lora,)),
            ("attention", (heads * (nope + v_dim), kv_lora)),
            ("attention", (h, heads * v_dim)),
            ("norms", (h,)),
            ("norms", (h,)),
        ]
        if i in moe:
            tensors += [("routers", (experts, h)), ("routers", (experts,))]
            tensors += (
                [("shared_experts", s) for s in ((shared, h), (shared, h), (h, shared))] if shared else []
            )
            expert_tensors[i] = [((inter, h), experts), ((inter, h), experts), ((h, inter), experts)]
        else:
            d = c["intermediate_size"]
            tensors += [("dense_mlp", s) for s in ((d, h), (d, h), (h, d))]
    kv = [(kv_lora + rope, None)] * n_layers
    return ModelShape(
        "deepseek_v3",
        n_layers,
        experts,
        c["num_experts_per_tok"],
        tensors,
        expert_tensors,
        kv,
        "explicit arithmetic (tests/shape_arithmetic.py)",
        config,
    )


def gpt_oss_shape(config: dict) -> ModelShape:
    """GPT-OSS by explicit arithmetic: biased GQA attention with sinks, biased router and experts."""
    c = config
    h, n_layers, heads, kv_heads = (
        c["hidden_size"],
        c["num_hidden_layers"],
        c["num_attention_heads"],
        c["num_key_value_heads"],
    )
    d, experts, inter = c.get("head_dim") or h // heads, c["num_local_experts"], c["intermediate_size"]
    tensors = [("embedding", (c["vocab_size"], h)), ("norms", (h,))]
    if not c.get("tie_word_embeddings", False):
        tensors.append(("lm_head", (c["vocab_size"], h)))
    types = c.get("layer_types") or [
        "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layers)
    ]
    for _ in range(n_layers):
        for out, inp in ((heads * d, h), (kv_heads * d, h), (kv_heads * d, h), (h, heads * d)):
            tensors += [("attention", (out, inp)), ("attention", (out,))]
        tensors += [
            ("attention", (heads,)),
            ("norms", (h,)),
            ("norms", (h,)),
            ("routers", (experts, h)),
            ("routers", (experts,)),
        ]
    expert_tensors = {
        i: [((2 * inter, h), experts), ((2 * inter,), experts), ((h, inter), experts), ((h,), experts)]
        for i in range(n_layers)
    }
    window = c.get("sliding_window")
    kv = [(2 * kv_heads * d, window if t == "sliding_attention" else None) for t in types]
    return ModelShape(
        "gpt_oss",
        n_layers,
        experts,
        c["num_experts_per_tok"],
        tensors,
        expert_tensors,
        kv,
        "explicit arithmetic (tests/shape_arithmetic.py)",
        config,
    )


ARITHMETIC = {"deepseek_v3": deepseek_v3_shape, "gpt_oss": gpt_oss_shape}
