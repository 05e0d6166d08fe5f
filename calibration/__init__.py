"""Calibration text for profiling and evaluation: sources that yield documents, and fixed-length token
samples cut from them with a held-out split that never overlaps calibration.

    source = calibration.resolve("builtin:mix")      # or a file, a dataset folder, hf:NAME[:CONFIG]
    tokens = calibration.token_samples(source, tokenizer, samples=128, seq_len=256, seed=0)
    heldout = calibration.draw_samples(source, tokenizer, 16, 256, split="heldout", fewer_ok=True)  # .tokens, .rule
"""

from .samples import (
    SPLITS,
    Draw,
    SplitTooSmall,
    apportion,
    describe_rule,
    document_split,
    draw_samples,
    eos_token_id,
    source_documents,
    split_documents,
    split_rule,
    tail_cut,
    token_samples,
    token_stream,
)
from .sources import CalibrationSource, MixSource, builtin_source, resolve

__all__ = [
    "SPLITS",
    "CalibrationSource",
    "Draw",
    "SplitTooSmall",
    "MixSource",
    "apportion",
    "builtin_source",
    "describe_rule",
    "document_split",
    "draw_samples",
    "eos_token_id",
    "resolve",
    "source_documents",
    "split_documents",
    "split_rule",
    "tail_cut",
    "token_samples",
    "token_stream",
]
