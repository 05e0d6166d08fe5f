"""A SentencePiece `tokenizer.model` as a `tokenizers` Tokenizer, for checkpoints that ship no tokenizer.json.

The model file is a protobuf message (sentencepiece_model.proto); the few fields needed are read with the
small wire-format reader below, so neither `sentencepiece` nor `protobuf` is required. The Tokenizer is
assembled from the `tokenizers` library's own parts the way transformers' converter does it
(`SpmConverter.build_tokenizer_from_spm_proto` in transformers/convert_slow_tokenizer.py): the model's
normalizer settings, Unigram or BPE (merges ranked by piece score), byte fallback, user-defined pieces kept
whole. WORD and CHAR models are refused.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

from prism_load.errors import PrismError

UNIGRAM, BPE = 1, 2
NORMAL, CONTROL, USER_DEFINED = 1, 3, 4
MODEL_TYPES = {1: "Unigram", 2: "BPE", 3: "WORD", 4: "CHAR"}


class SentencePieceError(PrismError):
    """A tokenizer.model that is not a SentencePiece model, or one of a kind prism cannot convert."""


@dataclass
class Piece:
    piece: str
    score: float = 0.0
    type: int = NORMAL


@dataclass
class SpmModel:
    """The fields of ModelProto the conversion reads, with the .proto's defaults."""

    pieces: list[Piece] = field(default_factory=list)
    model_type: int = UNIGRAM  # TrainerSpec.model_type (3)
    byte_fallback: bool = False  # TrainerSpec.byte_fallback (35)
    unk_id: int = 0  # TrainerSpec.unk_id (40)
    unk_piece: str = "<unk>"  # TrainerSpec.unk_piece (45)
    precompiled_charsmap: bytes = b""  # NormalizerSpec.precompiled_charsmap (2)
    add_dummy_prefix: bool = True  # NormalizerSpec (3)
    remove_extra_whitespaces: bool = True  # NormalizerSpec (4)
    escape_whitespaces: bool = True  # NormalizerSpec (5)


def _varint(data: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= len(data) or shift > 63:
            raise ValueError("truncated varint")
        byte = data[i]
        value |= (byte & 0x7F) << shift
        i, shift = i + 1, shift + 7
        if not byte & 0x80:
            return value, i


def _fields(data: bytes):
    """(field number, value) of every field of one message: ints for varints, bytes for the rest."""
    i = 0
    while i < len(data):
        key, i = _varint(data, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(data, i)
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, i = data[i : i + size], i + size
        elif wire == 2:
            size, i = _varint(data, i)
            value, i = data[i : i + size], i + size
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if i > len(data):
            raise ValueError("truncated field")
        yield number, value


def read_model(path: Path) -> SpmModel:
    try:
        return parse_model(Path(path).read_bytes())
    except (ValueError, UnicodeDecodeError, struct.error) as e:
        raise SentencePieceError(f"{path}: not a SentencePiece model ({e})") from None


def parse_model(data: bytes) -> SpmModel:
    model = SpmModel()
    for number, value in _fields(data):
        if number == 1:
            piece = Piece("")
            for n, v in _fields(value):
                if n == 1:
                    piece.piece = v.decode("utf-8")
                elif n == 2:
                    piece.score = struct.unpack("<f", v)[0]
                elif n == 3:
                    piece.type = v
            model.pieces.append(piece)
        elif number == 2:
            for n, v in _fields(value):
                if n == 3:
                    model.model_type = v
                elif n == 35:
                    model.byte_fallback = bool(v)
                elif n == 40:
                    model.unk_id = v
                elif n == 45:
                    model.unk_piece = v.decode("utf-8")
        elif number == 3:
            for n, v in _fields(value):
                if n == 2:
                    model.precompiled_charsmap = v
                elif n == 3:
                    model.add_dummy_prefix = bool(v)
                elif n == 4:
                    model.remove_extra_whitespaces = bool(v)
                elif n == 5:
                    model.escape_whitespaces = bool(v)
    if not model.pieces:
        raise ValueError("no pieces")
    return model


def spm_tokenizer(path: Path):
    """A `tokenizers.Tokenizer` that encodes text as the SentencePiece model at `path` does."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    spm = read_model(path)
    if spm.model_type not in (UNIGRAM, BPE):
        raise SentencePieceError(
            f"{path}: a SentencePiece {MODEL_TYPES.get(spm.model_type, spm.model_type)} model, which prism "
            "cannot convert (Unigram and BPE only); give a tokenizer.json with --tokenizer"
        )
    user_defined = [p.piece for p in spm.pieces if p.type == USER_DEFINED]
    if spm.model_type == BPE:
        vocab = {p.piece: i for i, p in enumerate(spm.pieces)}
        normal = {p.piece: (p.score, i) for i, p in enumerate(spm.pieces) if p.type == NORMAL}
        ranked = sorted((-score, i, token[:k], token[k:]) for token, (score, i) in normal.items()
                        for k in range(1, len(token)) if token[:k] in normal and token[k:] in normal)
        tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[(a, b) for _, _, a, b in ranked], unk_token=spm.unk_piece,
                                         fuse_unk=True, byte_fallback=spm.byte_fallback, ignore_merges=bool(user_defined)))
    else:
        tokenizer = Tokenizer(models.Unigram([(p.piece, p.score) for p in spm.pieces], spm.unk_id, spm.byte_fallback))
    steps = [normalizers.Precompiled(spm.precompiled_charsmap)] if spm.precompiled_charsmap else []
    if spm.remove_extra_whitespaces:  # spaces only: SentencePiece leaves newlines alone
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if spm.escape_whitespaces:
        steps.append(normalizers.Replace(" ", "▁"))
    if spm.add_dummy_prefix:  # Metaspace skips the prefix when the text already starts with "▁"; SentencePiece doesn't
        steps.append(normalizers.Replace(Regex(r"\A▁"), "▁▁"))
    tokenizer.normalizer = normalizers.Sequence(steps)
    splits = [pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=False)] if spm.add_dummy_prefix else []
    if user_defined:  # emitted whole, never merged
        pattern = "|".join(re.escape(p) for p in sorted(user_defined, key=len, reverse=True))
        splits.append(pre_tokenizers.Split(Regex(pattern), behavior="isolated"))
    if splits:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(splits)
    steps = [decoders.Replace("▁", " ")] + ([decoders.ByteFallback()] if spm.byte_fallback else [])
    if spm.add_dummy_prefix:
        steps += [decoders.Fuse(), decoders.Strip(content=" ", left=1)]
    elif spm.byte_fallback:
        steps.append(decoders.Fuse())
    tokenizer.decoder = decoders.Sequence(steps)
    tokenizer.add_special_tokens([AddedToken(p.piece, special=True, normalized=False)
                                  for p in spm.pieces if p.type == CONTROL])
    return tokenizer
