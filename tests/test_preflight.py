"""Every stage checks its inputs before it spends compute: `prism convert` (and profile, compress) with an input
that fails each check stops before profiling starts, names the option to change, and writes nothing. And the
issue's case end to end: a single text file, a checkpoint without a tokenizer, a held-out split smaller than
--eval-samples, converted with the evaluation shrunk and said so."""

from __future__ import annotations

import json
import random
import re
import shutil

import pytest
from tiny import save_char_tokenizer
from typer.testing import CliRunner

import prism_convert.pipeline
import prism_convert.profiling.layer_stream
import prism_convert.profiling.profiler
import prism_load
from prism_convert import preflight
from prism_convert.cli.app import app
from prism_load.errors import PrismError

LETTERS = "etaoinshrdlcumwfgypbvkjxqz"
BASE = ["--samples", "8", "--seq-len", "64", "--eval-samples", "4", "--bits", "4.25"]


def _calibration_file(path, lines: int = 60):
    """One paragraph a line (no blank line), in the characters the char tokenizer knows: ~100 tokens a line."""
    rng = random.Random(0)
    words = ["".join(rng.choice(LETTERS) for _ in range(rng.randint(2, 8))) for _ in range(200)]
    path.write_text("\n".join(" ".join(rng.choice(words) for _ in range(18)) + "." for _ in range(lines)) + "\n")
    return path


@pytest.fixture(scope="module")
def inputs(tiny_checkpoint, tmp_path_factory):
    """The tiny Mixtral (transformers writes no tokenizer), a copy of it with the char tokenizer, a text file."""
    bare = tiny_checkpoint("mixtral")[0]
    root = tmp_path_factory.mktemp("preflight")
    shipped = root / "with-tokenizer"
    shutil.copytree(bare, shipped)
    save_char_tokenizer(shipped / "tokenizer.json")
    return {"bare": bare, "model": shipped, "text": _calibration_file(root / "calib.txt"), "root": root}


@pytest.fixture
def no_compute(monkeypatch):
    """Any model compute fails the test: the checks must all come before it."""
    def forbidden(*args, **kwargs):
        raise AssertionError("model compute started before the inputs were checked")

    monkeypatch.setattr(prism_convert.profiling.profiler, "run_profile", forbidden)
    monkeypatch.setattr(prism_convert.pipeline, "run_compress", forbidden)
    monkeypatch.setattr(prism_convert.profiling.layer_stream.LayerStream, "__post_init__", forbidden)


def _invoke(args):
    return CliRunner().invoke(app, [str(a) for a in args], terminal_width=200)


def _stale_profile(work, model, dataset):
    """A finished profile of another dataset in the work folder (what a rerun with a new --dataset meets)."""
    folder = work / "profile"
    folder.mkdir(parents=True)
    config = json.loads((model / "config.json").read_text())
    (folder / "profile.json").write_text(json.dumps({
        "format": "prism-profile", "version": 1, "dataset": {"spec": dataset, "samples": 8, "seq_len": 64, "seed": 0},
        "model": {"config_sha256": prism_load.checkpoint.config_sha256(config)}}))
    for name in ("stats.safetensors", "calibration.safetensors"):
        (folder / name).write_bytes(b"")


