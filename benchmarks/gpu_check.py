"""One check, in one run, of what CPUs cannot show: DAM on a GPU, in bf16, launched the way users launch it.

    python benchmarks/gpu_check.py [--workdir DIR]   # a GPU machine: a ~0.6B-parameter Llama family, bf16
    python benchmarks/gpu_check.py --smoke           # CPU, a tiny family, float32, seconds (tests/test_gpu_check.py)

Builds a base and three perturbed fine-tunes with random weights locally (no download), then:

1. trains DAM with ``accelerate launch`` on one GPU in bf16 (``train_dam.py`` on ``configs/dam/tiny.yaml``'s data,
   teachers on the fly), and reports the loss before and after and the run's wall time;
2. times one DAM step (N=3, cached top-K teachers) against one plain full fine-tuning step of the same model on
   the GPU (``benchmarks/step_time.py``'s workers): the step-time and peak-memory ratios;
3. runs the same training with ``train.shard_sources=true`` (FSDP2) on one process, or two when two GPUs are
   present (same global batch), and compares its coefficients with step 1's, with each process's share of the
   source weights;
4. merges the three sources with ``dam merge --device cuda`` (TIES) and compares every tensor with the CPU result;

and prints one table. In ``--smoke`` mode every step runs on the CPU (float32, ``--cpu`` launches) with a tiny
family, so the script cannot rot between GPU runs; the figures then only show that each step ran. Exits 1 when a
step fails. Budget on one H100/H200: under 8 minutes, most of it building the family and the CPU merge.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import step_time  # noqa: E402  (the step workers, run on this family)

TINY = ROOT / "configs" / "dam" / "tiny.yaml"
MIB = 2**20
GPU = dict(
    model=dict(
        hidden_size=1536,
        intermediate_size=4096,
        num_layers=16,
        num_heads=12,
        num_kv_heads=12,
        vocab_size=32000,
        max_position_embeddings=2048,
    ),
    dtype="bfloat16",
    steps=20,
    seq=1024,
)
SMOKE = dict(model=dict(vocab_size=8192), dtype="float32", steps=2, seq=32)


def sh(command: list[str], what: str) -> str:
    """Run a command; its stdout, or exit 1 naming the step with the end of its stderr."""
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=_env())
    if done.returncode != 0:
        sys.exit(f"gpu_check: {what} failed:\n{done.stderr[-4000:]}")
    return done.stdout


def _env() -> dict[str, str]:
    return os.environ | {"WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT)}


def launch(smoke: bool, processes: int) -> list[str]:
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes)]
    command += ["--num_machines", "1"]
    if smoke:
        return [*command, "--cpu", "--mixed_precision", "no"]
    return [*command, "--mixed_precision", "bf16", *(["--multi_gpu"] if processes > 1 else [])]


def train(smoke: bool, family: tuple[Path, list[Path]], out: Path, processes: int, *extra: str) -> tuple[str, float]:
    """``accelerate launch train_dam.py`` on the tiny config's data over ``family``; (stdout, wall seconds)."""
    from dam.training.config import load_config

    setting = SMOKE if smoke else GPU
    base, sources = family
    models = [f"models.{i}.model={s}" for i, s in enumerate(sources)]
    datasets = [f"models.{i}.dataset={ROOT / m.dataset}" for i, m in enumerate(load_config(TINY).models)]
    overrides = [f"base_model={base}", *models, *datasets, f"output_dir={out}", f"dtype={setting['dtype']}"]
    overrides += [f"train.max_steps={setting['steps']}", "train.save_every=0", "train.log_every=1"]
    overrides += ["train.batch_size=" + str(4 // processes), "wandb.mode=disabled"]
    start = time.perf_counter()
    stdout = sh([*launch(smoke, processes), "train_dam.py", str(TINY), *overrides, *extra], f"training {out.name}")
    return stdout, time.perf_counter() - start


def merge(family: tuple[Path, list[Path]], workdir: Path, device: str) -> dict[str, torch.Tensor]:
    base, sources = family
    config = workdir / "ties.yaml"
    models = "".join(f"  - model: {s}\n    parameters: {{weight: 0.4, density: 0.5}}\n" for s in sources)
    config.write_text(f"merge_method: ties\nbase_model: {base}\nmodels:\n{models}parameters: {{normalize: true}}\n")
    out = workdir / f"merge_{device}"
    sh([sys.executable, "-m", "dam.cli", "merge", str(config), str(out), "--device", device, "--force"], "dam merge")
    return {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(f).items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny family, float32: that every step runs")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "dam_gpu_check")
    args = parser.parse_args()
    smoke = args.smoke
    if not smoke and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device; run with --smoke for the CPU smoke test")
    setting = SMOKE if smoke else GPU
    device = "cpu" if smoke else "cuda"
    gpus = 0 if smoke else torch.cuda.device_count()
    args.workdir.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, str]] = []

    from dam.testing import make_family

    start = time.perf_counter()
    family = make_family(
        args.workdir / "family", 3, scale=0.01, dtype=getattr(torch, setting["dtype"]), **setting["model"]
    )
    params = sum(t.numel() for t in load_file(family[0] / "model.safetensors").values())
    name = torch.cuda.get_device_name() if gpus else "CPU"
    rows.append(
        (
            "family",
            f"{params / 1e6:.0f}M parameters x 4 ({setting['dtype']}), built in "
            f"{time.perf_counter() - start:.0f} s; device {name}",
        )
    )

    # 1. DAM training through accelerate launch
    plain_run = args.workdir / "dam"
    _, wall = train(smoke, family, plain_run, 1)
    metrics = [json.loads(line) for line in (plain_run / "metrics.jsonl").read_text().splitlines()]
    rows.append(
        (
            f"DAM, accelerate launch, 1 {'process' if smoke else 'GPU'}, {setting['dtype']}",
            f"{len(metrics)} steps in {wall:.0f} s (with start-up), loss {metrics[0]['loss']:.4f} -> "
            f"{metrics[-1]['loss']:.4f}",
        )
    )

    # 2. step time and peak memory against plain fine-tuning
    step_args = SimpleNamespace(
        device=device, dtype="bf16" if gpus else "fp32", batch=1, seq=setting["seq"], warmup=1, steps=3, threads=0
    )
    plain = step_time.run("plain", step_args, family[0], family[1])
    dam = step_time.run("dam3", step_args, family[0], family[1])
    rows.append(
        (
            f"DAM N=3 step / plain fine-tuning step (1 x {setting['seq']} tokens)",
            f"time {dam['step_s'] / plain['step_s']:.2f}x ({dam['step_s'] * 1000:.0f} vs "
            f"{plain['step_s'] * 1000:.0f} ms), peak memory {dam['peak_bytes'] / plain['peak_bytes']:.2f}x "
            f"({dam['peak_bytes'] / MIB:.0f} vs {plain['peak_bytes'] / MIB:.0f} MiB)",
        )
    )

    # 3. sharded sources (FSDP2), same global batch
    processes = 2 if gpus >= 2 else 1
    sharded_run = args.workdir / "dam_sharded"
    stdout, wall = train(smoke, family, sharded_run, processes, "train.shard_sources=true")
    held = re.findall(r"process (\d+): ([\d.]+) MiB of the ([\d.]+) MiB", stdout)
    a = load_file(plain_run / "dam_coefficients.safetensors")
    b = load_file(sharded_run / "dam_coefficients.safetensors")
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    share = ", ".join(f"process {p} holds {float(x):.0f} of {float(t):.0f} MiB" for p, x, t in held)
    rows.append(
        (
            f"sharded sources (FSDP2), {processes} process(es)",
            f"coefficients max |diff| vs unsharded {diff:.2e}; {share}; {wall:.0f} s",
        )
    )

    # 4. dam merge on the device against the CPU
    cpu, dev = merge(family, args.workdir, "cpu"), merge(family, args.workdir, device)
    merge_diff = max(float((cpu[k].float() - dev[k].float()).abs().max()) for k in cpu)
    rows.append((f"dam merge --device {device} vs cpu (ties)", f"{len(cpu)} tensors, max |diff| {merge_diff:.2e}"))

    width = max(len(r[0]) for r in rows)
    print(f"\n{'check'.ljust(width)}  result")
    for check, result in rows:
        print(f"{check.ljust(width)}  {result}")


if __name__ == "__main__":
    main()
