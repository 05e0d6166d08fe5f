"""Conversion recipes: declarative TOML, validated on load (unknown keys rejected, values range-checked).

A recipe says which candidate encodings the allocator may choose for routed-expert tensors, how dense
tensors (attention, routers, shared experts, embeddings, norms) are stored, the importance prior for rarely
routed experts, and the hot/cold tier rule. See recipes/default.toml for every key with its meaning.
"""

from __future__ import annotations

import fnmatch
import importlib.resources
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from prism_load.container.format import INT_BITS, Encoding
from prism_load.errors import RecipeError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

DENSE_CLASSES = ("attention", "shared_expert", "dense_mlp", "router", "embedding", "lm_head", "norm")
DENSE_FORMATS = ("bf16", "fp16", "fp32", "int8", "int6", "int5", "int4")


@dataclass
class Quantization:
    group_size: int = 128
    gptq: bool = True
    damp: float = 0.01
    max_tokens_per_expert: int = 4096


@dataclass
class Candidates:
    int_bits: list[int] = field(default_factory=lambda: [2, 3, 4, 5, 6, 8])
    group_sizes: list[int] = field(default_factory=list)  # int candidates at each; [] = quantization.group_size
    lowrank_ranks: list[float] = field(default_factory=list)
    int_lowrank: list[list[float]] = field(default_factory=list)
    factor_bits: int = 8


@dataclass
class Limits:
    min_bits: float = 2.0
    max_bits: float = 9.0


@dataclass
class Importance:
    prior_tokens: float = 16.0
    frequency_floor: float = 0.25


@dataclass
class Dense:
    attention: str = "bf16"
    shared_expert: str = "bf16"
    dense_mlp: str = "bf16"
    router: str = "fp32"
    embedding: str = "bf16"
    lm_head: str = "bf16"
    norm: str = "fp32"
    keep_exact: list[str] = field(default_factory=list)


@dataclass
class Tiers:
    hot_share: float = 0.25
    hot_min_frequency: float = 0.0


SECTIONS = {
    "quantization": Quantization,
    "candidates": Candidates,
    "limits": Limits,
    "importance": Importance,
    "dense": Dense,
    "tiers": Tiers,
}


@dataclass
class Recipe:
    name: str = "default"
    description: str = ""
    quantization: Quantization = field(default_factory=Quantization)
    candidates: Candidates = field(default_factory=Candidates)
    limits: Limits = field(default_factory=Limits)
    importance: Importance = field(default_factory=Importance)
    dense: Dense = field(default_factory=Dense)
    tiers: Tiers = field(default_factory=Tiers)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str = "recipe") -> Recipe:
        if not isinstance(data, dict):
            raise RecipeError(f"{source}: expected a table")
        unknown = sorted(set(data) - {"name", "description", *SECTIONS})
        if unknown:
            raise RecipeError(f"{source}: unknown key(s) {unknown} (known: name, description, {', '.join(SECTIONS)})")
        kwargs = {k: data[k] for k in ("name", "description") if k in data}
        for section, klass in SECTIONS.items():
            kwargs[section] = _section(klass, data.get(section, {}), f"{source} [{section}]")
        recipe = cls(**kwargs)
        recipe.validate(source)
        return recipe

    def validate(self, source: str = "recipe") -> None:
        q, c, lim, imp, t = self.quantization, self.candidates, self.limits, self.importance, self.tiers
        _check(q.group_size > 0 and q.group_size % 8 == 0, source, "quantization.group_size", q.group_size, "a positive multiple of 8")
        _check(0 <= q.damp < 1, source, "quantization.damp", q.damp, "in [0, 1)")
        _check(q.max_tokens_per_expert >= 16, source, "quantization.max_tokens_per_expert", q.max_tokens_per_expert, ">= 16")
        for b in c.int_bits:
            _check(b in INT_BITS, source, "candidates.int_bits", b, f"one of {list(INT_BITS)}")
        for gs in c.group_sizes:
            _check(isinstance(gs, int) and gs > 0 and gs % 8 == 0, source, "candidates.group_sizes", gs, "positive multiples of 8")
        for r in c.lowrank_ranks:
            _check(0 < r <= 1, source, "candidates.lowrank_ranks", r, "a fraction of full rank in (0, 1]")
        for pair in c.int_lowrank:
            ok = isinstance(pair, list) and len(pair) == 2 and pair[0] in INT_BITS and 0 < pair[1] <= 1
            _check(ok, source, "candidates.int_lowrank", pair, "[bits, rank fraction] pairs")
        _check(c.factor_bits in (16, *INT_BITS), source, "candidates.factor_bits", c.factor_bits, f"16 or one of {list(INT_BITS)}")
        _check(bool(c.int_bits or c.lowrank_ranks or c.int_lowrank), source, "candidates", "empty", "at least one candidate")
        _check(0 < lim.min_bits <= lim.max_bits, source, "limits", f"{lim.min_bits}..{lim.max_bits}", "0 < min_bits <= max_bits")
        _check(imp.prior_tokens >= 0, source, "importance.prior_tokens", imp.prior_tokens, ">= 0")
        _check(0 <= imp.frequency_floor <= 1, source, "importance.frequency_floor", imp.frequency_floor, "in [0, 1]")
        for cls_name in DENSE_CLASSES:
            value = getattr(self.dense, cls_name)
            _check(value in DENSE_FORMATS, source, f"dense.{cls_name}", value, f"one of {list(DENSE_FORMATS)}")
        _check(0 <= t.hot_share <= 1, source, "tiers.hot_share", t.hot_share, "in [0, 1]")

    # -- what the recipe means for one tensor ---------------------------------------------------------
    def expert_candidates(self, shape: tuple[int, int], name: str) -> list[Encoding]:
        """The menu for one routed-expert tensor (within the bits limits), or bf16 alone if kept exact."""
        if self.is_kept_exact(name):
            return [Encoding("bf16", shape)]
        g = self.quantization.group_size
        full = min(shape)
        groups = self.candidates.group_sizes or [g]
        menu = [Encoding("int", shape, bits=b, group_size=gs) for gs in groups for b in self.candidates.int_bits]
        fb = self.candidates.factor_bits
        for frac in self.candidates.lowrank_ranks:
            menu.append(Encoding("lowrank", shape, rank=max(1, round(frac * full)), factor_bits=fb, group_size=g))
        for bits, frac in self.candidates.int_lowrank:
            rank = max(1, round(frac * full))
            menu.append(Encoding("int+lowrank", shape, bits=int(bits), group_size=g, rank=rank, factor_bits=fb))
        lim = self.limits
        inside = [e for e in menu if lim.min_bits <= e.bits_per_weight <= lim.max_bits]
        if not inside:
            raise RecipeError(
                f"recipe {self.name!r}: no candidate for {name} {list(shape)} lies within "
                f"{lim.min_bits}..{lim.max_bits} bits per weight"
            )
        return inside

    def is_kept_exact(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.dense.keep_exact)

    def dense_encoding(self, tensor_class: str, shape: tuple[int, ...], name: str) -> Encoding:
        fmt = "bf16" if self.is_kept_exact(name) and tensor_class != "norm" else getattr(self.dense, tensor_class)
        if fmt.startswith("int") and len(shape) == 2:
            return Encoding("int", shape, bits=int(fmt[3:]), group_size=self.quantization.group_size)
        if fmt.startswith("int"):  # 1-D tensors (biases, norms) are never quantized
            fmt = "bf16"
        return Encoding(fmt, shape)


