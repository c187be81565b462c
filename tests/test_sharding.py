"""Sources sharded over two CPU processes (torch FSDP2 on gloo, ``train.shard_sources``): the single-process
coefficients, each process holding half of the source weights; the row reads the sharded load is built on."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_distributed import free_port
from tiny_run import ROOT, TINY, tiny_config, tiny_overrides
from torch.torch_version import TorchVersion

import dam.training.sharding as sharding
from dam.errors import DamError
from dam.io.checkpoint import CheckpointReader
from dam.testing import make_family
from dam.training.config import load_config
from dam.training.loop import train
from dam.training.sharding import shard_rows


def test_shard_rows_split_like_torch_chunk() -> None:
    for size in (1, 5, 64, 65):
        for world in (1, 2, 3, 8):
            chunks = torch.arange(size).chunk(world)
            got = [shard_rows(size, r, world) for r in range(world)]
            want = [(int(c[0]), int(c[-1]) + 1) for c in chunks] + [(size, size)] * (world - len(chunks))
            assert got == want, (size, world)


def test_get_rows_reads_a_slice_of_the_first_dimension(tmp_path: Path) -> None:
    base, _ = make_family(tmp_path / "family", 1)
    reader = CheckpointReader(base)
    for name in ("model.embed_tokens.weight", "model.norm.weight", "model.layers.0.mlp.up_proj.weight"):
        full = reader.get(name)
        assert torch.equal(reader.get_rows(name, 3, 7), full[3:7]), name
        assert reader.get_rows(name, 5, 5).shape[0] == 0
        assert reader.get_rows(name, 0, 4, dtype=torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="rows"):
        reader.get_rows("model.norm.weight", 0, 10**6)


def test_sharded_sources_need_torch_2_7(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """fully_shard takes ignored_params (the coefficients stay whole) from torch 2.7; the package's floor is 2.6, so
    a sharded run under 2.6 is refused in one line before anything is read or written. Under the floor's torch
    (.ci/min_versions runs this test: it is not slow) the refusal is real; under a newer torch, fully_shard is made
    to look like 2.6's. The detection itself is checked against the version either way."""
    supported = TorchVersion(torch.__version__.split("+")[0]) >= (2, 7)
    assert sharding.fully_shard_takes_ignored_params() == supported, torch.__version__
    if supported:
        monkeypatch.setattr(sharding, "fully_shard_takes_ignored_params", lambda: False)
    base, sources = make_family(tmp_path / "family", 3)
    out = tmp_path / "run"
    with pytest.raises(DamError, match=r"train.shard_sources needs torch 2.7 or later .* this is torch \S+\. Upgrade"):
        train(tiny_config(base, sources, out, "train.shard_sources=true"))
    assert not out.exists()  # refused before the run folder is made


