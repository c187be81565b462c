"""The run folder's layout (``output_dir``): file names, and the atomic checkpoints written and found in it.

config.yaml                   the resolved config of the latest (re)start
metrics.jsonl                 every logged record (also sent to wandb when tracking is on)
checkpoints/step_<n>/         accelerator.save_state (coefficients, optimizer, scheduler, RNG states) +
                              trainer_state.json (which also lists every file's size); written as .step_<n>.tmp
                              and renamed, so a kill never leaves a half-written one
checkpoints/latest            name of the newest complete checkpoint
dam_coefficients.safetensors  the trained coefficients (+ .json metadata): ``dam export`` input
merged/                       the folded, ordinary Hugging Face checkpoint

A checkpoint damaged afterwards (a file truncated by a full disk or a copy, overwritten, deleted) is found before
anything loads (:func:`checkpoint_problem`): a resume skips it with a warning naming the file and takes the newest
readable one before it (:func:`resume_checkpoint`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
import zipfile
from pathlib import Path
from typing import Any

from dam.errors import DamError

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
ALIGN_LAYER_PREFIX = "align/layer_"
"""Metrics key prefix of ``loss.align``'s relative distance at each decoder layer (``align/layer_0``, ...)."""
CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest"
TRAINER_STATE_FILE = "trainer_state.json"
MERGED_DIR = "merged"
WANDB_ID_FILE = "wandb_run_id"
FILES_KEY = "files"
"""trainer_state.json's record of the checkpoint's other files and their sizes in bytes."""

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


def _step_folders(run_dir: Path) -> list[tuple[int, Path]]:
    """``(n, checkpoints/step_<n>)`` of every step folder, complete or not, oldest first."""
    root = checkpoint_root(run_dir)
    found = []
    for path in root.glob("step_*") if root.is_dir() else []:
        suffix = path.name.removeprefix("step_")
        if suffix.isdigit() and path.is_dir():
            found.append((int(suffix), path))
    return sorted(found)


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """``step_<n>`` folders holding a trainer state (written last), oldest first."""
    return [p for _, p in _step_folders(run_dir) if (p / TRAINER_STATE_FILE).is_file()]


def read_trainer_state(checkpoint: Path) -> dict[str, Any]:
    """The checkpoint's ``trainer_state.json``: a mapping with an integer ``step``; else DamError naming the file."""
    file = checkpoint / TRAINER_STATE_FILE
    try:
        state = json.loads(file.read_bytes())
    except FileNotFoundError:
        raise DamError(f"{file} is missing") from None
    except (OSError, ValueError) as e:  # ValueError: JSONDecodeError and UnicodeDecodeError
        raise DamError(f"{file} is not readable JSON ({e})") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int) or state["step"] < 0:
        raise DamError(f"{file} holds no step count (not a trainer state written by dam)")
    return state


def _file_problem(file: Path) -> str | None:
    """Why one file of a checkpoint cannot be loaded: a safetensors file shorter than its header says or with a
    broken header (no tensor is read), a ``torch.save`` file (a zip archive) without its central directory
    (truncated), not a zip at all, or with a member failing its CRC (read whole: optimizer and RNG states, whose
    size is the coefficients', not the models')."""
    size = file.stat().st_size
    if file.suffix == ".safetensors":
        with open(file, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if n < 2 or 8 + n > size:
                return f"{file} is not a valid safetensors file (truncated or overwritten)"
            try:
                header = json.loads(f.read(n))
                end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
                return f"{file} is not a valid safetensors file (its header: {e})"
        return None if 8 + n + end == size else f"{file} is truncated ({size} bytes, its header needs {8 + n + end})"
    if file.suffix in (".bin", ".pkl", ".pt"):  # written by torch.save: zip archives
        try:
            with zipfile.ZipFile(file) as archive:
                bad = archive.testzip()
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
            return f"{file} is truncated or not a torch.save file ({e})"
        if bad is not None:
            return f"{file} is corrupt (its part {bad} fails its CRC check)"
    return None


def checkpoint_problem(checkpoint: Path) -> str | None:
    """Why ``checkpoint`` cannot be resumed from, naming the file at fault; None when every file is in place.

    Checked: trainer_state.json (JSON with a step count), the files it lists present with their recorded sizes
    (checkpoints written before the list was kept: no size check), and the structure of every tensor and state
    file (:func:`_file_problem`); no tensor is loaded."""
    try:
        state = read_trainer_state(checkpoint)
    except DamError as e:
        return str(e)
    recorded = state.get(FILES_KEY)
    try:
        if isinstance(recorded, dict):
            for name, size in sorted(recorded.items()):
                file = checkpoint / name
                if not file.is_file():
                    return f"{file} is missing"
                if file.stat().st_size != size:
                    return f"{file} is truncated or overwritten ({file.stat().st_size} bytes, written {size})"
        for file in sorted(checkpoint.rglob("*")):
            problem = _file_problem(file) if file.is_file() else None
            if problem:
                return problem
    except OSError as e:  # unreadable file or folder
        return f"{checkpoint}: cannot read it ({e})"
    return None


def _candidates(run_dir: Path) -> list[Path]:
    """The step folders a resume may use, in the order it tries them: the ``latest`` pointer's target, then the
    folders before it, newest first. Folders after the target belong to no finished save (a kill between the
    rename and the pointer update) or to a branch a ``resume_from`` left behind; without a readable pointer, every
    step folder, newest first."""
    folders = _step_folders(run_dir)
    pointer = checkpoint_root(run_dir) / LATEST_FILE
    try:
        name = pointer.read_text().strip() if pointer.is_file() else ""
    except (OSError, UnicodeDecodeError):
        name = ""
    steps = [n for n, p in folders if p.name == name]
    if steps:
        return [p for n, p in reversed(folders) if n <= steps[0]]
    return [p for _, p in reversed(folders)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest readable checkpoint of a run (the ``latest`` pointer's, or the one before it if that is damaged;
    :func:`checkpoint_problem`), None if there is none. Damaged ones are skipped with a warning."""
    for path in _candidates(Path(run_dir)):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        logger.warning("checkpoint %s skipped: %s", path.name, problem)
    return None


def resume_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint a restart resumes from (:func:`latest_checkpoint`); None for a run folder without step
    folders. Step folders of which none is readable are a DamError naming the newest one's damaged file."""
    run_dir = Path(run_dir)
    found = latest_checkpoint(run_dir)
    candidates = _candidates(run_dir)
    if found is None and candidates:
        older = len(candidates) - 1
        also = f" (and the {older} older {'one' if older == 1 else 'ones'})" if older else ""
        raise DamError(
            f"no readable checkpoint in {checkpoint_root(run_dir)} to resume from: "
            f"{checkpoint_problem(candidates[0])}{also}; move the checkpoints folder away to start the run over"
        )
    return found


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
        files = {f.relative_to(tmp).as_posix(): f.stat().st_size for f in sorted(tmp.rglob("*")) if f.is_file()}
        state = {**state, FILES_KEY: files}  # what a resume checks before it loads anything (checkpoint_problem)
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
