"""Model configurations: `ModelConfig`, the presets, and Hugging Face config.json import.

Shape letters used throughout moe-jax (one legend for names and comments): see
`moe_jax.config.model`.
"""

from __future__ import annotations

from pathlib import Path

from moe_jax.config.model import ModelConfig
from moe_jax.config.presets import PUBLISHED_PARAMS_B, get_preset, preset_names

__all__ = ["ModelConfig", "PUBLISHED_PARAMS_B", "get_model", "get_preset", "preset_names"]


def get_model(name: str | ModelConfig) -> ModelConfig:
    """Resolve a model argument: a `ModelConfig` as is, a Hugging Face checkpoint directory or
    config.json path through `moe_jax.config.hf`, otherwise a preset name (`get_preset`)."""
    if isinstance(name, ModelConfig):
        return name
    try:
        is_path = Path(name).is_dir() or name.endswith(".json")
    except (OSError, ValueError):
        is_path = False
    if is_path:
        from moe_jax.config.hf import from_hf

        return from_hf(name)
    return get_preset(name)
