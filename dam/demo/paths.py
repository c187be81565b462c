"""The demo families (:data:`FAMILIES`): where each one's configs are (package data) and how their paths move
under another root."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent / "configs"  # package data: the demo runs from any working directory


@dataclass(frozen=True)
class Family:
    """One demo family: its configs (``dam.yaml``, ``merge/``, ``search/`` under ``config_dir``), whose family
    paths start with ``prefix`` (replaced by the root a run is given), the task the base supervises, the
    default root and run folder, and whether ``dam demo run`` runs the classic merges and the evaluation of the
    models that need no DAM run beside DAM's training (``beside_dam``: one core for them, the others for DAM;
    it pays where DAM's small matrices leave a core idle, as on the toy family, where a second thread speeds a DAM
    step by 10% and running beside it saves the merges' and most of the evaluation's time)."""

    name: str
    config_dir: Path
    prefix: tuple[str, ...]
    general: str
    root: str
    out: str
    beside_dam: bool = False

    def rebase(self, path: str, root: str | Path) -> str:
        """``path`` with a leading ``prefix`` (e.g. ``data/demo`` or ``./data/demo``) replaced by ``root``; other
        paths as given."""
        parts = Path(path).parts
        if parts[: len(self.prefix)] != self.prefix:
            return path
        return str(Path(root).joinpath(*parts[len(self.prefix) :]))


TOY = Family("toy", CONFIG_DIR, ("data", "demo"), "generic", "data/demo", "runs/demo", beside_dam=True)
"""The tiny character-level family (:mod:`dam.demo.family`): seconds to minutes on CPU."""
SMOLLM2 = Family("smollm2", CONFIG_DIR / "smollm2", ("data", "smollm2"), "general", "data/smollm2", "runs/smollm2")
"""The real family (:mod:`dam.demo.real`): SmolLM2-135M-Instruct and experts fine-tuned from it."""
FAMILIES = {f.name: f for f in (TOY, SMOLLM2)}


def rebase(path: str, root: str | Path) -> str:
    """The toy family's :meth:`Family.rebase`: a leading ``data/demo`` replaced by ``root``."""
    return TOY.rebase(path, root)
