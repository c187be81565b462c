"""Time and peak memory of one DAM training step (cached teacher logits) for N = 2, 3, 4 sources against one plain
full-parameter fine-tuning step of one model of the same architecture, same batch and sequence length.

Builds a base and four perturbed fine-tunes of a ~27M-parameter Llama (hidden 512, 6 layers, vocab 8192) in a
work folder (kept for reruns), then runs each configuration in a fresh subprocess:

- DAM step (as ``dam.training.loop`` runs it): student forward through the wrapper, top-K KL against random cached
  teacher log-probabilities (K = 64), coefficient similarity, backward, clip, AdamW on the coefficients;
- plain step: the same architecture as an ordinary ``LlamaForCausalLM``, cross-entropy on the batch, backward,
  clip, AdamW on every parameter.

Each configuration runs ``--warmup`` steps, then ``--steps`` timed steps, and the configurations are run in
``--rounds`` interleaved rounds; the fastest round's median is reported (other tenants of a shared machine only
ever slow a round down). Time is wall time on GPU (synchronised) and this process's CPU time on CPU, which a
busy machine disturbs far less than wall time. Memory: the peak (``torch.cuda.max_memory_allocated`` on GPU; on
CPU the subprocess's peak RSS minus its RSS after imports and inputs, a cruder figure that includes allocator
slack) and the activations that autograd saves for backward in one forward (saved-tensor hooks, parameters
excluded), which is what "one model's activations" means.

    python benchmarks/step_time.py [--device cpu|cuda] [--workdir DIR] [--batch 1 --seq 256] [--threads N]

Rows also for N = 3 with ``pairing: all`` (cached top-K of every teacher for every sequence), and, with
``--memory-batches 1 2 4 8``, peak memory against the batch size for the plain step and for N = 3 with
full-vocabulary teachers run on the fly (pairing own and all, and own with ``train.gradient_checkpointing``): the
slope is the memory each sequence of a batch adds (``--memory-only``: that table alone). On CPU that peak RSS includes
what glibc's malloc keeps after frees (its heap returns only its top to the system); run the script with
``MALLOC_MMAP_THRESHOLD_=131072`` in the environment to give every block above 128 KiB its own mapping, returned
at free, so that the peak follows the tensors alive (the subprocesses inherit it).

``--shapes smollm2`` runs the same on SmolLM2-135M-Instruct's shapes (random weights: 30 layers, hidden 576,
vocabulary 49152, tied embeddings) for N = 2 and 3, cached top-K and teachers on the fly, and the layer-wise
alignment alone (``loss.align``, teachers on the fly: the real demo's objective).

Its figures are not part of the test suite (a test runs ``--shapes tiny``). Goals (issue 4): DAM at N = 3 at
most 1.3x the plain step; each added source at most 10% of a plain step; DAM peak memory about the sources plus one
model's activations. On the real shapes (issue 19): at most 1.10x at N = 3 with cached top-K; memory per added
sequence no more than the plain step's.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SHAPES = {
    # a ~27M-parameter Llama
    "small": dict(hidden_size=512, intermediate_size=1376, num_layers=6, num_heads=8, num_kv_heads=8, vocab_size=8192),
    # SmolLM2-135M-Instruct's shapes (the real demo family's), random weights: 134.5M parameters, tied embeddings
    "smollm2": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_layers=30,
        num_heads=9,
        num_kv_heads=3,
        vocab_size=49152,
        tied=True,
        max_position_embeddings=2048,
    ),
    # a smoke test of every kind in seconds (tests/test_benchmarks.py): its figures mean nothing
    "tiny": dict(
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=2,
        num_kv_heads=1,
        vocab_size=256,
        tied=True,
        max_position_embeddings=128,
    ),
}
MODEL = SHAPES["small"]  # the shapes of this run: main() and the workers set it from --shapes
TOP_K = 64
SOURCES = (2, 3, 4)
SHAPE_SOURCES = {"small": (2, 3, 4), "smollm2": (2, 3), "tiny": (2, 3)}
MIB = 2**20


def build_models(workdir: Path) -> tuple[Path, list[Path]]:
    from dam.testing import make_family

    root = workdir / "models"
    base, sources = root / "base", [root / f"source{i}" for i in range(max(SOURCES))]
    if not all((p / "model.safetensors").exists() for p in [base, *sources]):
        print(f"building a base and {max(SOURCES)} fine-tunes of a Llama with shapes {MODEL} ...", flush=True)
        base, sources = make_family(root, max(SOURCES), scale=0.01, **MODEL)
    return base, sources


def parse_kind(kind: str) -> tuple[int, str, bool, bool]:
    """``dam3`` (cached, own), ``dam3-all`` (cached, all), ``dam3-fly`` / ``dam3-fly-all`` (teachers on the fly),
    ``-ckpt`` (gradient checkpointing) -> (N, pairing, on the fly, checkpointing); ``plain`` -> (0, "own", False,
    False). ``-align`` (with ``-fly``): the layer-wise alignment alone (``loss.align: 1, loss.kl: 0``) instead of
    the KL."""
    if kind == "plain":
        return 0, "own", False, False
    parts = kind.split("-")
    return int(parts[0].removeprefix("dam")), "all" if "all" in parts else "own", "fly" in parts, "ckpt" in parts


def label(kind: str) -> str:
    n, pairing, on_the_fly, checkpointing = parse_kind(kind)
    if kind == "plain":
        return "plain fine-tune"
    text = f"DAM, N={n}, pairing {pairing}" + (", teachers on the fly" if on_the_fly else "")
    text += ", layer alignment alone (no KL)" if "align" in kind.split("-") else ""
    return text + (", gradient checkpointing" if checkpointing else "")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def make_batch(args: argparse.Namespace, device: torch.device, slots: int) -> dict[str, torch.Tensor]:
    """Random tokens and random cached top-K teacher log-probabilities, shaped as
    ``dam.training.data.DataCollator`` makes them: teacher tensors [B, S, T, K], S = 1 (``pairing: own``, every row
    source 0) or N (``pairing: all``, every row ``ALL_SOURCES``)."""
    from dam.training.data import ALL_SOURCES

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(4, MODEL["vocab_size"], (args.batch, args.seq), generator=gen)
    logits = torch.randn(args.batch, slots, args.seq, TOP_K, generator=gen).sort(dim=-1, descending=True).values
    indices = torch.stack([torch.randperm(MODEL["vocab_size"], generator=gen)[:TOP_K] for _ in range(args.seq)])
    batch = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": ids.clone(),
        "source": torch.full((args.batch,), 0 if slots == 1 else ALL_SOURCES, dtype=torch.long),
        "teacher_logprobs": torch.log_softmax(logits, dim=-1),
        "teacher_indices": indices.expand(args.batch, slots, -1, -1).contiguous(),
    }
    return {k: v.to(device) for k, v in batch.items()}


def worker(args: argparse.Namespace) -> None:
    """One configuration in this process; prints a JSON line with the median step time and the peak memory."""
    from transformers import AutoModelForCausalLM

    from dam.adaptive.losses import coefficient_losses, layer_alignment, token_weights
    from dam.adaptive.model import DAMModel
    from dam.adaptive.options import DAMOptions
    from dam.training.data import ALL_SOURCES
    from dam.training.loop import _Teachers, distillation_loss, loss_mask, teacher_targets

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    n, pairing, on_the_fly, checkpointing = parse_kind(args.worker)
    batch = make_batch(args, device, n if pairing == "all" and not on_the_fly else 1)
    if on_the_fly:
        del batch["teacher_logprobs"], batch["teacher_indices"]
    tokens = float((batch["labels"][:, 1:] != -100).sum())
    baseline = rss_bytes()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    base = Path(args.base)
    if args.worker == "plain":
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).to(device)
        model.config.use_cache = False
        params = list(model.parameters())

        def loss_fn() -> torch.Tensor:
            return model(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels")}).loss

    else:
        model = DAMModel.from_pretrained(str(base), args.sources[:n], DAMOptions(), dtype=dtype, device=device)
        model.model.config.use_cache = False
        if checkpointing:
            model.enable_gradient_checkpointing()
            model.train()
        params = model.trainable_coefficients()
        if pairing == "all":
            batch["source"].fill_(ALL_SOURCES)
        teachers = _Teachers(model, model) if on_the_fly else None

        def align_fn() -> torch.Tensor:  # loss.align alone: the teachers' layer states, no head, no KL
            targets = teacher_targets(batch, teachers, n, 2.0, None, layers=True, kl=False)
            weights, count = token_weights(loss_mask(batch["labels"]).float(), batch["labels"].shape, device)
            layer_loss = functools.partial(layer_alignment, teacher=targets["layers"], weights=weights, count=count)
            inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
            _, aligned = model(**inputs, layer_loss=layer_loss)  # (L,): the objective is the mean over layers
            return aligned.mean() + sum(coefficient_losses(model.coefficients(), similarity=0.01).values())

        def loss_fn() -> torch.Tensor:  # as dam.training.loop._step: teachers first, then the student with the loss
            if "align" in args.worker.split("-"):
                return align_fn()
            # on the fly: full-vocabulary teachers (no top-K); cached: the batch's random top-K targets
            targets = teacher_targets(batch, teachers, n, 2.0, None)
            chunk_loss, total = distillation_loss(batch["labels"], targets, 2.0, None, model.source_logits)
            inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
            kl = model(**inputs, chunk_loss=chunk_loss) * total / tokens
            return kl + sum(coefficient_losses(model.coefficients(), similarity=0.01).values())

    optimizer = torch.optim.AdamW(params, lr=1e-5)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")

    def step() -> None:
        with autocast:
            loss = loss_fn()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    clock = time.perf_counter if device.type == "cuda" else time.process_time
    times = []
    for i in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = clock()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(clock() - start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - baseline
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    record = {"step_s": statistics.median(times), "peak_bytes": peak, "weights_bytes": weights}
    print(json.dumps(record | {"activation_bytes": saved_activation_bytes(model, loss_fn, autocast)}))


def saved_activation_bytes(model: torch.nn.Module, loss_fn, autocast) -> int:
    """Bytes autograd saves for backward in one forward and loss, parameters (saved by reference) excluded."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in parameters:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        loss_fn()
    return sum(saved.values())


