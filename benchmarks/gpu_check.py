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

and prints one table with a status per check. Steps 3 and 4 compare two computations that must agree to rounding:
each has a tolerance (:data:`TOLERANCES`, justified there) and the script exits 1 when a difference is past it, as
when a step fails. Steps 1 and 2 are measurements (reported, not judged).

In ``--smoke`` mode every step runs on the CPU (float32, ``--cpu`` launches) with a tiny family, so the script
cannot rot between GPU runs: the sharded run (one process) is compared with the unsharded one, and the "device"
merge is the CPU merge written in bfloat16, against the float32 one (a lower precision: the comparison must accept
its rounding). ``--checks`` runs some steps only (the family is always built); ``--perturb R`` multiplies the
second side of every comparison by ``1 + R`` before comparing, to see the checks fail (tests/test_gpu_check.py).
Budget on one H100/H200: under 8 minutes, most of it building the family and the CPU merge.
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
CHECKS = ("train", "step", "sharded", "merge")

TOLERANCES = {
    # Sharded sources (FSDP2) against the unsharded run of step 1, same global batch. The first step starts from the
    # same coefficients, so its loss and gradient norm (metrics.jsonl) differ by rounding only; a gradient summed
    # instead of averaged over processes doubles the norm, a wrong shard changes both by far more than rounding.
    # float32 on the CPU, one process: the gathered tensors are the whole ones bit for bit and the batch is the
    # same, so the same arithmetic (0 measured); 1e-6 relative leaves room for a kernel that orders a sum otherwise.
    # After the run, the coefficients (~1/3) as tests/test_sharding.py bounds them in float32: 1e-6 absolute.
    "smoke": {"loss_rel": 1e-6, "grad_norm_rel": 1e-6, "coefficients": 1e-6},
    # bf16 autocast on GPUs: every matmul output is rounded to 8 significant bits (2^-8 relative at worst), and two
    # processes run GEMMs of other shapes (half the batch), so step 1's loss (a mean over ~4k tokens, which averages
    # the roundings out) is allowed 1% and its gradient norm 2%: a few bf16 ulps, far below a factor 2. After 20
    # AdamW steps single coefficients cannot be bounded tightly (AdamW moves a coefficient by about lr per step
    # whatever its gradient's size, so one whose gradient is near zero may go another way on rounding), so the
    # coefficients are judged on average: the mean |difference| at most 10% of the mean move from the init,
    # which a wrong shard or a wrong gradient (moving most coefficients otherwise) exceeds.
    "gpu": {"loss_rel": 1e-2, "grad_norm_rel": 2e-2, "coefficients_mean_rel": 0.1},
}
MERGE_ULPS = 2
"""``dam merge`` computes in float32 on either device and rounds to the output dtype: the device result may differ
from the CPU one by the ordering of float32 sums (a few float32 ulps) and then by one rounding of the output dtype,
so each entry may differ by at most ``MERGE_ULPS`` ulps of the coarser output dtype at the CPU value
(``|a - b| <= MERGE_ULPS * eps * |a|``, plus the dtype's smallest normal for zeros). A different selection (a
trimmed entry kept, a sign elected otherwise) moves an entry by the whole value and fails it."""


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


def merge(
    family: tuple[Path, list[Path]], workdir: Path, device: str, out_dtype: str | None = None
) -> dict[str, torch.Tensor]:
    """``dam merge --device DEVICE`` of the family (TIES), written in ``out_dtype`` (default: the inputs')."""
    base, sources = family
    name = f"{device}_{out_dtype}" if out_dtype else device
    config = workdir / f"ties_{name}.yaml"
    models = "".join(f"  - model: {s}\n    parameters: {{weight: 0.4, density: 0.5}}\n" for s in sources)
    dtype = f"out_dtype: {out_dtype}\n" if out_dtype else ""
    config.write_text(
        f"merge_method: ties\nbase_model: {base}\nmodels:\n{models}parameters: {{normalize: true}}\n{dtype}"
    )
    out = workdir / f"merge_{name}"
    sh([sys.executable, "-m", "dam.cli", "merge", str(config), str(out), "--device", device, "--force"], "dam merge")
    return {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(f).items()}


