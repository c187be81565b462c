"""``benchmarks/gpu_check.py --smoke``: the GPU check's every step runs on the CPU with a tiny family (so the script
cannot rot between GPU runs), its comparisons pass within their tolerances, and a difference past them makes the
script exit non-zero."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_run import ROOT


def gpu_check(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--smoke", "--workdir", str(workdir), *args]
    env = os.environ | {"WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def row(table: str, check: str) -> str:
    return next(line for line in table.splitlines() if line.startswith(check))


@pytest.mark.slow
def test_gpu_check_smoke_mode_runs_every_step_within_tolerance(tmp_path: Path) -> None:
    done = gpu_check(tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    table = done.stdout[done.stdout.index("check ") :]
    for check in ("family", "DAM, accelerate launch", "DAM N=3 step / plain", "sharded sources (FSDP2)", "dam merge"):
        assert check in table, table
    assert re.search(r"\d+ steps in \d+ s", table), table
    assert re.search(r"time [\d.]+x .* peak memory [\d.]+x", table), table
    sharded = row(table, "sharded sources (FSDP2)")
    assert " ok " in sharded and re.search(r"process 0 holds [\d.]+ of [\d.]+ MiB", sharded), sharded
    # one float32 process on the CPU, same batch: the sharded run computes what the unsharded one does (measured 0);
    # within the smoke tolerances (1e-6) either way
    assert re.search(r"step 1 loss rel diff [\d.e+-]+, grad norm rel diff [\d.e+-]+; coefficients max", sharded)
    # the merge: float32 against the same merge written in bfloat16, a real difference (bfloat16 rounding: up to
    # half an ulp of each entry, so at most 0.25 of the 2 ulps allowed) that the check must accept
    merge = row(table, "dam merge cpu in bfloat16 vs cpu")
    found = re.search(r"max \|diff\| ([\d.e+-]+), at most ([\d.]+) of the allowed 2 ulps", merge)
    assert " ok " in merge and found, merge
    assert float(found[1]) > 0 and 0 < float(found[2]) <= 0.5, merge


@pytest.mark.slow
def test_gpu_check_exits_non_zero_past_its_tolerances(tmp_path: Path) -> None:
    """The second side of each comparison scaled by 1.05 (6 bfloat16 ulps; 5% of the smoke run's step-1 loss, gradient
    norm and coefficients): both checks fail, and the script says which and exits 1."""
    done = gpu_check(tmp_path, "--checks", "sharded,merge", "--perturb", "0.05")
    assert done.returncode == 1, (done.returncode, done.stderr[-3000:])
    table = done.stdout[done.stdout.index("check ") :]
    assert " FAIL " in row(table, "sharded sources (FSDP2)"), table
    assert " FAIL " in row(table, "dam merge cpu in bfloat16 vs cpu"), table
    assert "DAM N=3 step" not in table  # --checks: the step-time measurement did not run
    assert done.stderr.strip().splitlines()[-1].startswith("gpu_check: past tolerance: sharded sources"), done.stderr
