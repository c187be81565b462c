"""The ``chat_template:`` key of a merge config, as mergekit 0.1.5 resolves it, read from files alone.

- ``auto``: the most common chat template among the merged models (each stripped of surrounding whitespace);
  a tie goes to the model listed first (base first). mergekit breaks ties in set order, which is arbitrary.
  No model with a template: none is set.
- a built-in name (``alpaca``, ``chatml``, ``exaone``, ``llama3``, ``mistral``): mergekit's own template file,
  read from the installed mergekit package (dam ships no copies of them).
- otherwise a Jinja template string; mergekit refuses one shorter than 20 characters or without ``{``.

The template is written as the output's ``chat_template.jinja`` (what transformers reads first); a
``chat_template`` in the copied ``tokenizer_config.json`` and a ``chat_template.json`` are removed, so the output
has one template.
"""

from __future__ import annotations

import importlib.resources
import json
from collections import Counter
from pathlib import Path
from typing import Any

from dam.errors import DamError

BUILTIN_TEMPLATES = ("alpaca", "chatml", "exaone", "llama3", "mistral")


def _read_text(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8")
    except OSError as e:
        raise DamError(f"chat_template: cannot read {file} ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise DamError(f"chat_template: {file} is not a text (UTF-8) file (byte {e.start})") from None


def _read_json(file: Path) -> dict[str, Any]:
    """A tokenizer JSON file's mapping; a truncated or garbage file is a DamError naming it."""
    try:
        data = json.loads(_read_text(file))
    except ValueError as e:
        raise DamError(f"chat_template: {file} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise DamError(f"chat_template: {file} holds a {type(data).__name__}, not a mapping")
    return data


def model_chat_template(folder: Path) -> str | None:
    """A model folder's chat template: ``chat_template.jinja``, else ``chat_template.json``, else the
    ``chat_template`` of ``tokenizer_config.json`` (a list of named templates gives its ``default``)."""
    if (folder / "chat_template.jinja").is_file():
        return _read_text(folder / "chat_template.jinja")
    for name in ("chat_template.json", "tokenizer_config.json"):
        if (folder / name).is_file():
            template = _read_json(folder / name).get("chat_template")
            if isinstance(template, list):
                named = [t for t in template if isinstance(t, dict)]
                template = {t.get("name"): t.get("template") for t in named}.get("default")
            if template and not isinstance(template, str):
                raise DamError(f"chat_template: {folder / name} has a chat_template that is not text")
            if template:
                return template
    return None


def _builtin(name: str) -> str:
    try:
        files = importlib.resources.files("mergekit._data.chat_templates")
    except ModuleNotFoundError:
        raise DamError(
            f"chat_template: {name!r} is one of mergekit's built-in templates, read from the mergekit package, which "
            "is not installed (pip install mergekit==0.1.5), or give the template text"
        ) from None
    return files.joinpath(f"{name}.jinja").read_text(encoding="utf-8")


def resolve_chat_template(setting: str | None, folders: list[Path]) -> str | None:
    """The template ``setting`` asks for; ``folders`` are the merged models' folders, in config order."""
    if not setting:
        return None
    if setting == "auto":
        templates = [t.strip() for t in map(model_chat_template, folders) if t]
        return Counter(templates).most_common(1)[0][0] if templates else None
    if setting in BUILTIN_TEMPLATES:
        return _builtin(setting)
    if len(setting) < 20 or "{" not in setting:
        raise DamError(
            f"chat_template: {setting!r} is neither 'auto', a built-in template ({', '.join(BUILTIN_TEMPLATES)}) "
            "nor a Jinja template"
        )
    return setting


def write_chat_template(folder: Path, template: str) -> None:
    """Make ``template`` the chat template of the tokenizer files in ``folder``."""
    (folder / "chat_template.jinja").write_text(template, encoding="utf-8")
    (folder / "chat_template.json").unlink(missing_ok=True)
    config_file = folder / "tokenizer_config.json"
    if config_file.is_file():
        config = _read_json(config_file)
        if config.pop("chat_template", None) is not None:
            config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


__all__ = ["BUILTIN_TEMPLATES", "model_chat_template", "resolve_chat_template", "write_chat_template"]
