"""Calibration text for profiling and evaluation: sources that yield documents, and fixed-length token
samples cut from them with a held-out split that never overlaps calibration.

    source = calibration.resolve("builtin:mix")      # or a file, a dataset folder, hf:NAME[:CONFIG]
    tokens = calibration.token_samples(source, tokenizer, samples=128, seq_len=256, seed=0)
"""

from .samples import (
    SPLITS,
    apportion,
    document_split,
    eos_token_id,
    split_documents,
    token_samples,
    token_stream,
)
from .sources import CalibrationSource, MixSource, builtin_source, resolve

__all__ = [
    "SPLITS",
    "CalibrationSource",
    "MixSource",
    "apportion",
    "builtin_source",
    "document_split",
    "eos_token_id",
    "resolve",
    "split_documents",
    "token_samples",
    "token_stream",
]
