"""Model references in written files: Hub ids as given, local paths relative to the file's folder.

No file dam writes (model card, coefficient metadata, saved configs) holds an absolute path of the machine that
wrote it. A local model folder is written as a path relative to the folder of the file that names it, always
starting with ``./`` or ``../`` so it cannot be mistaken for a Hub id (``org/name``); reading resolves such a
reference against the file's folder again. Anything else (a Hub id) is written and read as given.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from dam.io.lora import split_reference


def _relative(path: Path, folder: Path) -> str:
    rel = Path(os.path.relpath(path.expanduser().absolute(), Path(folder).expanduser().absolute())).as_posix()
    return rel if rel.startswith("../") or rel in (".", "..") else f"./{rel}"


def _lora_parts(text: str) -> tuple[str, str] | None:
    """``(model, adapter)`` when ``text`` has the ``MODEL+ADAPTER`` form (:func:`dam.io.lora.split_reference`),
    else None. Never raises: arbitrary metadata strings (a chat template, a note) may hold a ``+`` too, and are
    left as they are by the callers, which change only parts that are paths."""
    parts = text.split("+")
    if len(parts) != 2 or not all(parts) or "\n" in text:
        return None
    try:
        if Path(text).expanduser().exists():  # a folder whose name holds a "+": a plain path
            return None
    except OSError:  # a name too long to be a path
        return None
    return parts[0], parts[1]


def is_relative_reference(reference: str) -> bool:
    """True for the ``./...`` / ``../...`` form :func:`portable_reference` gives local paths."""
    return reference in (".", "..") or reference.startswith(("./", "../"))


def portable_reference(name_or_path: str | Path, folder: str | Path) -> str:
    """How a model (or any local path) is written in a file inside ``folder``: an existing local path or an
    absolute path relative to ``folder`` (``./x``, ``../x``), else the string as given (a Hub id)."""
    model, adapter = split_reference(name_or_path)
    if adapter is not None:  # MODEL+LORA: each part on its own
        return f"{portable_reference(model, folder)}+{portable_reference(adapter, folder)}"
    path = Path(name_or_path).expanduser()
    if path.is_absolute() or path.exists():
        return _relative(path, Path(folder))
    return str(name_or_path)


def resolve_reference(reference: str, folder: str | Path) -> str:
    """The inverse of :func:`portable_reference` for a file read from ``folder``: ``./x`` and ``../x`` become
    absolute paths, the rest (Hub ids, older files' absolute paths) is returned as given; so is a string with
    several ``+``, which is no model reference (its reader says so)."""
    parts = _lora_parts(reference)
    if parts is not None:
        return f"{resolve_reference(parts[0], folder)}+{resolve_reference(parts[1], folder)}"
    if is_relative_reference(reference):
        return str((Path(folder).expanduser().absolute() / reference).resolve())
    return reference


def portable_paths(data: Any, folder: str | Path) -> Any:
    """``data`` (JSON-like: dicts, lists, strings) with every absolute path string made relative to ``folder``,
    both parts of a ``MODEL+ADAPTER`` reference included."""
    if isinstance(data, dict):
        return {k: portable_paths(v, folder) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [portable_paths(v, folder) for v in data]
    if isinstance(data, str):
        parts = _lora_parts(data)
        if parts is not None and any(os.path.isabs(os.path.expanduser(p)) for p in parts):
            return f"{portable_reference(parts[0], folder)}+{portable_reference(parts[1], folder)}"
        if os.path.isabs(os.path.expanduser(data)):
            return _relative(Path(data), Path(folder))
    return data


def resolve_paths(data: Any, folder: str | Path) -> Any:
    """The inverse of :func:`portable_paths` for data read from a file in ``folder``: every ``./x`` / ``../x``
    string resolved against ``folder``."""
    if isinstance(data, dict):
        return {k: resolve_paths(v, folder) for k, v in data.items()}
    if isinstance(data, list):
        return [resolve_paths(v, folder) for v in data]
    if isinstance(data, str):
        return resolve_reference(data, folder)
    return data


__all__ = ["is_relative_reference", "portable_paths", "portable_reference", "resolve_paths", "resolve_reference"]
