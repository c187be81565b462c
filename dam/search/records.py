"""What every search writes as it goes: a JSON line per evaluation, optional wandb logging, the fitness plot."""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from dam.errors import DamError
from dam.io.paths import portable_paths
from dam.search.config import config_dict
from dam.training.config import WandbConfig

logger = logging.getLogger(__name__)

CONFIG_FILE = "search_config.yaml"  # the resolved config a search folder was made with


def _numbers(record: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The numeric entries of a nested record, keys joined with ``/`` (what wandb plots)."""
    out: dict[str, float] = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out.update(_numbers(value, f"{prefix}{key}/"))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out[f"{prefix}{key}"] = value
    return out


class SearchLog:
    """Appends one JSON line per evaluation to ``path`` (when given; flushed, so a killed search keeps what it
    logged) and logs its numbers to wandb when ``wandb`` is set (mode from the config, else ``WANDB_MODE``)."""

    def __init__(self, path: Path | None, wandb: WandbConfig | None, config: dict[str, Any], out: Path, job: str):
        self.path = path
        self.run = None
        if wandb is not None and (wandb.mode or os.environ.get("WANDB_MODE") or "online") != "disabled":
            import wandb as wandb_lib

            self.run = wandb_lib.init(
                project=wandb.project,
                entity=wandb.entity,
                name=wandb.name,
                tags=wandb.tags or None,
                mode=wandb.mode or os.environ.get("WANDB_MODE") or "online",
                config=config,
                dir=str(out),
                job_type=job,
            )

    def log(self, record: dict[str, Any]) -> None:
        if self.path is not None:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        if self.run is not None:
            self.run.log(_numbers(record))

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()


def read_records(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_fitness(scores: Sequence[float], path: Path, title: str, ylabel: str) -> None:
    """Fitness of each evaluation in order (points) and the best so far (line), as a PNG."""
    from matplotlib.figure import Figure

    best, running = [], float("-inf")
    for s in scores:
        running = max(running, s)
        best.append(running)
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.subplots()
    steps = range(1, len(scores) + 1)
    ax.scatter(steps, scores, s=14, color="tab:blue", alpha=0.6, label="candidate")
    ax.plot(steps, best, color="tab:red", label="best so far")
    ax.set_xlabel("evaluation")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=100)


_RESUMABLE_CHANGES = ("budget", "wandb")  # keys a resumed search may change (a larger budget extends it)


def saved_config(config: BaseModel, folder: Path) -> dict[str, Any]:
    """The search config as written in ``folder`` (``search_config.yaml``, ``soup.json``, wandb): absolute paths
    relative to ``folder`` (``./x``, ``../x``), relative ones and Hub ids as given."""
    return portable_paths(config_dict(config), folder)


def _same_search(saved: dict[str, Any], config: dict[str, Any]) -> bool:
    return {k: v for k, v in saved.items() if k not in _RESUMABLE_CHANGES} == {
        k: v for k, v in config.items() if k not in _RESUMABLE_CHANGES
    }


def first_missing(out: Path) -> Path | None:
    """The topmost folder on the way to ``out`` that does not exist yet (``out`` itself or a parent), or None when
    ``out`` exists: what a search that fails before its start was scored removes (:func:`restore_out`)."""
    if out.exists():
        return None
    top = out
    while not top.parent.exists():
        top = top.parent
    return top


def restore_out(out: Path, created: Path | None) -> None:
    """Leave ``out`` as a new search found it: remove ``created`` (the folder it made, :func:`first_missing`), or,
    ``out`` having existed empty (or been emptied by ``--force``), everything in it."""
    if created is not None:
        shutil.rmtree(created, ignore_errors=True)
    elif out.is_dir():
        for child in out.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)


def prepare_out(out: Path, config: BaseModel, force: bool) -> bool:
    """Make ``out`` ready: a fresh folder, or the folder of the same search (resume: True; its budget and wandb
    settings may differ, a larger budget extends it). Another search's folder, or a non-empty folder of something
    else, is refused unless ``force`` (which deletes it). The config is saved as ``search_config.yaml``
    (:func:`saved_config`)."""
    saved = out / CONFIG_FILE
    resume = False
    if out.exists() and not out.is_dir():
        raise DamError(f"output path {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if force:
            logger.info("search: --force: deleting %s", out)
            shutil.rmtree(out)
        elif not saved.is_file():
            raise DamError(f"output folder {out} is not empty and holds no search: use --force to replace it")
        elif not _same_search(yaml.safe_load(saved.read_text()), saved_config(config, out)):
            raise DamError(f"output folder {out} holds a search of another config ({saved} differs): use --force")
        else:
            resume = True
    out.mkdir(parents=True, exist_ok=True)
    # written beside OUT, then moved in: a worker starting at the same time never reads it half-written
    tmp = out.parent / f".{out.name}.{CONFIG_FILE}.{os.getpid()}"
    tmp.write_text(yaml.safe_dump(saved_config(config, out), sort_keys=False))
    tmp.replace(saved)
    return resume