def _section(klass, data, where: str):
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: expected a table")
    known = {f.name: f for f in fields(klass)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise RecipeError(f"{where}: unknown key(s) {unknown} (known: {', '.join(known)})")
    defaults = klass()
    for key, value in data.items():
        expected = type(getattr(defaults, key))
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            raise RecipeError(f"{where}: {key} = {value!r} should be {expected.__name__}")
        data = {**data, key: value}
    return klass(**data)


def _check(ok: bool, source: str, key: str, value, expected: str) -> None:
    if not ok:
        raise RecipeError(f"{source}: {key} = {value!r} is invalid (expected {expected})")


def builtin_recipes() -> dict[str, Path]:
    """recipes/*.toml beside prism_convert (the repository, or site-packages for a wheel): found by location,
    not by importing a package named `recipes`, which any `recipes/` folder in the working directory shadows
    under `python -m` / `python -c` (bench/recipes did)."""
    folder = Path(__file__).resolve().parent.parent / "recipes"
    if not (folder / "default.toml").is_file():
        folder = importlib.resources.files("recipes")
    return {Path(str(p)).stem: Path(str(p)) for p in folder.iterdir() if str(p).endswith(".toml")}


def load_recipe(spec: str | Path | None = None, model_type: str | None = None) -> Recipe:
    """A recipe file path, a built-in recipe name, or (None) the family's recipe, else `default`.
    Every recipe is read as changes to recipes/default.toml (its tables merge key by key)."""
    builtin = builtin_recipes()
    if spec is None:
        spec = model_type if model_type in builtin else "default"
    path = Path(spec)
    if not path.is_file():
        if str(spec) not in builtin:
            raise RecipeError(f"recipe {str(spec)!r} is neither a file nor a built-in recipe ({', '.join(sorted(builtin))})")
        path = builtin[str(spec)]
    data = _read_toml(path)
    if path.resolve() != builtin["default"].resolve():
        data = _merge(_read_toml(builtin["default"]), data)  # every recipe states only how it differs
    return Recipe.from_dict(data, source=str(path))


def _read_toml(path: Path) -> dict:
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"{path}: not valid TOML ({e})") from None


def _merge(base: dict, over: dict) -> dict:
    """Tables merge key by key; any other value in `over` replaces the base's."""
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return out
