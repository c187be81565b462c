"""The non-weight files of a Hugging Face model folder: config, tokenizer, generation config, model card."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from dam.io.checkpoint import TOKENIZER_FILES, dtype_name
from dam.io.json_files import make_tokenizer_portable, read_json

logger = logging.getLogger(__name__)


def write_model_files(
    folder: str | Path,
    config: dict[str, Any],
    *,
    dtype: torch.dtype | None = None,
    tokenizer_source: str | Path | None = None,
    generation_config_source: str | Path | None = None,
) -> None:
    """Write ``config.json`` (dtype updated) and copy the tokenizer and generation config beside the weights."""
    folder = Path(folder)
    config = dict(config)
    if dtype is not None:
        keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["dtype"]
        for key in keys:
            config[key] = dtype_name(dtype)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if generation_config_source is not None:
        src = Path(generation_config_source) / "generation_config.json"
        if src.exists():
            shutil.copy2(src, folder / src.name)
    if tokenizer_source is not None:
        copied = [f for f in TOKENIZER_FILES if (Path(tokenizer_source) / f).exists()]
        for name in copied:
            shutil.copy2(Path(tokenizer_source) / name, folder / name)
        if not copied:
            logger.warning("no tokenizer files found in %s; the output has no tokenizer", tokenizer_source)
        make_tokenizer_portable(folder)


def check_model_files(folder: Path, owner: str) -> None:
    """The JSON files an export or a merge reads or copies from a model folder (config, generation config,
    tokenizer and chat-template files) each hold a mapping; a damaged one is a DamError naming it, before anything
    is written."""
    for name in ("config.json", "generation_config.json", *TOKENIZER_FILES):
        if name.endswith(".json") and (folder / name).is_file():
            read_json(folder / name, owner)


def render_model_card(*, base_models: list[str], tags: list[str], body: str) -> str:
    """A Hugging Face model card (``README.md``) through huggingface_hub's ``ModelCard``: front matter with
    ``base_model`` (the merged models, as written in the output), ``base_model_relation: merge``,
    ``library_name: transformers`` and ``tags``, then the markdown ``body``."""
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(library_name="transformers", base_model=base_models, base_model_relation="merge", tags=tags)
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n{body.lstrip()}"))


def eos_token_ids(folder: str | Path) -> list[int]:
    """A model folder's end-of-sequence ids: ``generation_config.json``'s ``eos_token_id`` (an int or a list, e.g.
    EOS and an end-of-turn token), else ``config.json``'s; empty when neither names one."""
    for name in ("generation_config.json", "config.json"):
        file = Path(folder) / name
        value = json.loads(file.read_text()).get("eos_token_id") if file.is_file() else None
        if value is not None:
            return [int(v) for v in value] if isinstance(value, list) else [int(value)]
    return []


def set_generation_eos(folder: str | Path, eos_ids: list[int]) -> None:
    """Write ``eos_token_id`` (an int for one id, else the list) into the folder's ``generation_config.json``,
    creating a minimal one when the folder has none."""
    file = Path(folder) / "generation_config.json"
    config = json.loads(file.read_text()) if file.is_file() else {}
    config["eos_token_id"] = eos_ids[0] if len(eos_ids) == 1 else eos_ids
    file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def set_chat_template(folder: str | Path, template: str) -> None:
    """Make ``template`` the folder's chat template: stored under ``chat_template`` in ``tokenizer_config.json``
    (read by every transformers version), and the separate ``chat_template.jinja``/``.json`` files removed, since
    newer transformers versions prefer those."""
    folder = Path(folder)
    for name in ("chat_template.jinja", "chat_template.json"):
        (folder / name).unlink(missing_ok=True)
    file = folder / "tokenizer_config.json"
    config = json.loads(file.read_text()) if file.is_file() else {}
    config["chat_template"] = template
    file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
