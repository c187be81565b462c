"""The non-weight files of a Hugging Face model folder: config, tokenizer, generation config, model card."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from dam.io.checkpoint import TOKENIZER_FILES, dtype_name

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


def render_model_card(*, base_models: list[str], tags: list[str], body: str) -> str:
    """A Hugging Face model card (``README.md``) through huggingface_hub's ``ModelCard``: front matter with
    ``base_model`` (the merged models, as written in the output), ``base_model_relation: merge``,
    ``library_name: transformers`` and ``tags``, then the markdown ``body``."""
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(library_name="transformers", base_model=base_models, base_model_relation="merge", tags=tags)
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n{body.lstrip()}"))
