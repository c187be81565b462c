"""``benchmarks/gpu_check.py --smoke``: the GPU check's every step runs on the CPU with a tiny family (so the script
cannot rot between GPU runs), and its CPU results agree where they must."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_run import ROOT


@pytest.mark.slow
def test_gpu_check_smoke_mode_runs_every_step(tmp_path: Path) -> None:
    command = [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--smoke", "--workdir", str(tmp_path)]
    env = os.environ | {"WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    table = done.stdout[done.stdout.index("check ") :]
    for row in ("family", "DAM, accelerate launch", "DAM N=3 step / plain", "sharded sources (FSDP2)", "dam merge"):
        assert row in table, table
    assert re.search(r"\d+ steps in \d+ s", table), table
    assert re.search(r"time [\d.]+x .* peak memory [\d.]+x", table), table
    # one sharded process on the CPU computes exactly what the unsharded run does (same float32 kernels, same
    # batch); the merge on "the device" is the CPU merge again in smoke mode
    assert "coefficients max |diff| vs unsharded 0.00e+00" in table, table
    assert re.search(r"process 0 holds [\d.]+ of [\d.]+ MiB", table), table
    assert "max |diff| 0.00e+00" in table.split("dam merge")[1], table
