"""Calibration sources and token samples: specs, file formats, determinism, held-out split, clear errors."""

from __future__ import annotations

import json
import random
import re

import pytest
import torch

import calibration
from calibration import builtin
from calibration.sources import BuiltinSource, MixSource, RecordFileSource, TextFileSource
from prism_load.errors import CalibrationError

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda",
         "mu", "nu", "xi", "omicron", "pi", "rho", "sigma", "tau", "upsilon", "phi", "chi", "psi", "omega"]


def _doc(i: int, words: int = 40) -> str:
    """A document carrying its own marker `docNNNN` at the start and end, so every window names its source."""
    body = " ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(words))
    return f"doc{i:04d} {body} doc{i:04d}"


class ListSource(calibration.CalibrationSource):
    def __init__(self, docs, name="list"):
        self.docs, self.name = list(docs), name

    def documents(self):
        yield from self.docs


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([_doc(i) for i in range(50)] + list(builtin.prose_documents()[:20]), trainer)
    return tok


# --- specs -------------------------------------------------------------------------------------------

def test_resolve_builtin_specs():
    assert isinstance(calibration.resolve("builtin:prose"), BuiltinSource)
    assert calibration.resolve("builtin:code").name == "builtin:code"
    mix = calibration.resolve("builtin:mix")
    assert isinstance(mix, MixSource)
    assert [s.name for s, _ in mix.parts] == ["builtin:prose", "builtin:code"]


@pytest.mark.parametrize("spec, pattern", [
    ("builtin:poetry", r"unknown built-in dataset 'builtin:poetry'.*prose, code, mix"),
    ("no/such/file.jsonl", r"no/such/file.jsonl: no such file"),
    ("corpus-name", r"'corpus-name': no such file, and not a known dataset spec"),
    ("builtin:prose?column=x", r"unknown option 'column=x'"),
    ("hf:", r"no dataset name after 'hf:'"),
    ("hf:some/set?splt=train", r"unknown option 'splt=train' \(options: split, column, revision\)"),
    ("", r"empty dataset spec"),
])
def test_resolve_rejects_bad_specs(spec, pattern):
    with pytest.raises(CalibrationError, match=pattern):
        calibration.resolve(spec)


