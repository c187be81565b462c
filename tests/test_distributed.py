"""DDP with two CPU processes (torchrun, gloo) gives the coefficients of one process on the same global batch;
accelerate's own FSDP and DeepSpeed modes are refused."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_run import ROOT, TINY, tiny_config, tiny_overrides

from dam.errors import DamError
from dam.testing import make_family
from dam.training.loop import train


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("granularity", ["column", "row_column"])
def test_two_process_ddp_equals_one_process(tmp_path: Path, granularity: str) -> None:
    base, sources = make_family(tmp_path / "family", 3)
    common = [
        *tiny_overrides(base, sources, None),
        f"dam.granularity={granularity}",
        "train.max_steps=3",
        "train.lr=1e-3",
        "train.save_every=2",
        "data.pairing=all",  # every teacher on every row: exercises the S = N teacher axis too
    ]
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    command += ["--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    command += ["train_dam.py", str(TINY), *common, f"output_dir={out}", "train.batch_size=1", "train.grad_accum=2"]
    env = os.environ | {"WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "global batch 4" in done.stdout, done.stdout[-2000:]
    # every process saved its RNG state; only the main process wrote the run folder
    assert sorted(p.name for p in (out / "checkpoints" / "step_2").glob("random_states_*")) == [
        "random_states_0.pkl",
        "random_states_1.pkl",
    ]

    # the single-process run is a subprocess under the same settings (1 thread): in pytest it would use another
    # thread count, whose reduction order differs
    single = tmp_path / "single"
    command = [sys.executable, "train_dam.py", str(TINY), *common, f"output_dir={single}", "train.batch_size=4"]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    a = load_file(out / "dam_coefficients.safetensors")
    b = load_file(single / "dam_coefficients.safetensors")
    # moved away from the init: columns start at 1/3, row_column's row scales at 1
    moved = max(float(torch.minimum((t - 1 / 3).abs(), (t - 1).abs()).max()) for t in b.values())
    assert moved > 1e-3, "the run did not train"
    # same threads and dtype; the all-reduce and micro-batch sums reorder float32 additions, so three AdamW steps
    # differ by rounding (coefficients ~0.3): 1e-6. The gradients themselves are compared in test_gradients.py
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6, rtol=0), name


@pytest.mark.parametrize("kind", ["FSDP", "DEEPSPEED"])
def test_accelerate_fsdp_and_deepspeed_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    """An accelerate config of distributed_type FSDP or DEEPSPEED (its plugin would shard the coefficients and wrap
    the model by its own policy) stops the run in one line pointing at train.shard_sources, before the run folder
    is made. accelerate picks these types only on GPUs (and DeepSpeed needs its package), so the Accelerator is
    replaced by one that reports the type, as a GPU launch with such a config would."""
    import accelerate
    from accelerate.utils import DistributedType

    created: list[dict] = []

    class Launched:
        distributed_type = DistributedType[kind]

        def __init__(self, **kwargs: object) -> None:
            created.append(kwargs)

    monkeypatch.setattr(accelerate, "Accelerator", Launched)
    base, sources = make_family(tmp_path / "family", 3)
    out = tmp_path / "run"
    with pytest.raises(DamError, match=rf"distributed_type {kind} is not supported: .* train.shard_sources=true$"):
        train(tiny_config(base, sources, out))
    assert len(created) == 1  # the refusal is the loop's, on the Accelerator it made
    assert not out.exists()
