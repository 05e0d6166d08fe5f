"""The peer benchmark's model: a random Mixtral-layout checkpoint and a tokenizer trained here, made once per
shape and cached, so prism and llama.cpp convert exactly the same files.

The tokenizer is Llama-2 style (SentencePiece-like BPE on "▁"-marked words, byte fallback to <0xNN>
tokens), not prism's byte-level GPT-2 scheme: llama.cpp's converter reads a byte-fallback BPE
tokenizer.json through its `LlamaHfVocab` path, while a byte-level BPE would need its pre-tokenizer's
hash in the converter's table of known models, which a tokenizer trained here never has.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

SPECIALS = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2 as in Llama / Mixtral
BYTE_TOKENS = tuple(f"<0x{b:02X}>" for b in range(256))
MAKE_VERSION = 1  # in the cache key: bumped when the made files change


@dataclass(frozen=True)
class Shape:
    """The benchmark's Mixtral shapes: the issue's base model (hidden 1024, 8 experts of width 2816, top-2,
    8 layers) with the expert width multiplied by `width` and `layers` decoder layers."""

    width: int = 1
    layers: int = 8
    hidden: int = 1024
    expert_width: int = 2816
    experts: int = 8
    top_k: int = 2
    heads: int = 16
    kv_heads: int = 4
    vocab: int = 4096  # with the rest above, 583 M parameters at width 1 and 8 layers (the figure)
    seed: int = 0
    init_std: float = 0.02

    @property
    def intermediate(self) -> int:
        return self.expert_width * self.width

    @property
    def key(self) -> str:
        return f"mixtral-w{self.width}-l{self.layers}-h{self.hidden}-v{self.vocab}-s{self.seed}-m{MAKE_VERSION}"

    def parameters(self) -> dict[str, int]:
        """Parameter counts by arithmetic: experts, attention, the rest (embeddings, head, routers, norms)."""
        h, kv = self.hidden, self.hidden // self.heads * self.kv_heads
        experts = self.layers * self.experts * 3 * h * self.intermediate
        attention = self.layers * (2 * h * h + 2 * h * kv)
        other = 2 * self.vocab * h + self.layers * (self.experts * h + 2 * h) + h
        return {"experts": experts, "attention": attention, "other": other, "total": experts + attention + other}

    def config(self):
        from transformers import MixtralConfig

        return MixtralConfig(
            vocab_size=self.vocab, hidden_size=self.hidden, intermediate_size=self.intermediate,
            num_hidden_layers=self.layers, num_attention_heads=self.heads, num_key_value_heads=self.kv_heads,
            head_dim=self.hidden // self.heads, num_local_experts=self.experts, num_experts_per_tok=self.top_k,
            max_position_embeddings=4096, rope_theta=1e6, rms_norm_eps=1e-5, initializer_range=self.init_std,
            tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
        )


def training_text(max_code_chars: int = 4_000_000) -> list[str]:
    """The tokenizer's text: the prose every Python install carries and a slice of the standard library."""
    from calibration import builtin

    code, total = [], 0
    for doc in builtin.code_documents():
        if total >= max_code_chars:
            break
        code.append(doc)
        total += len(doc)
    return list(builtin.prose_documents()) + code


def train_llama_tokenizer(documents: list[str], vocab_size: int):
    """A Llama-2-style tokenizer of exactly `vocab_size` tokens: <unk> <s> </s>, the 256 byte tokens, then
    the BPE pieces trained on `documents` (merges never cross a "▁"-marked word start)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    pieces = vocab_size - len(BYTE_TOKENS)
    trainer = trainers.BpeTrainer(vocab_size=pieces, special_tokens=list(SPECIALS), limit_alphabet=256,
                                  show_progress=False)
    metaspace = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    draft = Tokenizer(models.BPE(unk_token="<unk>"))
    draft.pre_tokenizer = metaspace
    draft.train_from_iterator(documents, trainer)
    trained = json.loads(draft.to_str())["model"]
    order = sorted(trained["vocab"].items(), key=lambda kv: kv[1])
    words = [t for t, _ in order if t not in SPECIALS]
    vocab = {t: i for i, t in enumerate([*SPECIALS, *BYTE_TOKENS, *words])}
    if len(vocab) != vocab_size:  # the text ran out of merges before the budget
        raise ValueError(f"tokenizer: trained {len(vocab)} tokens, wanted {vocab_size}")
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = metaspace
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(list(SPECIALS))
    return tok


def save_tokenizer(tok, folder: Path) -> None:
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
              "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False, "model_max_length": 4096,
              "clean_up_tokenization_spaces": False}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1) + "\n")


def make_checkpoint(shape: Shape, folder: Path, log=print) -> Path:
    """The checkpoint of `shape` in `folder` (conventionally named shape.key): bf16 safetensors, random weights
    drawn with the shape's seed at std `init_std` by transformers' own init (norms stay at one)."""
    import torch
    import transformers

    folder.mkdir(parents=True, exist_ok=True)
    log(f"making {folder.name}: {shape.parameters()['total'] / 1e6:,.0f} M parameters")
    torch.manual_seed(shape.seed)
    model = transformers.AutoModelForCausalLM.from_config(shape.config(), dtype=torch.bfloat16)
    model.save_pretrained(folder, max_shard_size="2GB")
    del model
    save_tokenizer(train_llama_tokenizer(training_text(), shape.vocab), folder)
    (folder / "done.json").write_text(json.dumps({"shape": asdict(shape), "parameters": shape.parameters()}) + "\n")
    return folder
