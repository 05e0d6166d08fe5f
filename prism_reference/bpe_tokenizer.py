"""A byte-level BPE tokenizer trained with `tokenizers` (GPT-2's scheme: any UTF-8 text encodes, nothing is
unknown), with one special token that ends a document and also starts generation (eos = bos)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

END_OF_TEXT = "<|endoftext|>"


def train_bpe_tokenizer(documents: Iterable[str], vocab_size: int):
    """Train on `documents`; the end-of-text token gets id 0. Deterministic for the same input order."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(documents, trainer)
    return tokenizer


def save_tokenizer(tokenizer, folder: Path, model_max_length: int) -> None:
    """tokenizer.json plus the small tokenizer_config.json that transformers' AutoTokenizer reads."""
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": END_OF_TEXT,
        "eos_token": END_OF_TEXT,
        "unk_token": None,
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1) + "\n")
