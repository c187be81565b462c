"""A wandb sweep file runs: train_dam.py is started with its arguments formed exactly as `wandb agent` forms them,
and the offline wandb run records the config and every logged key."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml
from wandb.proto import wandb_internal_pb2
from wandb.sdk.launch.sweeps import utils as sweep_utils

from dam.testing import make_family
from dam.training.config import load_saved_config

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ROOT / "configs" / "sweeps" / "tiny.yaml"


def agent_command(sweep: dict, args: dict[str, object]) -> list[str]:
    """The command `wandb agent` runs for one sampled run (``wandb.wandb_agent.Agent._command_run``)."""
    command = sweep_utils.create_sweep_command(sweep["command"])
    variables = sweep_utils.create_sweep_command_args({"args": {k: {"value": v} for k, v in args.items()}})
    variables |= {"interpreter": ["python"], "program": [sweep["program"]], "env": ["/usr/bin/env"]}
    formed: list[str] = []
    for part in map(str, command):
        if part.startswith("${") and part.endswith("}"):
            formed += variables.get(part[2:-1]) or []
        else:
            formed.append(part)
    return formed


def read_records(path: Path) -> list[wandb_internal_pb2.Record]:
    """Records of a ``.wandb`` transaction log (a LevelDB-style log: 7-byte file header, 32 KiB blocks of
    chunks, each ``crc32 | length (2 bytes, little-endian) | type`` with type 1 full, 2 first, 3 middle, 4 last)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    position, block, records, pending = 7, 32768, [], b""
    while position + 7 <= len(data):
        if block - position % block < 7:  # the block's tail is padding
            position += block - position % block
            continue
        length, kind = int.from_bytes(data[position + 4 : position + 6], "little"), data[position + 6]
        chunk = data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind == 1:
            records.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            records.append(pending + chunk)
    return [wandb_internal_pb2.Record.FromString(r) for r in records]


def item_key(item: wandb_internal_pb2.HistoryItem | wandb_internal_pb2.ConfigItem) -> str:
    """An item's key (wandb stores some as a path in ``nested_key``)."""
    return item.key or "/".join(item.nested_key)


def test_agent_form_of_arguments() -> None:
    sweep = yaml.safe_load(SWEEP.read_text())
    formed = agent_command(sweep, {"train.lr": 0.001, "loss.similarity": 0.01})
    assert formed[:4] == ["/usr/bin/env", "python", "train_dam.py", "configs/dam/tiny.yaml"]
    assert formed[-2:] == ["--train.lr=0.001", "--loss.similarity=0.01"]


@pytest.mark.slow
def test_sweep_run_as_the_agent_forms_it(tmp_path: Path) -> None:
    sweep = yaml.safe_load(SWEEP.read_text())
    base, sources = make_family(tmp_path / "family", 3)
    # one sampled point of the sweep (a value from each parameter), plus fixed values a sweep over local models
    # would carry: the tiny family built here and a run folder under tmp_path
    sampled: dict[str, object] = {key: spec["values"][-1] for key, spec in sweep["parameters"].items()}
    fixed: dict[str, object] = {"base_model": str(base), "output_dir": str(tmp_path / "runs" / "${WANDB_RUN_ID}")}
    fixed |= {f"models.{i}.model": str(s) for i, s in enumerate(sources)}
    fixed["train.max_steps"] = 2
    command = agent_command(sweep, sampled | fixed)
    assert "--train.lr=0.03" in command and "--loss.temperature=4.0" in command

    env = os.environ | {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_RUN_ID": "sweeprun1"}
    env |= {"WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    run = tmp_path / "runs" / "sweeprun1"
    config = load_saved_config(run / "config.yaml")
    assert config.train.lr == 0.03 and config.loss.temperature == 4.0 and config.data.num_examples == 16
    assert config.wandb.mode is None and (run / "merged" / "model.safetensors").is_file()

    logs = list((tmp_path / "wandb").glob("offline-run-*-sweeprun1/run-sweeprun1.wandb"))
    assert len(logs) == 1, list(tmp_path.rglob("*.wandb"))
    records = read_records(logs[0])
    runs = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert runs[0].project == "dam-tiny" and runs[0].run_id == "sweeprun1"
    config_keys = {item_key(u) for r in records if r.WhichOneof("record_type") == "config" for u in r.config.update}
    assert {"base_model", "models", "dam", "loss", "data", "train", "wandb"} <= config_keys
    logged = {item_key(i) for r in records if r.WhichOneof("record_type") == "history" for i in r.history.item}
    for key in ("loss", "loss/kl", "loss/similarity", "lr", "tokens_per_second", "grad_norm", "epoch"):
        assert key in logged, key
    assert "coefficients/linear/arithmetic/mean" in logged and "coefficients/norm/counting/std" in logged
