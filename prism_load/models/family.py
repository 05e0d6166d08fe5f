"""The family registry: config.json's model_type -> its Family.

Every family file is imported here, explicitly: a family file that fails to import raises (it is broken,
not "unsupported"); a model_type no family declares is "not supported". Family files import the shared
base (prism_load/models/base.py), never this module.
"""

from __future__ import annotations

from ..errors import ConfigError
from .base import Family, ModelArgs  # noqa: F401 - importers name the base types here too
from .deepseek import DeepseekV2, DeepseekV3
from .gpt_oss import GptOss
from .mixtral import Mixtral
from .olmoe import Olmoe
from .qwen_moe import Qwen2Moe, Qwen3Moe

FAMILIES: tuple[type[Family], ...] = (Mixtral, Qwen2Moe, Qwen3Moe, Olmoe, DeepseekV2, DeepseekV3, GptOss)
REGISTRY: dict[str, type[Family]] = {t: cls for cls in FAMILIES for t in cls.model_types}


def supported_model_types() -> list[str]:
    return sorted(REGISTRY)


def family_for(config: dict) -> Family:
    model_type = config.get("model_type")
    if model_type is None:
        raise ConfigError("config.json: missing field 'model_type'")
    try:
        return REGISTRY[model_type]()
    except KeyError:
        raise ConfigError(
            f"config.json: model_type {model_type!r} is not supported "
            f"(supported: {', '.join(supported_model_types())})"
        ) from None
