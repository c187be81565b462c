"""Speed and memory of `dam merge` against `mergekit-yaml` on the same configs, measured in one run.

Builds a base and three fine-tunes of a ~110M-parameter Llama (hidden 768, 12 layers, vocab 16000, bfloat16) in
a work folder, then merges them with both tools (linear, ties, dare_ties), each merge a fresh subprocess timed
end to end (imports included, as a user sees it). Peak RSS and CPU time (user + system) come from ``os.wait4`` on
that child. Every merge runs ``--repeats`` times, the two tools alternating so that both meet the same load; the
fastest wall time and the smallest CPU time are reported (CPU time moves much less than wall time when other jobs
share the cores). A second table merges 1, 2 and 3 models with dam to show that its peak memory follows the largest
tensor, not the number of models times their size.

    python benchmarks/merge_speed.py [--workdir DIR] [--repeats 2]
    python benchmarks/merge_speed.py --real data/smollm2 --methods all [--workdir DIR]

``--real ROOT``: the real demo family's checkpoints instead (``ROOT/models/{base,reverse,initials,double}``,
SmolLM2-135M-Instruct and three full fine-tunes of it, written once to bfloat16 in the work folder).
``--methods all``: every config of ``configs/merge/`` (``--methods a,b``: those), its model names mapped in order
onto the base and the three sources, instead of linear, ties and dare_ties.

Its figures are not part of the test suite (a test runs it with ``--smoke``: tiny models, figures meaningless). Needs
mergekit (``pip install mergekit==0.1.5``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

MODEL = dict(hidden_size=768, intermediate_size=2048, num_layers=12, num_heads=12, num_kv_heads=4, vocab_size=16000)
# --smoke: that the script runs end to end, in seconds (tests/test_benchmarks.py); its figures mean nothing
TINY_MODEL = dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=1, vocab_size=256)
# Built in a child process: a child's peak RSS starts at its parent's RSS at fork time, so this process stays small
# (it imports neither torch nor transformers) to keep every measured child's figure its own.
BUILD = """
import sys, torch
from dam.testing import make_family
make_family(sys.argv[1], 3, dtype=torch.bfloat16, scale=0.01, **{model})
"""
CONFIGS = {
    "linear": {"merge_method": "linear", "parameters": {"weight": 1.0}},
    "ties": {"merge_method": "ties", "base_model": "BASE", "parameters": {"weight": 0.4, "density": 0.5}},
    "dare_ties": {"merge_method": "dare_ties", "base_model": "BASE", "parameters": {"weight": 0.4, "density": 0.5}},
}


def build_models(workdir: Path, model: dict[str, int]) -> tuple[Path, list[Path]]:
    root = workdir / ("models" if model == MODEL else "tiny_models")
    base, sources = root / "base", [root / f"source{i}" for i in range(3)]
    if not all((p / "model.safetensors").exists() for p in [base, *sources]):
        shutil.rmtree(root, ignore_errors=True)
        print(f"building 4 Llama models of shapes {model} ...", flush=True)
        subprocess.run([sys.executable, "-c", BUILD.format(model=model), str(root)], check=True, capture_output=True)
    return base, sources


REAL_BUILD = """
import sys, torch
from pathlib import Path
from transformers import AutoModelForCausalLM, AutoTokenizer
for name in ("base", "reverse", "initials", "double"):
    src, dst = Path(sys.argv[1]) / "models" / name, Path(sys.argv[2]) / name
    AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).save_pretrained(dst)
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)
"""


def real_models(workdir: Path, root: Path) -> tuple[Path, list[Path]]:
    """The real family's base and experts in bfloat16 under ``workdir/real`` (written once)."""
    target = workdir / "real"
    names = ("base", "reverse", "initials", "double")
    if not all((target / n / "model.safetensors").exists() for n in names):
        print(f"writing the real family of {root} in bfloat16 ...", flush=True)
        subprocess.run([sys.executable, "-c", REAL_BUILD, str(root), str(target)], check=True, capture_output=True)
    return target / "base", [target / n for n in names[1:]]


def shipped_config(path: Path, base: Path, sources: list[Path]) -> dict:
    """A ``configs/merge`` example with its model names replaced: the base model by ``base``, every other model
    name, in order of appearance, by the next of ``sources`` (cycling)."""
    spec = yaml.safe_load(path.read_text())
    names: dict[str, str] = {}
    if spec.get("base_model"):
        names[spec["base_model"]] = str(base)

    def walk(node: object) -> object:
        if isinstance(node, dict):
            out = {}
            for key, value in node.items():
                if key in ("model", "base_model") and isinstance(value, str):
                    if value not in names:
                        names[value] = str(sources[(len(names) - ("base_model" in spec)) % len(sources)])
                    out[key] = names[value]
                else:
                    out[key] = walk(value)
            return out
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return walk(spec)


def write_config(workdir: Path, name: str, base: Path, sources: list[Path]) -> Path:
    shipped = Path(__file__).resolve().parent.parent / "configs" / "merge" / f"{name}.yaml"
    if name.split("@")[0] in CONFIGS:
        spec = dict(CONFIGS[name.split("@")[0]])
        if spec.get("base_model"):
            spec["base_model"] = str(base)
        spec["models"] = [{"model": str(s)} for s in sources]
    else:
        spec = shipped_config(shipped, base, sources)
    spec["dtype"] = "bfloat16"
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


