"""The run folder's layout (``output_dir``): file names, and the atomic checkpoints written and found in it.

config.yaml                   the resolved config of the latest (re)start
metrics.jsonl                 every logged record (also sent to wandb when tracking is on)
checkpoints/step_<n>/         accelerator.save_state (coefficients, optimizer, scheduler, RNG states) +
                              trainer_state.json; written as .step_<n>.tmp and renamed, so a kill never
                              leaves a half-written one
checkpoints/latest            name of the newest complete checkpoint
dam_coefficients.safetensors  the trained coefficients (+ .json metadata): ``dam export`` input
merged/                       the folded, ordinary Hugging Face checkpoint
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest"
TRAINER_STATE_FILE = "trainer_state.json"
MERGED_DIR = "merged"
WANDB_ID_FILE = "wandb_run_id"

RESUMABLE_CHANGES = (
    "output_dir",
    "train.max_steps",
    "train.epochs",
    "train.save_every",
    "train.log_every",
    "train.keep_checkpoints",
    "train.resume",
    "train.resume_from",
    "wandb",
    "export",
)
"""Config keys (and sections) a restart may change: the run's length, its save and log cadence, where it resumes
from and writes, tracking, and the export's tokenizer and chat template. Any other difference from the
checkpoint's config refuses the restart, since the resumed run would silently keep the checkpoint's optimizer
state, schedule or data order."""


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        return {k: v for key, sub in value.items() for k, v in _flatten(sub, f"{prefix}{key}.").items()} or {
            prefix[:-1]: {}
        }
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return {k: v for i, sub in enumerate(value) for k, v in _flatten(sub, f"{prefix}{i}.").items()}
    return {prefix[:-1]: value}


def config_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(dotted key, saved value, current value)`` for every config value that differs, outside
    :data:`RESUMABLE_CHANGES`. Lists of mappings (``models``) are compared entry by entry (``models.1.dataset``)."""
    old, new = _flatten(saved), _flatten(current)
    allowed = tuple(RESUMABLE_CHANGES)
    return [
        (key, old.get(key), new.get(key))
        for key in sorted(old.keys() | new.keys())
        if old.get(key) != new.get(key) and not any(key == a or key.startswith(a + ".") for a in allowed)
    ]


def checkpoint_root(run_dir: Path) -> Path:
    return run_dir / CHECKPOINTS_DIR


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """``step_<n>`` folders holding a trainer state (written last), oldest first."""
    root = checkpoint_root(run_dir)
    found = []
    for path in root.glob("step_*") if root.is_dir() else []:
        suffix = path.name.removeprefix("step_")
        if suffix.isdigit() and (path / TRAINER_STATE_FILE).is_file():
            found.append((int(suffix), path))
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run: the ``latest`` pointer, or the highest complete ``step_<n>``."""
    run_dir = Path(run_dir)
    pointer = checkpoint_root(run_dir) / LATEST_FILE
    if pointer.is_file():
        path = checkpoint_root(run_dir) / pointer.read_text().strip()
        if (path / TRAINER_STATE_FILE).is_file():
            return path
    complete = complete_checkpoints(run_dir)
    return complete[-1] if complete else None


def clear_partial_checkpoints(run_dir: Path) -> None:
    """Remove ``.step_<n>.tmp`` folders left by a run killed while saving."""
    root = checkpoint_root(run_dir)
    for tmp in root.glob(".step_*.tmp") if root.is_dir() else []:
        shutil.rmtree(tmp, ignore_errors=True)


def save_checkpoint(accelerator: Any, run_dir: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """``accelerator.save_state`` into a temporary folder, trainer state last, then rename: atomic on one
    filesystem. Updates ``latest`` and keeps the ``keep`` newest checkpoints."""
    root = checkpoint_root(run_dir)
    final = root / f"step_{step}"
    tmp = root / f".step_{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / TRAINER_STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
        if final.exists():  # the same step saved again (a finished run restarted)
            shutil.rmtree(final)
        os.replace(tmp, final)
        pointer = root / f".{LATEST_FILE}.tmp"
        pointer.write_text(final.name + "\n")
        os.replace(pointer, root / LATEST_FILE)
        for old in complete_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final
