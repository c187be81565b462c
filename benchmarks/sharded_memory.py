"""Peak resident memory of the largest process for one DAM run on one process, two DDP processes and two processes
with sharded sources (``train.shard_sources``), on CPU (gloo), float32, three sources.

Builds (once, in ``--workdir``) a base and three perturbed fine-tunes of a Llama whose decoder layers are small
against all the sources (by default 16 layers of hidden 768, vocabulary 8192: about 124M parameters, 1.4 GiB of
float32 source weights for three), then runs ``train_dam.py configs/dam/tiny.yaml`` on it (the tiny config's data,
``--batch`` sequences per process, ``--steps`` steps, no checkpoint) three ways, each launched from a fresh helper
process whose ``RUSAGE_CHILDREN`` peak is the largest process's peak RSS (about 500 MiB of it the Python, torch
and transformers libraries):

    python benchmarks/sharded_memory.py [--workdir DIR] [--layers 16 --hidden 768 --vocab 8192]

Sharding saves memory once a gathered unit (one decoder layer, or the root's embedding and ``lm_head``, for all
the sources, held twice while FSDP copies it out of the all-gather buffer) is small against half the sources.
Not part of the test suite.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "dam" / "tiny.yaml"
DATASETS = ("arithmetic", "reverse", "counting")
MIB = 2**20

# runs ``argv`` and prints the peak RSS (bytes) of the largest process it started, after its own output
PEAK = (
    "import resource, subprocess, sys\n"
    "done = subprocess.run(sys.argv[1:])\n"
    "print('peak_rss_kib', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, flush=True)\n"
    "sys.exit(done.returncode)\n"
)


def build_family(args: argparse.Namespace) -> tuple[Path, list[Path]]:
    from dam.testing import make_family

    root = args.workdir / f"models_l{args.layers}_h{args.hidden}_v{args.vocab}"
    base, sources = root / "base", [root / f"source{i}" for i in range(3)]
    if not all((p / "model.safetensors").exists() for p in [base, *sources]):
        print(f"building a base and 3 fine-tunes in {root} ...", flush=True)
        heads = args.hidden // 64
        make_family(
            root,
            3,
            scale=0.01,
            hidden_size=args.hidden,
            intermediate_size=args.intermediate,
            num_layers=args.layers,
            num_heads=heads,
            num_kv_heads=heads,
            vocab_size=args.vocab,
        )
    return base, sources


def run(name: str, launch: list[str], overrides: list[str]) -> tuple[float, list[float]]:
    """Peak RSS (MiB) of the largest process and the MiB of source weights each process reports holding."""
    env = os.environ | {"WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-c", PEAK, *launch, "train_dam.py", str(TINY), *overrides]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
    peak = int(re.findall(r"peak_rss_kib (\d+)", done.stdout)[-1]) * 1024 / MIB
    held = [float(m) for m in re.findall(r"process \d+: ([\d.]+) MiB of the", done.stdout)]
    return peak, held


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "dam_sharded_memory")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--intermediate", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=2, help="sequences per process and step")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    base, sources = build_family(args)
    source_mib = sum((s / "model.safetensors").stat().st_size for s in sources) / MIB
    out = args.workdir / "runs"
    common = [f"base_model={base}", "wandb.mode=disabled", "train.save_every=0", f"train.max_steps={args.steps}"]
    common += [f"train.batch_size={args.batch}"]
    common += [f"models.{i}.model={s}" for i, s in enumerate(sources)]
    common += [f"models.{i}.dataset={ROOT / 'data' / 'examples' / f'{d}.jsonl'}" for i, d in enumerate(DATASETS)]
    two = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
    configs = {
        "one process": ([sys.executable], [f"output_dir={out / 'one'}"]),
        "2 DDP processes": ([*two, "--master_port", "29641"], [f"output_dir={out / 'ddp'}"]),
        "2 processes, train.shard_sources=true": (
            [*two, "--master_port", "29642"],
            [f"output_dir={out / 'sharded'}", "train.shard_sources=true"],
        ),
    }
    print(
        f"{args.layers} layers, hidden {args.hidden}, vocabulary {args.vocab}, 3 sources: {source_mib:.0f} MiB of "
        f"float32 source weights; {args.batch} sequences per process, {args.steps} steps"
    )
    print("\n| processes | source weights per process (MiB) | peak RSS of the largest process (MiB) |")
    print("|---|---|---|")
    for name, (launch, extra) in configs.items():
        peak, held = run(name, launch, [*common, *extra])
        per_process = f"{max(held):.0f} (each)" if held else f"{source_mib:.0f}"
        print(f"| {name} | {per_process} | {peak:.0f} |", flush=True)


if __name__ == "__main__":
    main()