CASES = {
    "calibration too small": (["--samples", "200"], r"calib.txt: the calibration split holds 91 samples of 64 "
                              r"tokens \(.* in the first 90% of the token stream of its 4 documents\), but 200 were "
                              r"asked for; lower --samples or --seq-len, or give a --dataset with more text"),
    "nothing held out": (["--samples", "1", "--seq-len", "1000"], r"calib.txt: the heldout split holds 0 samples of "
                         r"1000 tokens .*, but 4 were asked for; give --eval-samples 0 to skip the evaluation"),
    "missing dataset": (["--dataset", "{root}/nothing.txt"], r"--dataset: .*nothing.txt: no such file"),
    "bits below the floor": (["--bits", "2.25"], r"--bits 2.25 is below the lowest this model allows: 3\.\d{3} bits "
                             r"per expert weight .* under recipe 'mixtral'; raise --bits, or give a --recipe"),
    "size below the dense weights": (["--bits", None, "--size", "1KB"], r"--size 1,000 bytes does not even hold the "
                                     r"dense weights \([\d,]+ bytes\) under recipe 'mixtral'; raise --size"),
    "unknown price": (["--price", "disk"], r"--price 'disk': expected one of runtime, stored"),
    "unknown recipe": (["--recipe", "nosuch"], r"--recipe: recipe 'nosuch' is neither a file nor a built-in recipe"),
    "output holds other files": (["-o", "{root}/mine"], r"-o .*mine: exists and is not a .prism container \(writing "
                                 r"there would delete what it holds\); choose a new or empty folder"),
    "output under a file": (["-o", "{root}/calib.txt/out.prism"], r"-o .*out.prism: .*calib.txt is a file, so the "
                            r"folder cannot be created there"),
    "checkpoint without a tokenizer": (["MODEL={bare}"], r"the checkpoint ships no tokenizer \(tokenizer.json or "
                                       r"tokenizer.model\); name one with --tokenizer PATH_OR_HUB_ID"),
    "tokenizer not found": (["--tokenizer", "{root}/no-such-tokenizer.json"], r"--tokenizer .*no-such-tokenizer.json: "
                            r"no such file or folder, and not a Hub repo id"),
    "tokenizer of another model": (["--tokenizer", "{root}/big.json"], r"big.json: the tokenizer has ids up to 399 "
                                   r"but the model's vocabulary holds 211 tokens, so it is not this model's tokenizer"),
    "stale work folder": (["--work", "{root}/work"], r"--work .*work: holds the profile of an earlier conversion of "
                          r"another dataset .*; give another --work folder, or remove it"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_convert_fails_before_any_compute_naming_the_option(case, inputs, tmp_path, no_compute):
    extra, pattern = CASES[case]
    root = tmp_path
    (root / "mine").mkdir()
    (root / "mine" / "notes.txt").write_text("keep me")
    shutil.copy(inputs["text"], root / "calib.txt")
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({f"t{i}": i for i in range(400)}, unk_token="t0")).save(str(root / "big.json"))
    _stale_profile(root / "work", inputs["model"], "builtin:prose")
    options = dict(zip(BASE[::2], BASE[1::2])) | {"-o": str(root / "out.prism"), "--dataset": str(root / "calib.txt")}
    model = inputs["model"]
    for key, value in zip(extra[::2], extra[1::2] + [None] * (len(extra) % 2)):
        if key.startswith("MODEL="):
            model = key.removeprefix("MODEL=").format(**inputs)
        elif value is None:
            options.pop(key)
        else:
            options[key] = value.format(root=root)
    result = _invoke(["convert", model, *[x for kv in options.items() for x in kv]])
    assert isinstance(result.exception, PrismError), result.output
    assert len(str(result.exception).splitlines()) == 1
    assert re.search(pattern, str(result.exception)), str(result.exception)
    assert not (root / "out.prism").exists() and not (root / ".out.prism.work").exists()
    assert (root / "mine" / "notes.txt").read_text() == "keep me"


def test_profile_and_compress_check_first_too(inputs, tmp_path, no_compute):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    args = ["profile", inputs["model"], "--dataset", inputs["text"], "--samples", "8", "--seq-len", "64"]
    result = _invoke([*args, "-o", tmp_path / "mine"])
    assert re.search(r"-o .*mine: exists and is not a profile folder", str(result.exception))
    result = _invoke([*args, "--samples", "500", "-o", tmp_path / "prof"])
    assert re.search(r"but 500 were asked for; lower --samples or --seq-len", str(result.exception))
    result = _invoke(["profile", inputs["bare"], "--dataset", inputs["text"], "-o", tmp_path / "prof"])
    assert "name one with --tokenizer" in str(result.exception)
    result = _invoke(["compress", inputs["model"], "--profile", tmp_path / "prof", "--bits", "2", "-o", tmp_path / "w"])
    assert re.search(r"--bits 2 is below the lowest this model allows", str(result.exception))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_the_issue_a_text_file_and_no_tokenizer_convert_with_a_smaller_evaluation(inputs, tmp_path):
    """`prism convert MODEL --dataset calib.txt --tokenizer TOK`, asking more held-out samples than the file
    holds: the conversion completes, measured on what there is, and says so; the container carries the
    tokenizer it was calibrated with; the budget floor checked up front is the one the allocation meets."""
    from prism_convert.allocation.bit_plan import PlanInputs
    from prism_convert.compression.workdir import WorkDir

    tokenizer = save_char_tokenizer(tmp_path / "char.json")
    out = tmp_path / "out.prism"
    result = _invoke(["convert", inputs["bare"], "-o", out, "--dataset", inputs["text"], "--tokenizer", tokenizer,
                      "--samples", "8", "--seq-len", "64", "--eval-samples", "20", "--bits", "4.25"])
    assert result.exit_code == 0, (result.output, result.exception)
    quality = json.loads((out / "manifest.json").read_text())["quality"]
    held = quality["samples"]
    assert 0 < held < 20 and quality["tokens"] == held * 63
    note = (f"the held-out split holds {held} samples of 64 tokens, fewer than --eval-samples 20, so the quality "
            f"figure is measured on {held}")
    assert quality["note"] == note and note in " ".join(result.output.split())
    assert quality["heldout"] == f"{inputs['text']}: the last 10% of its token stream (it has 4 documents, fewer than 200)"
    assert "held out: " + quality["heldout"] in " ".join(result.output.split())
    profile = json.loads((tmp_path / ".out.prism.work" / "profile" / "profile.json").read_text())
    assert profile["dataset"]["tokenizer"] == f"--tokenizer {tokenizer}"
    model = prism_load.load(out)
    assert model.tokenizer.to_str() == (tmp_path / ".out.prism.work" / "profile" / "tokenizer.json").read_text()
    floor = preflight.budget_floor(preflight.model_args(inputs["bare"]), preflight.recipe(None, preflight.model_args(inputs["bare"])))
    works = [WorkDir(tmp_path / ".out.prism.work" / "compress")]
    assert floor.bits == pytest.approx(PlanInputs.read(works).lowest_bits(), abs=1e-12)
    assert floor.dense_bytes == PlanInputs.read(works).dense_bytes

