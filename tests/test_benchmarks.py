"""The benchmark scripts run end to end on tiny models (their figures are measured by hand, not here): a script
that no test runs rots unseen, as ``step_time.py``'s alignment kind once did."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_run import ROOT


def bench(script: str, *args: str) -> subprocess.CompletedProcess:
    env = os.environ | {"WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, str(ROOT / "benchmarks" / script), *args]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


# 15 subprocesses (each imports torch and transformers): ~1.5 min on 2 idle cores
@pytest.mark.slow
def test_step_time_runs_every_kind_and_the_memory_table(tmp_path: Path) -> None:
    done = bench(
        "step_time.py", "--shapes", "tiny", "--workdir", str(tmp_path), "--seq", "16", "--warmup", "0",
        "--steps", "1", "--rounds", "1", "--memory-batches", "1", "2",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ") and not line.startswith("| step")]
    labels = [row.split(" | ")[0].removeprefix("| ") for row in rows]
    for kind in ("plain fine-tune", "DAM, N=3, pairing own", "teachers on the fly", "layer alignment alone"):
        assert any(kind in label for label in labels), labels
    assert re.search(r"DAM N=3 / plain: [\d.]+ \(goal <= 1\.30\)", done.stdout), done.stdout
    # plain and four N=3 on-the-fly kinds, at batches 1 and 2, under the table's header
    memory = [row for row in rows if "MiB" in row and "tokens a sequence" not in row]
    assert len(memory) == 5 and all(re.search(r"\| -?[\d.]+ \| [\d.]+ \|$", row) for row in memory), memory


# mergekit and dam, each a subprocess per config and repeat: ~1 min on 2 idle cores
@pytest.mark.slow
@pytest.mark.skipif(shutil.which("mergekit-yaml") is None, reason="needs mergekit (the dev extra)")
def test_merge_speed_measures_both_tools_and_reports_a_failure_as_its_row(tmp_path: Path) -> None:
    methods = ["--methods", "ties,passthrough"]
    done = bench("merge_speed.py", "--smoke", "--repeats", "1", "--workdir", str(tmp_path), *methods)
    assert done.returncode == 0, done.stderr[-3000:]
    ties = next(line for line in done.stdout.splitlines() if line.startswith("| ties |"))
    assert re.fullmatch(r"\| ties( \| [\d.]+x?){9} \|", ties), ties
    # the shipped passthrough example slices 32 layers, which these 2-layer models lack: both tools refuse, the row
    # says so and the run goes on to the scaling table
    failed = next(line for line in done.stdout.splitlines() if line.startswith("| passthrough |"))
    assert "mergekit failed" in failed and "dam failed" in failed, failed
    assert "| 3 model(s) |" in done.stdout