class ChildFailed(Exception):
    """A merge that exited non-zero; its message is the last line of the child's stderr."""


def run_child(argv: list[str]) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds, peak RSS in MB) of one child process, from its own rusage; ChildFailed if it
    exits non-zero."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode() if proc.stderr else ""
    if proc.returncode != 0:
        last = [line for line in err.splitlines() if line.strip()][-1:] or [f"exit code {proc.returncode}"]
        raise ChildFailed(last[0].strip()[:300])
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024  # Linux reports KiB


def best_of(runs: list[tuple[float, float, float]]) -> tuple[float, float, float]:
    """The fastest wall time, the smallest CPU time and the largest peak RSS of several runs."""
    walls, cpus, peaks = zip(*runs, strict=True)
    return min(walls), min(cpus), max(peaks)


def commands(tool: str, config: Path, out: Path) -> list[str]:
    if tool == "dam":
        return [sys.executable, "-m", "dam.cli", "merge", str(config), str(out), "--force", "--quiet"]
    mergekit = shutil.which("mergekit-yaml")
    if mergekit is None:
        raise SystemExit("mergekit-yaml not found: pip install mergekit==0.1.5")
    return [mergekit, str(config), str(out), "--no-write-model-card"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, help="keep models here between runs (default: a temporary folder)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--real", type=Path, help="the real demo family's folder (dam demo build --family smollm2)")
    parser.add_argument(
        "--methods",
        default="three",
        help="three (linear, ties, dare_ties), all (every configs/merge config) or a comma-separated list of names",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny models: the script runs (figures mean nothing)")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="dam-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        model = TINY_MODEL if args.smoke else MODEL
        base, sources = real_models(workdir, args.real) if args.real else build_models(workdir, model)
        model_mb = (sources[0] / "model.safetensors").stat().st_size / 1e6
        importing = [sys.executable, "-c", "import torch, safetensors, yaml, pydantic"]
        baseline = best_of([run_child(importing) for _ in range(args.repeats)])
        shapes = json.loads((sources[0] / "config.json").read_text())
        largest_mb = shapes["vocab_size"] * shapes["hidden_size"] * 2 / 1e6  # the embedding, in bfloat16
        print(f"models: 1 base + 3 sources, {model_mb:.0f} MB each (bfloat16), largest tensor {largest_mb:.0f} MB")
        if args.real:
            print(f"the real family of {args.real}: SmolLM2-135M-Instruct and three full fine-tunes")
        print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start; best of {args.repeats} runs")
        print(f"python + torch import alone: {baseline[0]:.1f} s, {baseline[2]:.0f} MB peak RSS\n")
        methods = list(CONFIGS)
        if args.methods == "all":
            methods = sorted(
                p.stem for p in (Path(__file__).resolve().parent.parent / "configs" / "merge").glob("*.yaml")
            )
        elif args.methods != "three":
            methods = args.methods.split(",")
        print(
            "| config (3 models) | mergekit s | dam s | speed-up | mergekit CPU s | dam CPU s | CPU ratio "
            "| mergekit peak MB | dam peak MB | RSS ratio |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|", flush=True)
        for name in methods:  # each row as soon as it is measured; a tool's failure is its row, not the end
            config = write_config(workdir, name, base, sources)
            runs: dict[str, list[tuple[float, float, float]]] = {"mergekit": [], "dam": []}
            failed: dict[str, str] = {}
            for _ in range(args.repeats):
                for tool, tool_runs in runs.items():
                    if tool in failed:
                        continue
                    try:
                        tool_runs.append(run_child(commands(tool, config, workdir / f"out-{tool}-{name}")))
                    except ChildFailed as e:
                        failed[tool] = str(e)
                    shutil.rmtree(workdir / f"out-{tool}-{name}", ignore_errors=True)
            if failed:
                done = {t: best_of(r) for t, r in runs.items() if t not in failed and r}
                cells = {t: f"{done[t][0]:.1f}" if t in done else "failed" for t in runs}
                reasons = "; ".join(f"{t} failed: {why}" for t, why in failed.items())
                print(f"| {name} | {cells['mergekit']} | {cells['dam']} | {reasons} | | | | | | |", flush=True)
                continue
            (mk_s, mk_cpu, mk_mb), (dam_s, dam_cpu, dam_mb) = best_of(runs["mergekit"]), best_of(runs["dam"])
            print(
                f"| {name} | {mk_s:.1f} | {dam_s:.1f} | {mk_s / dam_s:.2f}x | {mk_cpu:.1f} | {dam_cpu:.1f} | "
                f"{mk_cpu / dam_cpu:.2f}x | {mk_mb:.0f} | {dam_mb:.0f} | {dam_mb / mk_mb:.2f} |",
                flush=True,
            )

        print("\n| dam linear over | input size MB | dam peak MB | peak above import MB |")
        print("|---|---|---|---|")
        for n in (1, 2, 3):
            config = write_config(workdir, f"linear@{n}", base, sources[:n])
            scaling = []
            for _ in range(args.repeats):
                scaling.append(run_child(commands("dam", config, workdir / "out-scaling")))
                shutil.rmtree(workdir / "out-scaling")
            peak = best_of(scaling)[2]
            print(f"| {n} model(s) | {n * model_mb:.0f} | {peak:.0f} | {peak - baseline[2]:.0f} |")
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
