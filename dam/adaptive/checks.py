"""Source compatibility, from ``config.json`` alone: every source must agree with the base before a weight loads."""

from __future__ import annotations

from typing import Any

from dam.errors import DamError
from dam.io.checkpoint import resolve_model_path

# config attributes that must agree between the base and every source (when the architecture has them)
_ARCH_KEYS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "tie_word_embeddings",
)


def load_source_config(name: str, role: str) -> Any:
    from transformers import AutoConfig

    path = resolve_model_path(name)
    if not (path / "config.json").is_file():
        raise DamError(f"{role} {name!r}: no config.json in {path}")
    try:
        return AutoConfig.from_pretrained(path)
    except (ValueError, OSError, KeyError) as e:
        raise DamError(f"{role} {name!r}: cannot read config.json: {e}") from e


def check_configs(base_model: str, base_config: Any, sources: list[str], source_configs: list[Any]) -> None:
    """Architecture, vocab size and shape-defining config values must agree with the base (config.json only)."""
    base_text = base_config.get_text_config()
    for name, cfg in zip(sources, source_configs, strict=True):
        if (cfg.architectures or []) != (base_config.architectures or []):
            raise DamError(
                f"source {name!r} has architecture {cfg.architectures} but base {base_model!r} has "
                f"{base_config.architectures}"
            )
        text = cfg.get_text_config()
        for key in _ARCH_KEYS:
            a, b = getattr(text, key, None), getattr(base_text, key, None)
            if a != b:
                what = "vocab size" if key == "vocab_size" else key
                raise DamError(f"source {name!r} has {what} {a} but base {base_model!r} has {b}")