def test_resolve_rejects_unsupported_file_type(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("text\nhello\n")
    with pytest.raises(CalibrationError, match=r"data.csv: unsupported file type '.csv'"):
        calibration.resolve(str(path))


# --- built-in text -----------------------------------------------------------------------------------

def test_builtin_prose_is_documentation_not_code():
    from pydoc_data.topics import topics

    docs = builtin.prose_documents()
    assert len(docs) > len(topics)  # topics are cut at their sections
    text = "\n".join(docs)
    assert 'The "if" statement is used for conditional execution' in text
    # Prose, not source: few lines start like Python definitions or imports.
    lines = text.splitlines()
    code_like = sum(bool(re.match(r"(def |class |import |from \S+ import )", ln)) for ln in lines)
    assert code_like / len(lines) < 0.01


def test_builtin_code_is_library_source_without_tests():
    files = builtin.code_files()
    rel = [f.relative_to(builtin.stdlib_dir()).as_posix() for f in files]
    assert "json/__init__.py" in rel and "argparse.py" in rel
    assert rel == sorted(rel)
    assert not any(set(r.split("/")[:-1]) & builtin.CODE_SKIP_DIRS for r in rel)
    docs = builtin.code_documents()
    assert len(docs) == len(files)
    compile(docs[rel.index("argparse.py")], "argparse.py", "exec")  # whole files, real Python


def test_paragraph_documents_keep_paragraphs_whole():
    paragraphs = [f"paragraph {i} " + "word " * (10 + i) for i in range(30)]
    docs = builtin.paragraph_documents("\n\n\n".join(paragraphs), min_chars=200)
    assert len(docs) > 3
    assert all(len(d) >= 200 for d in docs[:-1])
    assert [p for d in docs for p in d.split("\n\n")] == [p.strip("\n") for p in paragraphs]


# --- samples -----------------------------------------------------------------------------------------

def test_token_samples_are_deterministic_under_the_seed(tokenizer):
    source = ListSource([_doc(i) for i in range(300)])
    a = calibration.token_samples(source, tokenizer, 12, 32, seed=3)
    b = calibration.token_samples(source, tokenizer, 12, 32, seed=3)
    c = calibration.token_samples(source, tokenizer, 12, 32, seed=4)
    assert a.shape == (12, 32) and a.dtype == torch.long
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert int(a.max()) < tokenizer.get_vocab_size()


def test_documents_are_joined_with_the_end_of_text_token(tokenizer):
    eos = calibration.eos_token_id(tokenizer)
    assert eos == tokenizer.token_to_id("<|endoftext|>")
    docs = [_doc(i, words=5) for i in range(3)]
    stream = calibration.token_stream(tokenizer, docs, eos)
    pieces = [tokenizer.decode(p) for p in _split_list(stream.tolist(), eos)]
    assert pieces == docs


def _split_list(ids, sep):
    out, cur = [], []
    for t in ids:
        if t == sep:
            out.append(cur)
            cur = []
        else:
            cur.append(t)
    return out


def _markers(tokenizer, windows) -> set[str]:
    return {m for row in windows.tolist() for m in re.findall(r"doc\d{4}", tokenizer.decode(row))}


def test_heldout_split_never_overlaps_calibration(tokenizer):
    docs = [_doc(i) for i in range(400)]
    expected_heldout = {d.split()[0] for d in docs if calibration.document_split(d) == "heldout"}
    assert 20 < len(expected_heldout) < 80  # ~10% of 400
    source = ListSource(docs)
    cal = calibration.token_samples(source, tokenizer, 60, 48, seed=1, split="calibration")
    held = calibration.token_samples(source, tokenizer, 15, 48, seed=1, split="heldout")
    cal_docs, held_docs = _markers(tokenizer, cal), _markers(tokenizer, held)
    assert cal_docs and held_docs
    assert held_docs <= expected_heldout
    assert not cal_docs & expected_heldout
    # The split depends on the text alone: another seed, order or source does not move a document.
    shuffled = ListSource(list(reversed(docs)))
    held2 = calibration.token_samples(shuffled, tokenizer, 15, 48, seed=9, split="heldout")
    assert _markers(tokenizer, held2) <= expected_heldout


def test_mix_draws_each_part_in_proportion(tokenizer):
    a = ListSource([f"doc{i:04d} " + "alpha " * 30 for i in range(100)], "a")
    b = ListSource([f"doc{i:04d} " + "omega " * 30 for i in range(100, 200)], "b")
    mix = MixSource("ab", [(a, 0.75), (b, 0.25)])
    windows = calibration.token_samples(mix, tokenizer, 16, 16, seed=0)
    kinds = ["alpha" in tokenizer.decode(row) and "omega" not in tokenizer.decode(row) for row in windows.tolist()]
    assert sum(kinds) == 12
    assert calibration.apportion(7, [0.5, 0.5]) == [4, 3]
    assert calibration.apportion(10, [1, 1, 1]) == [4, 3, 3]


def test_builtin_mix_samples(tokenizer):
    windows = calibration.token_samples(calibration.resolve("builtin:mix"), tokenizer, 8, 64, seed=0)
    assert windows.shape == (8, 64)
    text = [tokenizer.decode(row) for row in windows.tolist()]
    assert any("def " in t or "import " in t or "self." in t for t in text)


def test_too_many_samples_says_how_many_the_data_holds(tokenizer):
    docs = [_doc(i, words=6) for i in range(calibration.samples.MIN_DOCUMENT_SPLIT)]  # just enough for the document rule
    source = ListSource(docs, "many")
    cal = [d for d in docs if calibration.document_split(d) == "calibration"]
    held = len(calibration.token_stream(tokenizer, cal, calibration.eos_token_id(tokenizer))) // 64
    assert calibration.token_samples(source, tokenizer, held, 64).shape == (held, 64)
    with pytest.raises(calibration.SplitTooSmall, match=rf"many: the calibration split holds {held} samples of 64 "
                                                        rf"tokens .* in {len(cal)} documents\), but {held + 1} were asked") as e:
        calibration.token_samples(source, tokenizer, held + 1, 64)
    assert (e.value.available, e.value.asked) == (held, held + 1)
    draw = calibration.draw_samples(source, tokenizer, held + 1, 64, fewer_ok=True)
    assert draw.tokens.shape == (held, 64) and draw.asked == held + 1
    assert draw.rule == f"many: 10% of its {len(docs)} documents, chosen by a hash of their text"


def _line(i: int) -> str:
    """One paragraph of random words (so no window of tokens repeats), marked with its number."""
    rng = random.Random(i)
    return f"line{i:04d} " + " ".join(rng.choice(WORDS) for _ in range(30)) + f" line{i:04d}"


def _offsets(stream: torch.Tensor, windows: torch.Tensor) -> set[int]:
    """Where each window occurs in the stream (each must occur exactly once)."""
    found = set()
    all_windows = stream.unfold(0, windows.shape[1], 1)  # [positions, L]
    for row in windows:
        at = (all_windows == row).all(-1).nonzero().flatten().tolist()
        assert len(at) == 1, at
        found.add(at[0])
    return found


def test_a_text_file_of_one_paragraph_a_line_holds_out_the_tail_of_its_token_stream(tmp_path, tokenizer):
    """The issue's case: a text file written one paragraph a line (no blank line) used to be one document, so
    the hash split held out all or nothing. Its lines are now its paragraphs, and with few documents the
    held-out split is the last 10% of the token stream: no calibration window reaches into it."""
    path = tmp_path / "calib.txt"
    text = "\n".join(_line(i) for i in range(120)) + "\n"
    path.write_text(text)
    source = calibration.resolve(str(path))
    docs = calibration.source_documents(source)
    assert 5 < len(docs) < calibration.samples.MIN_DOCUMENT_SPLIT
    assert "\n".join(docs) == text.rstrip("\n")  # whole lines, in order, nothing lost
    stream = calibration.token_stream(tokenizer, docs, calibration.eos_token_id(tokenizer))
    cut = calibration.tail_cut(len(stream))
    assert len(stream) - cut == len(stream) // 10
    seq_len = 24
    cal = calibration.draw_samples(source, tokenizer, 40, seq_len, seed=2)
    held = calibration.draw_samples(source, tokenizer, 500, seq_len, seed=2, split="heldout", fewer_ok=True)
    assert cal.tokens.shape == (40, seq_len)
    assert held.tokens.shape == ((len(stream) - cut) // seq_len, seq_len) and held.asked == 500
    assert _offsets(stream, cal.tokens) <= {k * seq_len for k in range(cut // seq_len)}
    assert _offsets(stream, held.tokens) == {cut + k * seq_len for k in range((len(stream) - cut) // seq_len)}
    assert held.rule == cal.rule == (f"{path}: the last 10% of its token stream (it has {len(docs)} documents, "
                                     f"fewer than {calibration.samples.MIN_DOCUMENT_SPLIT})")
    with pytest.raises(calibration.SplitTooSmall, match=rf"the heldout split holds {held.tokens.shape[0]} samples "
                                                        rf"of 24 tokens \(.* in the last 10% of the token stream of "
                                                        rf"its {len(docs)} documents\), but 500 were asked"):
        calibration.draw_samples(source, tokenizer, 500, seq_len, split="heldout")


def test_a_mix_gives_fewer_windows_in_proportion_when_allowed(tokenizer):
    a = ListSource([f"doc{i:04d} " + "alpha " * 30 for i in range(4)], "a")  # a short part
    b = ListSource([f"doc{i:04d} " + "omega " * 30 for i in range(100, 400)], "b")
    mix = MixSource("ab", [(a, 0.5), (b, 0.5)])
    with pytest.raises(calibration.SplitTooSmall, match=r"a: the heldout split .* \(its share of ab\)"):
        calibration.draw_samples(mix, tokenizer, 40, 8, split="heldout")
    draw = calibration.draw_samples(mix, tokenizer, 40, 8, split="heldout", fewer_ok=True)
    alpha = sum("alpha" in tokenizer.decode(row) for row in draw.tokens.tolist())
    assert 0 < draw.tokens.shape[0] < 40 and abs(2 * alpha - draw.tokens.shape[0]) <= 1
    assert draw.rule.startswith("a: the last 10% of its token stream") and "; b: 10% of its 300 documents" in draw.rule


def test_nothing_held_out_is_an_error_even_when_fewer_are_allowed(tokenizer):
    source = ListSource([_doc(0, words=20)], "one")
    with pytest.raises(calibration.SplitTooSmall, match=r"one: the heldout split holds 0 samples") as e:
        calibration.draw_samples(source, tokenizer, 4, 64, split="heldout", fewer_ok=True)
    assert e.value.available == 0


def test_empty_dataset_is_an_error(tokenizer, tmp_path):
    with pytest.raises(CalibrationError, match=r"empty: the dataset is empty"):
        calibration.token_samples(ListSource(["", "  \n"], "empty"), tokenizer, 1, 8)
    path = tmp_path / "blank.jsonl"
    path.write_text('{"text": ""}\n{"text": null}\n')
    with pytest.raises(CalibrationError, match=r"blank.jsonl: the dataset is empty"):
        calibration.token_samples(calibration.resolve(str(path)), tokenizer, 1, 8)


def test_bad_arguments(tokenizer):
    source = ListSource([_doc(0)])
    with pytest.raises(CalibrationError, match="split 'test' is not one of calibration, heldout"):
        calibration.token_samples(source, tokenizer, 1, 8, split="test")
    with pytest.raises(CalibrationError, match=r"samples \(0\)"):
        calibration.token_samples(source, tokenizer, 0, 8)


# --- local files -------------------------------------------------------------------------------------

@pytest.fixture
def records():
    return [{"id": i, "text": _doc(i), "content": f"content {i}"} for i in range(40)]


def test_text_file_source(tmp_path, tokenizer):
    path = tmp_path / "notes.txt"
    path.write_text("\n\n".join(_doc(i) for i in range(200)))
    source = calibration.resolve(str(path))
    assert isinstance(source, TextFileSource) and source.name == str(path)
    docs = list(source.documents())
    assert len(docs) > 10 and "".join(docs).count("doc0199") == 2
    assert calibration.token_samples(source, tokenizer, 4, 32).shape == (4, 32)


def test_jsonl_json_parquet_sources_read_the_text_column(tmp_path, records):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    (tmp_path / "b.json").write_text(json.dumps(records))
    (tmp_path / "c.json").write_text(json.dumps({k: [r[k] for r in records] for k in records[0]}))
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "d.parquet")
    for name in ("a.jsonl", "b.json", "c.json", "d.parquet"):
        source = calibration.resolve(str(tmp_path / name))
        assert isinstance(source, RecordFileSource)
        assert list(source.documents()) == [r["text"] for r in records], name
        other = calibration.resolve(f"{tmp_path / name}?column=content")
        assert list(other.documents()) == [r["content"] for r in records], name


@pytest.mark.parametrize("name", ["a.jsonl", "b.json", "d.parquet"])
def test_missing_text_column_names_the_columns(tmp_path, records, name):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"body": r["text"], "id": r["id"]} for r in records]
    path = tmp_path / name
    if name.endswith(".parquet"):
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        path.write_text("\n".join(json.dumps(r) for r in rows) if name.endswith("l") else json.dumps(rows))
    with pytest.raises(CalibrationError, match=rf"{name}: no column 'text' \(columns: body, id\)"):
        list(calibration.resolve(str(path)).documents())


def test_bad_file_contents(tmp_path):
    (tmp_path / "x.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(CalibrationError, match=r"x.jsonl: line 2: invalid JSON"):
        list(calibration.resolve(str(tmp_path / "x.jsonl")).documents())
    (tmp_path / "y.jsonl").write_text('{"text": 3}\n')
    with pytest.raises(CalibrationError, match=r"y.jsonl: row 0, column 'text': expected text, found int"):
        list(calibration.resolve(str(tmp_path / "y.jsonl")).documents())


# --- datasets (offline: local folders) ---------------------------------------------------------------

@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """Keep `datasets` off the network and out of the user's cache."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    return datasets


def test_hf_source_reads_a_saved_dataset_folder(tmp_path, records, hf_cache, tokenizer):
    saved = tmp_path / "saved"
    hf_cache.DatasetDict({
        "train": hf_cache.Dataset.from_list(records),
        "validation": hf_cache.Dataset.from_list(records[:5]),
    }).save_to_disk(str(saved))
    assert list(calibration.resolve(f"hf:{saved}").documents()) == [r["text"] for r in records]
    val = calibration.resolve(f"hf:{saved}?split=validation&column=content")
    assert list(val.documents()) == [r["content"] for r in records[:5]]
    with pytest.raises(CalibrationError, match=r"no split 'test' \(splits: train, validation\)"):
        list(calibration.resolve(f"hf:{saved}?split=test").documents())
    with pytest.raises(CalibrationError, match=r"no column 'body' in split 'train' \(columns: id, text, content\)"):
        list(calibration.resolve(f"hf:{saved}?column=body").documents())
    assert calibration.token_samples(calibration.resolve(str(saved)), tokenizer, 3, 16).shape == (3, 16)


def test_hf_source_reads_a_folder_of_data_files(tmp_path, records, hf_cache):
    folder = tmp_path / "files"
    folder.mkdir()
    (folder / "part.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    assert list(calibration.resolve(f"hf:{folder}").documents()) == [r["text"] for r in records]


def test_hf_source_offline_and_not_cached_is_a_clear_error(hf_cache):
    source = calibration.resolve("hf:prism-test/not-cached-anywhere:default?split=train")
    with pytest.raises(CalibrationError, match=r"hf:prism-test/not-cached-anywhere:default\?split=train&column=text: "
                                               r"cannot load the dataset \(.*\); offline mode is on"):
        list(source.documents())
