"""Recipes are data, validated on load: unknown keys and bad values give clear errors."""

import pytest

from prism_convert.recipe import Recipe, builtin_recipes, load_recipe
from prism_load.errors import RecipeError


def test_every_builtin_recipe_loads_and_offers_candidates():
    names = builtin_recipes()
    assert {"default", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss"} <= set(names)
    for name in names:
        recipe = load_recipe(name)
        menu = recipe.expert_candidates((512, 256), "layers.0.experts.0.gate_proj")
        assert menu and all(recipe.limits.min_bits <= e.bits_per_weight <= recipe.limits.max_bits for e in menu)


def test_bench_recipes_load_and_say_what_they_store():
    """bench/recipes/*.toml (bench_peer's uniform conversions): each loads, offers int4/g128 alone, and stores
    its dense classes as its comment says."""
    from pathlib import Path

    folder = Path(__file__).resolve().parent.parent / "bench" / "recipes"
    stores = {"uniform_int4_g128": ("int8", "bf16"), "uniform_int4_g128_dense4": ("int4", "int8"),
              "uniform_int4_g128_head8": ("int8", "int8")}
    assert {p.stem for p in folder.glob("*.toml")} == set(stores)
    for stem, (attention, head) in stores.items():
        recipe = load_recipe(folder / f"{stem}.toml")
        menu = recipe.expert_candidates((512, 256), "layers.0.experts.0.gate_proj")
        assert [(e.kind, e.bits, e.group_size) for e in menu] == [("int", 4, 128)]
        assert (recipe.dense.attention, recipe.dense.lm_head, recipe.dense.embedding) == (attention, head, "bf16")
        enc = recipe.dense_encoding("attention", (1024, 1024), "layers.0.self_attn.q_proj.weight")
        assert (enc.kind, enc.bits, enc.group_size) == ("int", int(attention[3:]), 128)


def test_family_recipe_chosen_by_model_type():
    assert load_recipe(None, "qwen3_moe").name == "qwen3_moe"
    assert load_recipe(None, "unknown_family").name == "default"


def test_unknown_key_is_named(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text("[quantization]\ngroup_sise = 64\n")
    with pytest.raises(RecipeError, match=r"\[quantization\]: unknown key\(s\) \['group_sise'\]"):
        load_recipe(path)
    path.write_text("colour = 'red'\n")
    with pytest.raises(RecipeError, match=r"unknown key\(s\) \['colour'\]"):
        load_recipe(path)


@pytest.mark.parametrize("body, message", [
    ("[candidates]\nint_bits = [7]", "candidates.int_bits = 7 is invalid"),
    ("[quantization]\ngroup_size = 100", "quantization.group_size = 100 is invalid"),
    ("[dense]\nattention = 'int3'", "dense.attention = 'int3' is invalid"),
    ("[quantization]\ngptq = 'yes'", "gptq = 'yes' should be bool"),
    ("[limits]\nmin_bits = 5.0\nmax_bits = 4.0", "limits = '5.0..4.0' is invalid"),
    ("[candidates]\nint_lowrank = [[3, 2.0]]", "candidates.int_lowrank"),
    ("quantization = 3", r"\[quantization\]: expected a table"),
])
def test_bad_values(tmp_path, body, message):
    path = tmp_path / "r.toml"
    path.write_text(body + "\n")
    with pytest.raises(RecipeError, match=message):
        load_recipe(path)


def test_unparseable_and_missing(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text("[quantization\n")
    with pytest.raises(RecipeError, match="not valid TOML"):
        load_recipe(path)
    with pytest.raises(RecipeError, match="neither a file nor a built-in recipe"):
        load_recipe("no-such-recipe")


def test_limits_filter_the_menu_and_keep_exact():
    recipe = Recipe.from_dict({"limits": {"min_bits": 3.0, "max_bits": 4.5}, "dense": {"keep_exact": ["layers.0.*"]}})
    menu = recipe.expert_candidates((64, 256), "layers.1.experts.3.down_proj")
    assert {e.label() for e in menu} == {"int3/g128", "int4/g128"}
    assert [e.kind for e in recipe.expert_candidates((64, 256), "layers.0.experts.3.down_proj")] == ["bf16"]
    with pytest.raises(RecipeError, match="no candidate"):
        Recipe.from_dict({"limits": {"min_bits": 8.8, "max_bits": 8.9}}).expert_candidates((64, 256), "t")


def test_recipes_merge_over_the_default(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text("[quantization]\ngroup_size = 64\n")
    recipe = load_recipe(path)
    default = load_recipe("default")
    assert recipe.quantization.group_size == 64
    assert recipe.quantization.gptq == default.quantization.gptq
    assert recipe.candidates.group_sizes == default.candidates.group_sizes == [64, 128, 256]
    assert load_recipe("mixtral").dense.attention == "int8" and load_recipe("mixtral").dense.router == "fp32"


def test_builtin_recipes_are_found_whatever_the_working_directory(tmp_path):
    """A `recipes/` folder in the working directory shadowed the built-in ones under `python -c` (found running a
    benchmark from bench/, which has its own recipes/): they are now found beside the package."""
    import subprocess
    import sys

    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "mine.toml").write_text("")
    out = subprocess.run([sys.executable, "-c", "from prism_convert.recipe import builtin_recipes; "
                          "print(sorted(builtin_recipes()))"], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert "'default'" in out.stdout and "'mixtral'" in out.stdout and "mine" not in out.stdout
