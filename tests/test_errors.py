"""User errors: one clear message naming the field, tensor, file or shape; exit code 2 from the CLI."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import prism_load
from prism_load.errors import CheckpointError, ConfigError


def copy_checkpoint(src, dst):
    shutil.copytree(src, dst)
    return dst


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "prism_convert.cli", *map(str, args)], capture_output=True, text=True)


def test_unsupported_architecture_names_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ConfigError, match=r"'llama' is not supported \(supported: .*mixtral.*olmoe.*qwen2_moe"):
        prism_load.load(tmp_path)


def test_missing_config_field(tiny_checkpoint, tmp_path):
    folder = copy_checkpoint(tiny_checkpoint("mixtral")[0], tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    del config["hidden_size"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="missing field 'hidden_size'"):
        prism_load.load(folder)


def _shard_of(folder, name):
    return json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"][name]


def test_missing_tensor_names_tensor_and_file(tiny_checkpoint, tmp_path):
    folder = copy_checkpoint(tiny_checkpoint("mixtral")[0], tmp_path / "m")
    name = "model.layers.1.self_attn.k_proj.weight"
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    del index["weight_map"][name]
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"{name} is missing from .*model.safetensors.index.json"):
        prism_load.load(folder)


def test_wrong_shape_names_expected_and_found(tiny_checkpoint, tmp_path):
    folder = copy_checkpoint(tiny_checkpoint("mixtral")[0], tmp_path / "m")
    name = "model.layers.0.block_sparse_moe.experts.2.w2.weight"
    shard = folder / _shard_of(folder, name)
    tensors = load_file(shard)
    tensors[name] = torch.zeros(48, 71)
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"{name} in .*has shape \[48, 71\], expected \[48, 72\]"):
        prism_load.load(folder)


def test_cli_user_error_is_one_line_exit_2(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    result = run_cli("run", tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0
    assert "not supported" in result.stderr


def test_cli_version_and_help():
    assert run_cli("--version").stdout.strip() == f"prism {prism_load.__version__}"
    help_text = run_cli("--help").stdout
    for command in ("profile", "compress", "pack"):
        assert command in help_text


def test_cli_profile_of_a_missing_folder_names_it(tmp_path):
    missing = tmp_path / "no-such-model"
    result = run_cli("profile", missing, "--dataset", "builtin:mix", "-o", tmp_path / "p")
    assert result.returncode == 2
    assert f"{missing}: not a folder" in result.stderr
    assert not (tmp_path / "p").exists()
