"""Source compatibility, from ``config.json`` alone: every source must agree with the base before a weight loads."""

from __future__ import annotations

from typing import Any

from dam.errors import DamError
from dam.io.checkpoint import resolve_model_path

# text-config keys that do not change what the model computes: ids the tokenizer and generation use, bookkeeping,
# output switches and the init of new weights. Every other key must be equal in the base and every source, so
# that teacher k (the wrapper with source k selected, built from the base's config) computes what source k does.
NON_FORWARD_KEYS = frozenset(
    {
        "_name_or_path",
        "_model_name_or_path",  # a GGUF's general.name, as transformers' GGUF config reading names it
        "architectures",  # compared on its own, with its own message
        "transformers_version",
        "dtype",
        "torch_dtype",
        "use_cache",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "unk_token_id",  # written by transformers' GGUF config reading
        "sep_token_id",
        "decoder_start_token_id",
        "id2label",
        "label2id",
        "problem_type",
        "finetuning_task",
        "task_specific_params",
        "tokenizer_class",
        "prefix",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        "torchscript",
        "initializer_range",
    }
)


def _rope_type(text: dict[str, Any]) -> str:
    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    return str(rope.get("rope_type", rope.get("type", "default"))) if isinstance(rope, dict) else "default"


def forward_differences(base_text: dict[str, Any], text: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(key, source value, base value)`` for every text-config key whose difference changes the forward.

    ``max_position_embeddings`` passes when both use the default rotary embedding (it only sizes caches there);
    every other key outside :data:`NON_FORWARD_KEYS` must be equal, a key missing on one side included.
    """
    out = []
    for key in sorted(base_text.keys() | text.keys()):
        a, b = text.get(key), base_text.get(key)
        if key in NON_FORWARD_KEYS or a == b:
            continue
        if key == "max_position_embeddings" and _rope_type(text) == _rope_type(base_text) == "default":
            continue
        out.append((key, a, b))
    return out


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
