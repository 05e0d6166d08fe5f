"""Which tokenizer a stage uses: --tokenizer as a file, a folder or a Hub id (from a local cache, offline), a
checkpoint's SentencePiece tokenizer.model converted (encoding exactly as SentencePiece does), and clear errors
where there is none; `prism run --tokenizer` for a checkpoint that ships none."""

from __future__ import annotations

import shutil

import pytest
from hub_cache import populate_cache
from tiny import save_char_tokenizer
from typer.testing import CliRunner

from calibration import builtin
from prism_convert.cli.app import app
from prism_convert.spm import SentencePieceError, spm_tokenizer
from prism_convert.tokenizer import TokenizerError, resolve_tokenizer
from prism_load.hub import HubError

TEXTS = ["Hello world", "  leading  and   multiple spaces  ", "line one\nline two\n\nthree", "Naïve café — 日本語 🙂",
         "def f(x):\n    return x  # done", "▁starts with the meta symbol", "a <sep> b<sep>c", ""]


@pytest.fixture(scope="module")
def spm_models(tmp_path_factory):
    """Real SentencePiece models trained here on bundled prose: Unigram and BPE, with and without byte fallback."""
    spm = pytest.importorskip("sentencepiece")
    root = tmp_path_factory.mktemp("spm")
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(d.replace("\n", " ") for d in builtin.prose_documents()[:60]))
    models = {}
    for kind in ("unigram", "bpe", "word"):
        for fallback in (True, False):
            prefix = root / f"{kind}-{fallback}"
            spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(prefix), vocab_size=500, model_type=kind,
                                           byte_fallback=fallback, user_defined_symbols=["<sep>"],
                                           character_coverage=0.995, minloglevel=2)
            models[kind, fallback] = (prefix.with_suffix(".model"), spm.SentencePieceProcessor(model_file=str(prefix) + ".model"))
    return models


@pytest.mark.parametrize("kind", ["unigram", "bpe"])
@pytest.mark.parametrize("fallback", [True, False])
def test_sentencepiece_model_encodes_as_sentencepiece_does(spm_models, kind, fallback):
    path, sp = spm_models[kind, fallback]
    tok = spm_tokenizer(path)
    texts = TEXTS + [d[:400] for d in builtin.prose_documents()[100:112]]
    for text in texts:
        assert tok.encode(text, add_special_tokens=False).ids == sp.encode(text), text
    assert tok.token_to_id("</s>") == sp.eos_id() and tok.get_vocab_size() == sp.get_piece_size()
    if fallback:  # lossless up to SentencePiece's own normalisation
        for text in texts:
            assert tok.decode(sp.encode(text)) == sp.decode(sp.encode(text)), text


def test_a_checkpoint_with_only_tokenizer_model_is_converted(spm_models, tiny_checkpoint, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint("mixtral")[0], folder)
    path, sp = spm_models["bpe", True]
    shutil.copy(path, folder / "tokenizer.model")
    with pytest.raises(TokenizerError, match=r"tokenizer.model \(SentencePiece, converted\): the tokenizer has ids up "
                                             r"to 499 but the model's vocabulary holds 211 tokens"):
        resolve_tokenizer(None, folder, vocab_size=211)
    found = resolve_tokenizer(None, folder, vocab_size=500)
    assert found.origin == f"{folder / 'tokenizer.model'} (SentencePiece, converted)" and not found.from_checkpoint
    assert found.tokenizer.encode("A line of text.", add_special_tokens=False).ids == sp.encode("A line of text.")


def test_models_prism_cannot_convert_are_named(spm_models, tmp_path):
    with pytest.raises(SentencePieceError, match=r"word-True.model: a SentencePiece WORD model, which prism cannot "
                                                 r"convert \(Unigram and BPE only\); give a tokenizer.json with --tokenizer"):
        spm_tokenizer(spm_models["word", True][0])
    (tmp_path / "tokenizer.model").write_bytes(b"\x0a\xff\xff")
    with pytest.raises(SentencePieceError, match=r"tokenizer.model: not a SentencePiece model \(truncated"):
        resolve_tokenizer(str(tmp_path))


def test_named_files_and_folders(tmp_path):
    path = save_char_tokenizer(tmp_path / "tok.json")
    by_file = resolve_tokenizer(str(path))
    assert by_file.origin == f"--tokenizer {path}" and by_file.tokenizer.token_to_id("<|endoftext|>") == 1
    (tmp_path / "tokenizer.json").write_text(path.read_text())
    assert resolve_tokenizer(str(tmp_path)).origin == str(tmp_path / "tokenizer.json")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(TokenizerError, match=r"--tokenizer .*broken.json: not a valid tokenizer.json"):
        resolve_tokenizer(str(tmp_path / "broken.json"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenizerError, match=r"--tokenizer .*empty: the folder holds no tokenizer.json or tokenizer.model"):
        resolve_tokenizer(str(tmp_path / "empty"))


def test_hub_id_from_the_local_cache_offline(tmp_path, offline, monkeypatch):
    import huggingface_hub.constants

    src = tmp_path / "src"
    src.mkdir()
    save_char_tokenizer(src / "tokenizer.json")
    (src / "model.safetensors").write_bytes(b"weights that must not be fetched")
    commit = populate_cache(tmp_path / "cache", "org/tok", src)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    found = resolve_tokenizer("org/tok", vocab_size=211)
    assert found.origin == f"org/tok@{commit[:12]}: tokenizer.json" and found.tokenizer.get_vocab_size() == 32
    assert [(name, args[0], kwargs["allow_patterns"]) for name, args, kwargs in offline] == [
        ("snapshot_download", "org/tok", ["tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                                          "special_tokens_map.json"])]
    with pytest.raises(HubError, match=r"--tokenizer org/other: not in the local cache, and the Hub cannot be reached"):
        resolve_tokenizer("org/other")
    with pytest.raises(TokenizerError, match=r"--tokenizer no/such/thing: no such file or folder, and not a Hub repo id"):
        resolve_tokenizer("no/such/thing")


def test_run_with_a_tokenizer_for_a_checkpoint_that_ships_none(tiny_checkpoint, tmp_path):
    folder = tiny_checkpoint("mixtral")[0]
    runner = CliRunner()
    result = runner.invoke(app, ["run", str(folder), "-p", "the ", "-n", "3"])
    assert "no tokenizer" in str(result.exception) and "--tokenizer" in str(result.exception)
    path = save_char_tokenizer(tmp_path / "char.json")
    result = runner.invoke(app, ["run", str(folder), "-p", "the ", "-n", "3", "--tokenizer", str(path)])
    assert result.exit_code == 0, (result.output, result.exception)
    assert result.output.startswith("the ") and "decode 2 tokens" in result.output
