"""Where the demo's configs are (package data) and how their ``data/demo/...`` paths move under another root."""

from __future__ import annotations

from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent / "configs"  # package data: the demo runs from any working directory
# the prefix of the family's paths in the demo configs, replaced by ``root``
_CONFIG_ROOT = ("data", "demo")


def rebase(path: str, root: str | Path) -> str:
    """``path`` with a leading ``data/demo`` (or ``./data/demo``) replaced by ``root``; other paths as given."""
    parts = Path(path).parts
    if parts[: len(_CONFIG_ROOT)] != _CONFIG_ROOT:
        return path
    return str(Path(root).joinpath(*parts[len(_CONFIG_ROOT) :]))
