"""JSON files of a model folder: read with a named error for a damaged one, and the class name a saved or copied
tokenizer declares made one that every supported transformers version resolves."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dam.errors import DamError


def read_json(file: Path, owner: str) -> dict[str, Any]:
    """A JSON file of a model folder, which must hold a mapping; truncated or garbage: DamError naming it."""
    try:
        data = json.loads(file.read_bytes())
    except (OSError, ValueError) as e:  # ValueError: JSONDecodeError and UnicodeDecodeError
        raise DamError(f"{owner}: {file} is not readable JSON ({e})") from None
    if not isinstance(data, dict):
        raise DamError(f"{owner}: {file} holds a {type(data).__name__}, not a mapping")
    return data


PORTABLE_TOKENIZER_CLASS = "PreTrainedTokenizerFast"
"""The class name of a ``tokenizers``-backed tokenizer that every supported transformers resolves: transformers 5
writes ``TokenizersBackend``, which transformers 4 cannot resolve (``ValueError: Tokenizer class TokenizersBackend
does not exist``); ``PreTrainedTokenizerFast`` is that class in 4 and an alias of ``TokenizersBackend`` in 5."""


def make_tokenizer_portable(folder: str | Path) -> None:
    """Rename a ``TokenizersBackend`` tokenizer class in the folder's ``tokenizer_config.json`` to
    :data:`PORTABLE_TOKENIZER_CLASS`, so that an output written under transformers 5 loads under 4 too; every other
    class name (``GPT2Tokenizer``, ``LlamaTokenizerFast``...) and every other key is kept as it is."""
    file = Path(folder) / "tokenizer_config.json"
    if not file.is_file():
        return
    config = read_json(file, "tokenizer")
    if config.get("tokenizer_class") != "TokenizersBackend":
        return
    config["tokenizer_class"] = PORTABLE_TOKENIZER_CLASS
    file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def save_tokenizer(tokenizer: Any, folder: str | Path) -> None:
    """``tokenizer.save_pretrained(folder)``, with the class name made portable (:func:`make_tokenizer_portable`)."""
    tokenizer.save_pretrained(folder)
    make_tokenizer_portable(folder)
