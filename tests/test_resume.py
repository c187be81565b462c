"""Checkpoints and resumption: 2 steps + resume + 2 steps equals 4 straight; a process killed mid-run (SIGKILL)
and restarted ends with the coefficients of an uninterrupted run; damaged checkpoints skipped; resume refusals."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_run import ROOT, TINY, tiny_config, tiny_overrides

from dam.adaptive.model import DAMModel
from dam.errors import DamError
from dam.testing import make_family
from dam.training.loop import train
from dam.training.run_dir import checkpoint_problem, latest_checkpoint


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    return make_family(tmp_path_factory.mktemp("family"), 3)


def coefficients(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "dam_coefficients.safetensors")


def assert_same_coefficients(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Equal to 1e-6: both runs are in this process (same threads, dtype), and a resumed run replays the exact
    batches and optimizer state, so they differ only by float rounding (measured 0.0 on a 2-core machine)."""
    assert a.keys() == b.keys()
    # moved away from the init: columns start at 1/3, row_column's row scales at 1
    moved = max(float(torch.minimum((t - 1 / 3).abs(), (t - 1).abs()).max()) for t in a.values())
    assert moved > 1e-3, "the run did not train"
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6, rtol=0), name


@pytest.mark.parametrize("granularity", ["column", "row_column"])
def test_two_steps_resume_two_steps_equals_four(
    family: tuple[Path, list[Path]], tmp_path: Path, granularity: str
) -> None:
    # an epoch is 12 steps of 4 sequences: 3 + 3 stops mid-epoch, so the resumed run must skip consumed batches
    common = ("train.save_every=3", "train.schedule=constant", f"dam.granularity={granularity}")
    straight = train(tiny_config(*family, tmp_path / "straight", "train.max_steps=6", *common))
    split = tmp_path / "split"
    train(tiny_config(*family, split, "train.max_steps=3", *common))
    assert latest_checkpoint(split) == split / "checkpoints" / "step_3"
    train(tiny_config(*family, split, "train.max_steps=6", *common))  # resume: auto
    assert_same_coefficients(coefficients(straight), coefficients(split))
    lines = (split / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 6  # steps 1-3, then 4-6 appended


def test_resume_across_an_epoch_boundary(family: tuple[Path, list[Path]], tmp_path: Path) -> None:
    # 3 x 4 sequences / batch 4 = 3 steps per epoch: resuming at step 4 lands in epoch 1 (reshuffled), one batch in
    common = ("data.num_examples=4", "train.schedule=constant", "train.save_every=4")
    straight = train(tiny_config(*family, tmp_path / "straight", *common, "train.max_steps=7"))
    split = tmp_path / "split"
    train(tiny_config(*family, split, *common, "train.max_steps=4"))
    checkpoint = split / "checkpoints" / "step_4"
    train(tiny_config(*family, split, *common, "train.max_steps=7", f"train.resume_from={checkpoint}"))
    assert_same_coefficients(coefficients(straight), coefficients(split))


def test_partial_checkpoints_are_ignored_and_cleared(family: tuple[Path, list[Path]], tmp_path: Path) -> None:
    out = tmp_path / "run"
    train(tiny_config(*family, out, "train.max_steps=2", "train.save_every=1"))
    root = out / "checkpoints"
    (root / ".step_3.tmp").mkdir()  # a save interrupted before its rename
    (root / ".step_3.tmp" / "optimizer.bin").write_bytes(b"partial")
    (root / "step_5").mkdir()  # no trainer_state.json: not a complete checkpoint
    (root / "latest").write_text("step_9\n")  # a pointer to a checkpoint that is gone
    assert latest_checkpoint(out) == root / "step_2"
    train(tiny_config(*family, out, "train.max_steps=3", "train.save_every=1"))
    assert not (root / ".step_3.tmp").exists()
    assert latest_checkpoint(out) == root / "step_3"


def _truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def _garbage(file: Path) -> None:
    """The same number of bytes, none of them the format's: a size check alone would not see it."""
    file.write_bytes(bytes(range(7, 256)) * (file.stat().st_size // 249) + b"x" * (file.stat().st_size % 249))


def _flip_middle(file: Path) -> None:
    """Bytes inverted inside the file, its structure (zip directory at the end) intact: the CRC check sees it."""
    data = bytearray(file.read_bytes())
    for i in range(len(data) // 4, len(data) // 4 + 16):
        data[i] ^= 0xFF
    file.write_bytes(bytes(data))


DAMAGES = {
    "truncated coefficients": ("step_2/model.safetensors", _truncate),
    "garbage coefficients": ("step_2/model.safetensors", _garbage),
    "truncated optimizer state": ("step_2/optimizer.bin", _truncate),
    "garbage optimizer state": ("step_2/optimizer.bin", _garbage),
    "flipped scheduler state": ("step_2/scheduler.bin", _flip_middle),
    "missing RNG state": ("step_2/random_states_0.pkl", Path.unlink),
    "truncated trainer state": ("step_2/trainer_state.json", _truncate),
    "garbage trainer state": ("step_2/trainer_state.json", _garbage),
    "missing trainer state": ("step_2/trainer_state.json", Path.unlink),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_checkpoint_is_skipped_for_the_one_before(
    family: tuple[Path, list[Path]], tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    """The newest checkpoint damaged after it was written (a full disk, a bad copy, a deleted file): the restart
    warns naming the file and resumes from step 1, exactly (the coefficients of a straight 3-step run)."""
    common = ("train.save_every=1", "train.schedule=constant")
    out = tmp_path / "run"
    train(tiny_config(*family, out, "train.max_steps=2", *common))
    name, spoil = DAMAGES[damage]
    spoil(out / "checkpoints" / name)
    with caplog.at_level(logging.WARNING, logger="dam.training.run_dir"):
        train(tiny_config(*family, out, "train.max_steps=3", *common))
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert skipped and skipped[0].startswith(f"checkpoint step_2 skipped: {out / 'checkpoints' / name}"), skipped
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 2, 3]  # resumed at step 1: step 2 done again
    latest = latest_checkpoint(out)
    assert latest == out / "checkpoints" / "step_3" and checkpoint_problem(latest) is None
    straight = train(tiny_config(*family, tmp_path / "straight", "train.max_steps=3", *common))
    assert_same_coefficients(coefficients(straight), coefficients(out))


def test_a_garbage_latest_pointer_falls_back_to_the_newest_step(family: tuple[Path, list[Path]], tmp_path) -> None:
    out = tmp_path / "run"
    train(tiny_config(*family, out, "train.max_steps=2", "train.save_every=1"))
    (out / "checkpoints" / "latest").write_bytes(b"\xff\xfe\x00garbage")
    assert latest_checkpoint(out) == out / "checkpoints" / "step_2"


def test_no_readable_checkpoint_left_is_one_error(family: tuple[Path, list[Path]], tmp_path: Path) -> None:
    """Every checkpoint damaged: no silent restart from scratch over them, one DamError naming the newest's file;
    a resume_from naming a damaged checkpoint likewise."""
    out = tmp_path / "run"
    train(tiny_config(*family, out, "train.max_steps=2", "train.save_every=1"))
    _truncate(out / "checkpoints" / "step_2" / "optimizer.bin")
    (out / "checkpoints" / "step_1" / "trainer_state.json").write_text('{"step": 1, "conf')
    with pytest.raises(
        DamError, match="no readable checkpoint in .*step_2/optimizer.bin is truncated .*the 1 older one"
    ):
        train(tiny_config(*family, out, "train.max_steps=3", "train.save_every=1"))
    resume_from = f"train.resume_from={out / 'checkpoints' / 'step_1'}"
    with pytest.raises(DamError, match="train.resume_from: .*step_1/trainer_state.json is not readable JSON"):
        train(tiny_config(*family, tmp_path / "other", "train.max_steps=3", resume_from))


def test_resume_never_refuses_a_folder_with_checkpoints(family: tuple[Path, list[Path]], tmp_path: Path) -> None:
    out = tmp_path / "run"
    train(tiny_config(*family, out, "train.max_steps=1"))
    with pytest.raises(DamError, match="train.resume is 'never' but .* already holds checkpoints"):
        train(tiny_config(*family, out, "train.max_steps=2", "train.resume=never"))


@pytest.fixture(scope="module")
def one_step_run(family: tuple[Path, list[Path]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("one_step") / "run"
    train(tiny_config(*family, out, "train.max_steps=1"))
    return out


@pytest.mark.parametrize(
    ("change", "shown"),
    [
        ("dam.targets=[linear]", "'dam.targets' is \\['linear'\\] but \\['linear', 'embedding', 'norm'\\]"),
        ("train.lr=0.02", "'train.lr' is 0.02 but 0.01"),
        ("train.betas=[0.8,0.99]", "'train.betas' is \\[0.8, 0.99\\] but \\[0.9, 0.999\\]"),
        ("train.weight_decay=0.1", "'train.weight_decay' is 0.1 but 0.0"),
        ("train.schedule=cosine", "'train.schedule' is 'cosine' but 'constant'"),
        ("data.seed=1", "'data.seed' is 1 but 0"),
        ("loss.similarity=0.5", "'loss.similarity' is 0.5 but 0.21"),
        (
            f"models.1.dataset={ROOT / 'data/examples/counting.jsonl'}",
            "'models.1.dataset' is '.*counting.jsonl' but '.*reverse.jsonl'",
        ),
    ],
)
def test_resume_refuses_any_other_change(
    family: tuple[Path, list[Path]], one_step_run: Path, no_model_loads: None, change: str, shown: str
) -> None:
    """Refused before any model loads: the checkpoint's optimizer state, schedule and data order came from its
    config, so a changed value would be silently ignored or mixed."""
    with pytest.raises(DamError, match=f"config key {shown} in the run being resumed .* may change only"):
        train(tiny_config(*family, one_step_run, "train.max_steps=2", change))


def test_resume_refuses_data_changed_in_place(family: tuple[Path, list[Path]], tmp_path: Path) -> None:
    data = tmp_path / "data.jsonl"
    rows = (ROOT / "data/examples/reverse.jsonl").read_text().splitlines()
    data.write_text("\n".join(rows) + "\n")
    out = tmp_path / "run"
    train(tiny_config(*family, out, "train.max_steps=1", f"models.1.dataset={data}"))
    data.write_text("\n".join(rows[::-1]) + "\n")  # same rows, other order: another sample of 16
    with pytest.raises(DamError, match="the training data differs from the run being resumed"):
        train(tiny_config(*family, out, "train.max_steps=2", f"models.1.dataset={data}"))


def test_resume_accepts_length_cadence_and_tracking_changes(family: tuple[Path, list[Path]], tmp_path: Path) -> None:
    out = tmp_path / "run"
    train(tiny_config(*family, out, "train.max_steps=1"))
    changes = ("train.save_every=1", "train.log_every=2", "train.keep_checkpoints=3", "wandb.tags=[resumed]")
    train(tiny_config(*family, out, "train.max_steps=2", *changes))
    assert latest_checkpoint(out) == out / "checkpoints" / "step_2"


def test_extending_a_finished_decaying_run_follows_the_longer_schedule(
    family: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    """A finished linear run (lr decayed to 0) extended from 3 to 6 steps uses, from step 4 on, the rates of a run
    started with max_steps=6 (not 0, not the old curve); the rates are exact float64 products of the schedule."""
    common = ("train.schedule=linear", "train.warmup_steps=1")
    straight = tmp_path / "straight"
    train(tiny_config(*family, straight, "train.max_steps=6", *common))
    extended = tmp_path / "extended"
    train(tiny_config(*family, extended, "train.max_steps=3", *common))
    train(tiny_config(*family, extended, "train.max_steps=6", *common))

    def rates(run: Path) -> list[float]:
        return [json.loads(line)["lr"] for line in (run / "metrics.jsonl").read_text().splitlines()]

    assert rates(straight) == pytest.approx([0.0, 0.01, 0.008, 0.006, 0.004, 0.002], abs=1e-12)
    assert rates(extended)[:3] == pytest.approx([0.0, 0.01, 0.005], abs=1e-12)  # the 3-step schedule
    assert rates(extended)[3:] == rates(straight)[3:]


@pytest.fixture
def no_model_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Building the wrapper fails the test: refusals must come before any model loads."""

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model was loaded before the refusal")

    monkeypatch.setattr(DAMModel, "from_pretrained", forbidden)


def test_resume_from_must_be_a_checkpoint(family: tuple[Path, list[Path]], tmp_path: Path) -> None:
    with pytest.raises(DamError, match="train.resume_from: .* is not a complete checkpoint"):
        train(tiny_config(*family, tmp_path / "run", f"train.resume_from={tmp_path}"))


@pytest.mark.slow
def test_killed_process_resumes_to_the_uninterrupted_result(family: tuple[Path, list[Path]], tmp_path: Path) -> None:
    """SIGKILL `python train_dam.py` right after its first checkpoint, restart it, compare with a straight run."""
    common = ("train.max_steps=16", "train.save_every=2", "train.schedule=linear", "train.warmup_steps=2")
    out = tmp_path / "killed"
    command = [sys.executable, "train_dam.py", str(TINY), *tiny_overrides(*family, out, *common)]
    env = os.environ | {"WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while latest_checkpoint(out) is None and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    assert process.returncode == -signal.SIGKILL, f"the run ended before it could be killed: {process.returncode}"
    first = latest_checkpoint(out)
    assert first is not None and not (out / "merged").exists()
    killed_at = int(first.name.removeprefix("step_"))
    assert killed_at < 16

    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resumed from {first}" in done.stdout + done.stderr

    # the straight run is a subprocess under the same settings (1 thread, same command): an in-process run would
    # use pytest's thread count, whose different reduction order gives ~1e-5 differences on some machines
    straight = tmp_path / "straight"
    command = [sys.executable, "train_dam.py", str(TINY), *tiny_overrides(*family, straight, *common)]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    # same process kind, threads and data order: a resume is exact up to float rounding of a reloaded optimizer
    # state (measured 0.0); atol 1e-6 leaves room for a kernel that rounds differently across a reload
    assert_same_coefficients(coefficients(straight), coefficients(out))
