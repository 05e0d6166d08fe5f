"""The tokenizer a stage cuts text with: `--tokenizer` (a tokenizer.json, a SentencePiece tokenizer.model, a
folder holding one, or a Hub repo id), else the checkpoint's tokenizer.json, else its tokenizer.model
converted (spm.py). Resolved and checked against the model's vocabulary before any compute, so a missing or
wrong tokenizer is one line naming --tokenizer, not a failure hours in.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from prism_load.errors import PrismError

JSON_NAME, SPM_NAME = "tokenizer.json", "tokenizer.model"
HUB_PATTERNS = [JSON_NAME, SPM_NAME, "tokenizer_config.json", "special_tokens_map.json"]
ASK = "name one with --tokenizer PATH_OR_HUB_ID (a tokenizer.json, a tokenizer.model, a folder or ORG/NAME)"


class TokenizerError(PrismError):
    """No tokenizer can be found or read, or the one named does not fit the model."""


@dataclass
class ResolvedTokenizer:
    tokenizer: object  # tokenizers.Tokenizer
    origin: str  # where it came from, in words (reports, errors)
    from_checkpoint: bool  # the checkpoint's own tokenizer.json: nothing to carry into the container

    def save(self, path: Path) -> None:
        """As tokenizer.json, atomically (profile folders carry a tokenizer the checkpoint lacks)."""
        from prism_load.atomic import write_text

        write_text(path, self.tokenizer.to_str())


def resolve_tokenizer(spec: str | None, model: Path | None = None, vocab_size: int | None = None,
                      local_files_only: bool | None = None) -> ResolvedTokenizer:
    """`spec` (--tokenizer) if given, else the checkpoint folder `model`'s; with `vocab_size`, every id it can
    produce must index the model's embedding."""
    if spec is not None:
        found = _named(str(spec), local_files_only)
    else:
        found = _in_folder(Path(model), from_checkpoint=True) if model is not None else None
        if found is None:
            raise TokenizerError(f"{model}: the checkpoint ships no tokenizer ({JSON_NAME} or {SPM_NAME}); {ASK}")
    if vocab_size is not None:
        check_vocabulary(found, vocab_size)
    return found


def check_vocabulary(found: ResolvedTokenizer, vocab_size: int) -> None:
    top = max(found.tokenizer.get_vocab(with_added_tokens=True).values(), default=-1)
    if top >= vocab_size:
        raise TokenizerError(
            f"{found.origin}: the tokenizer has ids up to {top:,} but the model's vocabulary holds {vocab_size:,} "
            f"tokens, so it is not this model's tokenizer; {ASK}"
        )


def _named(spec: str, local_files_only: bool | None) -> ResolvedTokenizer:
    from prism_load.hub import is_repo_id

    path = Path(spec).expanduser()
    if path.is_file():
        return _read(path, f"--tokenizer {spec}")
    if path.is_dir():
        found = _in_folder(path, from_checkpoint=False)
        if found is None:
            raise TokenizerError(f"--tokenizer {spec}: the folder holds no {JSON_NAME} or {SPM_NAME}")
        return found
    if is_repo_id(spec):
        return _from_hub(spec, local_files_only)
    raise TokenizerError(f"--tokenizer {spec}: no such file or folder, and not a Hub repo id (ORG/NAME)")


def _in_folder(folder: Path, from_checkpoint: bool, label: str | None = None) -> ResolvedTokenizer | None:
    for name in (JSON_NAME, SPM_NAME):
        if (folder / name).is_file():
            found = _read(folder / name, f"{label}: {name}" if label else str(folder / name))
            found.from_checkpoint = from_checkpoint and name == JSON_NAME
            return found
    return None


def _read(path: Path, origin: str) -> ResolvedTokenizer:
    if path.name.endswith(".model"):
        from prism_convert.spm import spm_tokenizer

        return ResolvedTokenizer(spm_tokenizer(path), f"{origin} (SentencePiece, converted)", False)
    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001 - the tokenizers library raises plain Exceptions
        raise TokenizerError(f"{origin}: not a valid tokenizer.json ({str(e).splitlines()[0] if str(e) else e!r})") from None
    return ResolvedTokenizer(tokenizer, origin, False)


def _from_hub(repo_id: str, local_files_only: bool | None) -> ResolvedTokenizer:
    """The tokenizer files of a Hub repo, through huggingface_hub's cache (HF_HUB_OFFLINE is honoured)."""
    import huggingface_hub as hf

    from prism_load.hub import hub_call

    where = f"--tokenizer {repo_id}"
    folder = Path(hub_call(where, hf.snapshot_download, repo_id, repo_type="model", allow_patterns=HUB_PATTERNS,
                           local_files_only=bool(local_files_only)))
    found = _in_folder(folder, from_checkpoint=False, label=f"{repo_id}@{folder.name[:12]}")
    if found is None:
        raise TokenizerError(f"{where}: the repository holds no {JSON_NAME} or {SPM_NAME}")
    return found
