"""Source compatibility, from ``config.json`` alone: every source must agree with the base before a weight loads."""

from __future__ import annotations

from typing import Any

from dam.errors import DamError
from dam.io.checkpoint import resolve_model_path
from dam.io.forward_config import forward_differences


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
    """Every source's text config must equal the base's in every key that changes the forward (config.json only).

    The wrapper runs every teacher under the base's config, so a source that differs in, say, ``rope_theta`` or
    ``rms_norm_eps`` would be distilled from a model it is not. Refused with the field, the source and both values.
    """
    base_text = base_config.get_text_config().to_dict()
    for name, cfg in zip(sources, source_configs, strict=True):
        if (cfg.architectures or []) != (base_config.architectures or []):
            raise DamError(
                f"source {name!r} has architecture {cfg.architectures} but base {base_model!r} has "
                f"{base_config.architectures}"
            )
        differences = forward_differences(base_text, cfg.get_text_config().to_dict())
        if differences:
            key, a, b = differences[0]
            what = "vocab size" if key == "vocab_size" else key
            more = (
                f" (and {len(differences) - 1} more: {', '.join(d[0] for d in differences[1:])})"
                if differences[1:]
                else ""
            )
            raise DamError(
                f"source {name!r} has {what} {a!r} but base {base_model!r} has {b!r}{more}: the teacher would run "
                "under the base's config, not the source's, so DAM cannot merge it"
            )