def torchrun_two(*args: str) -> subprocess.CompletedProcess:
    """``train_dam.py`` on two gloo CPU processes with sharded sources."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    command += ["--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    command += ["train_dam.py", str(TINY), *args, "train.shard_sources=true"]
    env = os.environ | {"WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("granularity", ["column", "row_column"])
def test_two_sharded_processes_equal_one_process(tmp_path: Path, granularity: str) -> None:
    base, sources = make_family(tmp_path / "family", 3)
    common = [
        *tiny_overrides(base, sources, None),
        f"dam.granularity={granularity}",  # row_column: the row scales start at 1 on the meta-built wrapper too
        "train.lr=1e-3",
        "loss.l2=1e-3",  # with the config's loss.similarity: the regularisers run on the sharded model too
        # row_column with pairing own: every process runs every teacher, whatever sources its rows name
        f"data.pairing={'all' if granularity == 'column' else 'own'}",
    ]
    out = tmp_path / "sharded"
    split = [f"output_dir={out}", "train.batch_size=1", "train.grad_accum=2"]
    resume = granularity == "column"  # stopped at step 2 and resumed to 3 (once: each launch costs ~20 s)
    done = torchrun_two(*common, *split, f"train.max_steps={2 if resume else 3}", "train.save_every=2")
    assert done.returncode == 0, done.stderr[-3000:]
    found = re.findall(r"process (\d): ([\d.]+) MiB of the ([\d.]+)", done.stdout)
    held = {int(p): (float(a), float(t)) for p, a, t in found}
    assert sorted(held) == [0, 1], done.stdout[-2000:]
    for local, total in held.values():
        # half of every source tensor's rows, rounded up per tensor: within 3% of half for this tiny model
        assert abs(local / total - 0.5) < 0.03, held
    assert (out / "checkpoints" / "step_2" / "custom_checkpoint_0.pkl").is_file()  # the coefficients, whole
    if resume:
        done = torchrun_two(*common, *split, "train.max_steps=3")  # resumes the sharded run from step 2
        assert done.returncode == 0, done.stderr[-3000:]
        assert "resumed from" in done.stdout and "step 2" in done.stdout, done.stdout[-2000:]

    assert_equal_to_one_process(out, common, tmp_path)


def assert_equal_to_one_process(sharded: Path, common: list[str], tmp_path: Path) -> None:
    """The sharded run's coefficients are those of one process with the same overrides (batch 4, 3 steps)."""
    single = train(
        load_config(TINY, [*common, f"output_dir={tmp_path / 'single'}", "train.batch_size=4", "train.max_steps=3"])
    )
    a = load_file(sharded / "dam_coefficients.safetensors")
    b = load_file(single / "dam_coefficients.safetensors")
    # moved away from the init: columns start at 1/3, row_column's row scales at 1
    moved = max(float(torch.minimum((t - 1 / 3).abs(), (t - 1).abs()).max()) for t in b.values())
    assert moved > 1e-3, "the run did not train"
    for name in b:
        # the gathered weights are the whole source tensors bit for bit; what differs from one process is the order
        # of float32 sums over the batch split (2 processes x 2 micro-batches vs one batch of 4): ~1e-7 relative
        # on coefficients of size ~1/3 after 3 steps, well inside 1e-6
        assert torch.allclose(a[name], b[name], atol=1e-6, rtol=0), name


@pytest.mark.slow
def test_sharded_sources_with_gradient_checkpointing_equal_one_process(tmp_path: Path) -> None:
    """Each decoder layer is both an FSDP unit and a checkpointed block: its recomputation in backward gathers the
    layer's source shards again (FSDP2's pre-forward hook runs inside the recomputed call)."""
    base, sources = make_family(tmp_path / "family", 3)
    common = [*tiny_overrides(base, sources, None), "train.lr=1e-3", "train.gradient_checkpointing=true"]
    out = tmp_path / "sharded"
    split = [f"output_dir={out}", "train.batch_size=1", "train.grad_accum=2", "train.max_steps=3"]
    done = torchrun_two(*common, *split)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_equal_to_one_process(out, common, tmp_path)


@pytest.mark.slow
def test_non_finite_gradient_stops_every_sharded_process(tmp_path: Path) -> None:
    """The gradient norm is global (replicated coefficients after the all-reduce), so both processes stop at the
    same step with the same message; a process left behind in a collective would hang until the timeout."""
    base, sources = make_family(tmp_path / "family", 3)
    out = tmp_path / "nan"
    done = torchrun_two(
        *tiny_overrides(base, sources, out), "train.lr=1e30", "train.save_every=1", "train.max_steps=5"
    )
    assert done.returncode != 0
    assert len(re.findall(r"error: non-finite loss or gradient at step 2 ", done.stderr)) == 2, done.stderr[-3000:]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_1"


@pytest.mark.slow
def test_non_finite_source_rows_stop_every_sharded_process_before_training(tmp_path: Path) -> None:
    """An Inf in rows only the second process reads: both processes refuse the source with the same one-line error
    naming the source and the tensor, before any training step (the first, whose rows are finite, would otherwise
    wait for the second in the first collective)."""
    base, sources = make_family(tmp_path / "family", 3)
    bad = Path(shutil.copytree(sources[1], tmp_path / "nan"))
    tensors = load_file(bad / "model.safetensors")
    name = "model.layers.1.mlp.up_proj.weight"
    tensors[name][-1, 4] = float("inf")  # the last output row: process 1's shard (rows are split in two halves)
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "run"
    done = torchrun_two(*tiny_overrides(base, [sources[0], bad, sources[2]], out))
    assert done.returncode != 0
    errors = re.findall(rf"error: source '[^']*nan': tensor '{name}' contains NaN or Inf", done.stderr)
    assert len(errors) == 2, done.stderr[-3000:]
    assert "DAM: 3 sources" not in done.stdout  # stopped while loading, before the loop
    assert not (out / "checkpoints").exists() and not (out / "merged").exists()