def run(kind: str, args: argparse.Namespace, base: Path, sources: list[Path], batch: int | None = None) -> dict:
    command = [sys.executable, __file__, "--worker", kind, "--base", str(base), "--sources", *map(str, sources)]
    command += ["--device", args.device, "--dtype", args.dtype, "--batch", str(batch or args.batch)]
    command += ["--seq", str(args.seq), "--shapes", getattr(args, "shapes", "small")]
    command += ["--warmup", str(args.warmup), "--steps", str(args.steps), "--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default=None, choices=["fp32", "bf16"], help="default: bf16 on cuda, fp32 on cpu")
    parser.add_argument("--workdir", type=Path, default=None, help="default: dam_step_time[_smollm2] in /tmp")
    parser.add_argument(
        "--shapes",
        choices=sorted(SHAPES),
        default="small",
        help="model shapes: small (~27M, the default) or smollm2 (SmolLM2-135M's: 30 layers, vocabulary 49152, "
        "tied; N = 2 and 3, cached top-K and teachers on the fly); tiny: smollm2's kinds on a 2-layer model, a "
        "smoke test whose figures mean nothing",
    )
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads per run (0: torch's default)")
    parser.add_argument(
        "--memory-batches",
        type=int,
        nargs="*",
        default=[],
        help="also measure peak memory against the batch size (e.g. 1 2 4 8) for the plain step and for N=3 with "
        "full-vocabulary teachers on the fly, pairing own and all, and own with gradient checkpointing (one round "
        "each)",
    )
    parser.add_argument("--memory-only", action="store_true", help="only the memory-vs-batch table")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--base", help=argparse.SUPPRESS)
    parser.add_argument("--sources", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    global MODEL, SOURCES
    MODEL, SOURCES = SHAPES[args.shapes], SHAPE_SOURCES[args.shapes]
    suffix = "" if args.shapes == "small" else f"_{args.shapes}"
    args.workdir = args.workdir or Path(tempfile.gettempdir()) / f"dam_step_time{suffix}"
    if args.worker:
        worker(args)
        return
    base, sources = build_models(args.workdir)
    if args.memory_only:
        memory_table(args, base, sources)
        return
    print(
        f"device {args.device}, {args.dtype}, batch {args.batch} x {args.seq} tokens, K={TOP_K}, threads "
        f"{args.threads or torch.get_num_threads()}: best of {args.rounds} rounds of a median of {args.steps} steps "
        f"after {args.warmup} warm-up ({'wall' if args.device == 'cuda' else 'CPU'} time)",
        flush=True,
    )
    kinds = ["plain", *(f"dam{n}" for n in SOURCES), "dam3-all"]
    if args.shapes != "small":  # the real family's issue: cached top-K and teachers on the fly, N = 2 and 3
        kinds = ["plain", *(f"dam{n}" for n in SOURCES), *(f"dam{n}-fly" for n in SOURCES)]
        kinds += [f"dam{n}-fly-align" for n in SOURCES]  # the real demo's objective (loss.align alone)
    rounds = [{kind: run(kind, args, base, sources) for kind in kinds} for _ in range(args.rounds)]
    best = {kind: min((r[kind] for r in rounds), key=lambda m: m["step_s"]) for kind in kinds}
    plain = best["plain"]
    print(
        "\n| step (cached top-K teachers) | time (s) | x plain | peak memory (MiB) | weights (MiB) "
        "| saved activations (MiB) |"
    )
    print("|---|---|---|---|---|---|")
    for kind in kinds:
        r = best[kind]
        print(
            f"| {label(kind)} | {r['step_s']:.3f} | {r['step_s'] / plain['step_s']:.2f} | "
            f"{r['peak_bytes'] / MIB:.0f} | {r['weights_bytes'] / MIB:.0f} | {r['activation_bytes'] / MIB:.0f} |"
        )
    ratio3 = best["dam3"]["step_s"] / plain["step_s"]
    added = [(best[f"dam{n + 1}"]["step_s"] - best[f"dam{n}"]["step_s"]) / plain["step_s"] for n in SOURCES[:-1]]
    goal = 1.10 if args.shapes == "smollm2" else 1.30  # issue 19 on the real shapes, issue 4 on the small ones
    print(f"\nDAM N=3 / plain: {ratio3:.2f} (goal <= {goal:.2f}): {'met' if ratio3 <= goal else 'MISSED'}")
    print(
        f"each added source, in plain steps: {', '.join(f'{a:+.3f}' for a in added)} (goal <= 0.10): "
        f"{'met' if max(added) <= 0.10 else 'MISSED'}"
    )
    spread = {k: max(r[k]["step_s"] for r in rounds) / best[k]["step_s"] for k in kinds}
    print("slowest/fastest round: " + ", ".join(f"{k} {v:.2f}" for k, v in spread.items()))
    if args.memory_batches:
        memory_table(args, base, sources)


def memory_table(args: argparse.Namespace, base: Path, sources: list[Path]) -> None:
    """Peak memory against the batch size: the plain fine-tuning step (the baseline, same batches) and DAM at N=3
    with full-vocabulary teachers on the fly (on the real shapes also the layer-wise alignment alone); the
    per-sequence growth is the least-squares slope of peak memory over the batch sizes."""
    batches = sorted(args.memory_batches)
    print(f"\n| {args.seq} tokens a sequence | " + " | ".join(f"batch {b}" for b in batches), end="")
    print(" | MiB per sequence | CPU s per 1k tokens |")
    print("|---" * (len(batches) + 3) + "|")
    kinds = ["plain", "dam3-fly", "dam3-fly-all", "dam3-fly-ckpt"]
    kinds += ["dam3-fly-align"] if args.shapes != "small" else []  # the real demo's objective (loss.align alone)
    for kind in kinds:
        runs = [run(kind, args, base, sources, batch=b) for b in batches]
        peaks = [r["peak_bytes"] / MIB for r in runs]
        mean_b, mean_p = statistics.mean(batches), statistics.mean(peaks)
        slope = sum((b - mean_b) * (p - mean_p) for b, p in zip(batches, peaks, strict=True)) / max(
            sum((b - mean_b) ** 2 for b in batches), 1e-9
        )
        per_token = statistics.mean(r["step_s"] / (b * args.seq) * 1000 for r, b in zip(runs, batches, strict=True))
        cells = " | ".join(f"{p:.0f} MiB" for p in peaks)
        print(f"| {label(kind).removeprefix('DAM, N=3, ')} | {cells} | {slope:.1f} | {per_token:.2f} |")


if __name__ == "__main__":
    main()