def merge_difference(cpu: dict[str, torch.Tensor], dev: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(max |cpu - dev| over every entry, the largest ratio of an entry's difference to its allowance
    :data:`MERGE_ULPS` ulps of the coarser dtype at the CPU value): the check passes when the ratio is <= 1."""
    if set(cpu) != set(dev):
        raise SystemExit(f"gpu_check: the merges hold other tensors: {sorted(set(cpu) ^ set(dev))[:5]}")
    worst = ratio = 0.0
    for name, a in cpu.items():
        b = dev[name]
        coarse = torch.finfo(max((a.dtype, b.dtype), key=lambda d: torch.finfo(d).eps))
        diff = (a.double() - b.double()).abs()
        allowed = MERGE_ULPS * coarse.eps * a.double().abs() + coarse.tiny
        worst = max(worst, float(diff.max()))
        ratio = max(ratio, float((diff / allowed).max()))
    return worst, ratio


def relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-30)


def sharded_differences(
    plain: Path, sharded: Path, initial: dict[str, torch.Tensor], perturb: float
) -> dict[str, float]:
    """Step 1's loss and gradient norm (relative differences) and the final coefficients (max and mean |difference|,
    and the mean move from the init) of the sharded run against the unsharded one; ``perturb`` scales the sharded
    side first (1 + perturb)."""
    first = [json.loads((run / "metrics.jsonl").read_text().splitlines()[0]) for run in (plain, sharded)]
    a, b = load_file(plain / "dam_coefficients.safetensors"), load_file(sharded / "dam_coefficients.safetensors")
    factor = 1 + perturb
    diffs = [(a[k].double() - factor * b[k].double()).abs().reshape(-1) for k in a]
    moves = [(a[k].double() - initial[k].double()).abs().reshape(-1) for k in a]
    return {
        "loss_rel": relative(first[0]["loss"], factor * first[1]["loss"]),
        "grad_norm_rel": relative(first[0]["grad_norm"], factor * first[1]["grad_norm"]),
        "coefficients": float(max(d.max() for d in diffs)),
        "coefficients_mean_rel": float(torch.cat(diffs).mean() / torch.cat(moves).mean().clamp_min(1e-30)),
    }


def initial_coefficients(family: tuple[Path, list[Path]], device: str) -> dict[str, torch.Tensor]:
    """The raw coefficients every run starts from (the tiny config's ``dam`` options), by the names
    ``dam_coefficients.safetensors`` uses, from the wrapper built on ``device``."""
    from dam.adaptive.model import DAMModel
    from dam.training.config import load_config

    base, sources = family
    model = DAMModel.from_pretrained(str(base), [str(s) for s in sources], load_config(TINY).dam, device=device)
    initial = model.raw_coefficients()
    del model
    return initial


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny family, float32: that every step runs")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "dam_gpu_check")
    parser.add_argument(
        "--checks", default=",".join(CHECKS), help=f"comma-separated subset of {','.join(CHECKS)} (default: all)"
    )
    parser.add_argument(
        "--perturb",
        type=float,
        default=0.0,
        help="multiply the second side of every comparison by 1 + PERTURB before comparing: the checks must fail",
    )
    args = parser.parse_args()
    checks = set(args.checks.split(","))
    if not checks <= set(CHECKS):
        sys.exit(f"gpu_check: --checks takes {', '.join(CHECKS)}; got {args.checks}")
    if "sharded" in checks:
        checks.add("train")  # the unsharded run is the sharded one's reference
    smoke = args.smoke
    if not smoke and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device; run with --smoke for the CPU smoke test")
    setting = SMOKE if smoke else GPU
    tolerance = TOLERANCES["smoke" if smoke else "gpu"]
    device = "cpu" if smoke else "cuda"
    gpus = 0 if smoke else torch.cuda.device_count()
    args.workdir.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, str, str]] = []  # (check, status: ok / FAIL / - for a measurement, result)

    def judged(values: dict[str, float]) -> str:
        """ok when every value is within its tolerance (the keys of ``tolerance`` it has), else FAIL."""
        return "ok" if all(values[k] <= limit for k, limit in tolerance.items() if k in values) else "FAIL"

    from dam.testing import make_family

    start = time.perf_counter()
    family = make_family(
        args.workdir / "family", 3, scale=0.01, dtype=getattr(torch, setting["dtype"]), **setting["model"]
    )
    params = sum(t.numel() for t in load_file(family[0] / "model.safetensors").values())
    name = torch.cuda.get_device_name() if gpus else "CPU"
    built = f"{params / 1e6:.0f}M parameters x 4 ({setting['dtype']}), built in {time.perf_counter() - start:.0f} s"
    rows.append(("family", "-", f"{built}; device {name}"))

    # 1. DAM training through accelerate launch
    plain_run = args.workdir / "dam"
    if "train" in checks:
        _, wall = train(smoke, family, plain_run, 1)
        metrics = [json.loads(line) for line in (plain_run / "metrics.jsonl").read_text().splitlines()]
        rows.append(
            (
                f"DAM, accelerate launch, 1 {'process' if smoke else 'GPU'}, {setting['dtype']}",
                "-",
                f"{len(metrics)} steps in {wall:.0f} s (with start-up), loss {metrics[0]['loss']:.4f} -> "
                f"{metrics[-1]['loss']:.4f}",
            )
        )

    # 2. step time and peak memory against plain fine-tuning
    if "step" in checks:
        step_args = SimpleNamespace(
            device=device, dtype="bf16" if gpus else "fp32", batch=1, seq=setting["seq"], warmup=1, steps=3, threads=0
        )
        plain = step_time.run("plain", step_args, family[0], family[1])
        dam = step_time.run("dam3", step_args, family[0], family[1])
        rows.append(
            (
                f"DAM N=3 step / plain fine-tuning step (1 x {setting['seq']} tokens)",
                "-",
                f"time {dam['step_s'] / plain['step_s']:.2f}x ({dam['step_s'] * 1000:.0f} vs "
                f"{plain['step_s'] * 1000:.0f} ms), peak memory {dam['peak_bytes'] / plain['peak_bytes']:.2f}x "
                f"({dam['peak_bytes'] / MIB:.0f} vs {plain['peak_bytes'] / MIB:.0f} MiB)",
            )
        )

    # 3. sharded sources (FSDP2), same global batch
    if "sharded" in checks:
        processes = 2 if gpus >= 2 else 1
        sharded_run = args.workdir / "dam_sharded"
        stdout, wall = train(smoke, family, sharded_run, processes, "train.shard_sources=true")
        held = re.findall(r"process (\d+): ([\d.]+) MiB of the ([\d.]+) MiB", stdout)
        found = sharded_differences(plain_run, sharded_run, initial_coefficients(family, device), args.perturb)
        share = ", ".join(f"process {p} holds {float(x):.0f} of {float(t):.0f} MiB" for p, x, t in held)
        limits = ", ".join(f"{k} <= {v:g}" for k, v in tolerance.items())
        rows.append(
            (
                f"sharded sources (FSDP2), {processes} process(es)",
                judged(found),
                f"vs unsharded: step 1 loss rel diff {found['loss_rel']:.2e}, grad norm rel diff "
                f"{found['grad_norm_rel']:.2e}; coefficients max |diff| {found['coefficients']:.2e}, mean |diff| / "
                f"mean move {found['coefficients_mean_rel']:.2e} (tolerances: {limits}); {share}; {wall:.0f} s",
            )
        )

    # 4. dam merge on the device against the CPU (smoke: the CPU merge written in bfloat16 against float32)
    if "merge" in checks:
        cpu = merge(family, args.workdir, "cpu")
        dev = merge(family, args.workdir, device, "bfloat16" if smoke else None)
        dev = {k: v * (1 + args.perturb) if args.perturb else v for k, v in dev.items()}
        worst, ratio = merge_difference(cpu, dev)
        what = "cpu in bfloat16" if smoke else f"--device {device}"
        rows.append(
            (
                f"dam merge {what} vs cpu (ties)",
                "ok" if ratio <= 1 else "FAIL",
                f"{len(cpu)} tensors, max |diff| {worst:.2e}, at most {ratio:.2f} of the allowed {MERGE_ULPS} ulps",
            )
        )

    width = max(len(r[0]) for r in rows)
    print(f"\n{'check'.ljust(width)}  status  result")
    for check, status, result in rows:
        print(f"{check.ljust(width)}  {status.ljust(6)}  {result}")
    failed = [r[0] for r in rows if r[1] == "FAIL"]
    if failed:
        sys.exit(f"gpu_check: past tolerance: {'; '.join(failed)}")


if __name__ == "__main__":
    main()
