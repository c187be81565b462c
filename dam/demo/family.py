"""The offline demo family: a tiny character-level base LM and experts fine-tuned from it on distinct skills.

Everything is built on CPU from a seed, with no download. The tasks (``generic``, the base's pre-training data,
and the skills ``reverse``, ``sort``, ``shift``) are :mod:`dam.demo.tasks`.

Skill words have 3-6 lowercase letters. Each expert is fine-tuned on its skill's data plus a little ``generic``
replay, at a small learning rate, so it keeps the base's abilities as real fine-tunes keep general ability.

:func:`build_demo` writes the datasets to ``<root>/<task>/{train,validation,test}.jsonl`` (fields ``prompt``,
``response``, ``task`` and ``text = prompt + response``; no prompt is in two splits), pre-trains a small
``LlamaForCausalLM`` on ``generic``, fine-tunes one full copy of it per skill (short schedule, small learning rate,
so the experts stay fine-tunes of one base), and saves them as Hugging Face folders ``<root>/models/{base,<skill>}``
with the tokenizer. It then scores every model on every task with :mod:`dam.evaluation.evaluate` (each expert should be
strong on its own skill only), measures the experts' kinship (:mod:`dam.evaluation.kinship`), and records it all in
``<root>/models/build_report.json``.

Token format, shared with :func:`dam.evaluation.evaluate.encode_example`: ``<s> prompt response </s>``, the
tokenizer adding ``<s>``. Training uses the loss on response tokens (and ``</s>``) only. Rendering the data for DAM
training with the plain template ``{prompt}{response}`` reproduces that format exactly.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from dam.demo.tasks import GENERIC, SKILLS, write_datasets
from dam.errors import DamError
from dam.evaluation.evaluate import encode_example, evaluate_model, format_table, load_tasks
from dam.evaluation.kinship import model_kinship
from dam.io.json_files import save_tokenizer
from dam.io.writer import atomic_output_dir

logger = logging.getLogger(__name__)


@dataclass
class DemoSettings:
    """Model size and training schedule of the demo family."""

    hidden_size: int = 128
    intermediate_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    base_steps: int = 1000
    """Optimizer steps of base pre-training on ``generic``."""
    expert_steps: int = 500
    """Optimizer steps of each expert's full fine-tune on its skill."""
    batch_size: int = 64
    base_lr: float = 3e-3
    expert_lr: float = 3e-4
    replay: int = 500
    """``generic`` training examples mixed into each expert's data, so that experts keep the format and the base's
    skills as real fine-tunes keep general ability (0 fine-tunes on the skill alone)."""
    warmup_steps: int = 30
    """Linear warm-up steps of every schedule (then cosine decay to 0)."""
    n_train: int = 2000
    """Training examples per skill."""
    n_train_generic: int = 16000
    """Training examples of ``generic`` (pre-training needs more variety than a fine-tune)."""
    n_validation: int = 200
    """Validation examples per task: settings (of merges, of training) are chosen on them."""
    n_test: int = 200
    """Test examples per task: the figures are reported on them."""
    eval_batch_size: int = 100
    threads: int = 2
    """CPU threads torch uses while building (restored afterwards)."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            zero_ok = f.name in ("base_steps", "expert_steps", "warmup_steps", "replay")
            if value < 0 or (value == 0 and not zero_ok):
                raise DamError(f"demo setting {f.name}={value!r} must be {'>= 0' if zero_ok else '> 0'}")
        if self.hidden_size % self.num_heads:
            raise DamError(f"demo setting hidden_size={self.hidden_size} must be a multiple of num_heads")


def demo_tokenizer() -> Any:
    """The character tokenizer of :mod:`dam.testing`, adding ``<s>`` in front of every encoded text."""
    from tokenizers import processors

    from dam.testing import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    bos = (tokenizer.bos_token, tokenizer.bos_token_id)
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[bos])
    return tokenizer


def demo_config(tokenizer: Any, settings: DemoSettings) -> Any:
    """An untied ``LlamaConfig`` sized by ``settings`` over the tokenizer's vocabulary."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=settings.hidden_size,
        intermediate_size=settings.intermediate_size,
        num_hidden_layers=settings.num_layers,
        num_attention_heads=settings.num_heads,
        num_key_value_heads=settings.num_heads,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def collate(pairs: Sequence[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids`` (B, T) and ``labels`` (B, T): response tokens, -100 on prompt and padding."""
    width = max(len(p) + len(r) for p, r in pairs)
    ids = torch.full((len(pairs), width), pad_id, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    for i, (p, r) in enumerate(pairs):
        ids[i, : len(p) + len(r)] = torch.tensor(p + r)
        labels[i, len(p) : len(p) + len(r)] = torch.tensor(r)
    return ids, labels


def learning_rate(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up to ``peak`` over ``warmup`` steps, then cosine decay to 0 at ``steps``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


def _batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[list[int]]:
    """Endless shuffled epochs of example indices, ``batch_size`` at a time (the last partial batch dropped)."""
    while True:
        order = torch.randperm(n, generator=generator).tolist()
        for start in range(0, n - batch_size + 1, batch_size):
            yield order[start : start + batch_size]


def _mixed_batches(n: int, n_replay: int, batch_size: int, per_batch: int, seed: int) -> Iterator[list[int]]:
    """Batches of ``batch_size`` indices into ``n`` examples followed by ``n_replay`` replayed ones: ``per_batch``
    of each batch from the replayed (their own shuffled epochs), the rest from the examples. With ``per_batch`` 0
    these are :func:`_batches`' (the same seed gives the same batches)."""
    generator = torch.Generator().manual_seed(seed)
    batches = _batches(n, min(batch_size - per_batch, n), generator)
    if not per_batch:
        yield from batches
        return
    replayed = _batches(n_replay, per_batch, generator)
    for batch in batches:
        yield batch + [n + i for i in next(replayed)]


def train_lm(
    model: torch.nn.Module,
    tokenizer: Any,
    examples: Sequence[dict[str, str]],
    *,
    steps: int,
    lr: float,
    batch_size: int,
    warmup_steps: int,
    seed: int,
    desc: str = "train",
    progress: bool = True,
    bar_position: int | None = None,
    chat: bool = False,
    freeze_embeddings: bool = False,
    replay: Sequence[dict[str, str]] = (),
    replay_per_batch: int = 0,
) -> list[float]:
    """Full fine-tuning with AdamW (no weight decay) on the response tokens; returns the loss of every step.

    ``chat``: examples in the tokenizer's chat format (:func:`dam.evaluation.evaluate.encode_example`).
    ``freeze_embeddings``: the input embedding (and so a ``lm_head`` tied to it) is not trained.
    ``replay``, ``replay_per_batch``: each batch holds ``replay_per_batch`` of these examples (shuffled epochs of
    their own) and ``batch_size - replay_per_batch`` of ``examples``. ``bar_position``: the progress bar's terminal
    line (:func:`dam.progress.progress_bar`)."""
    from dam.progress import progress_bar

    if replay_per_batch and not 0 < replay_per_batch < batch_size:
        raise ValueError(
            f"replay_per_batch={replay_per_batch} must be between 1 and batch_size - 1 ({batch_size - 1})"
        )
    if replay_per_batch and len(replay) < replay_per_batch:
        raise ValueError(f"{len(replay)} replay examples for {replay_per_batch} per batch")
    replay = replay if replay_per_batch else ()
    encoded = [encode_example(tokenizer, ex["prompt"], ex["response"], chat=chat) for ex in [*examples, *replay]]
    batches = _mixed_batches(len(examples), len(replay), batch_size, replay_per_batch, seed)
    if freeze_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    bar = progress_bar(range(steps), desc=desc, enabled=progress, position=bar_position)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, lr, warmup_steps)
        ids, labels = collate([encoded[i] for i in next(batches)], tokenizer.pad_token_id)
        logits = model(input_ids=ids, attention_mask=(ids != tokenizer.pad_token_id).long()).logits  # (B, T, V)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    model.eval()
    return losses


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """This process's torch at ``threads`` threads inside the block (the previous count restored after)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextlib.contextmanager
def _build_environment(threads: int) -> Iterator[None]:
    """``threads`` torch threads, and no transformers progress bar per saved or loaded tiny model, inside the block."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with torch_threads(threads):
            yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def build_demo(
    root: str | Path = "data/demo",
    seed: int = 0,
    *,
    skills: Sequence[str] = tuple(SKILLS),
    settings: DemoSettings | None = None,
    force: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Build the demo family under ``root`` (datasets, ``models/{base,<skill>}``, ``models/build_report.json``).

    Refuses an existing non-empty ``root/models`` unless ``force``; the models folder is replaced only when the
    whole build succeeds. Returns the report: settings, paths (relative to ``root``), accuracy and loss of every
    model on every task's test split, the experts' pairwise kinship, and the seconds each phase took.
    """
    settings = settings or DemoSettings()
    unknown = [s for s in skills if s not in SKILLS]
    if unknown or not skills or len(set(skills)) != len(skills):
        raise DamError(f"demo skills {list(skills)}: choose distinct skills among {', '.join(SKILLS)}")
    root = Path(root)
    from transformers import LlamaForCausalLM

    start = time.perf_counter()
    seconds: dict[str, float] = {}
    with _build_environment(settings.threads), atomic_output_dir(root / "models", force=force) as tmp:
        data = write_datasets(
            root,
            seed=seed,
            skills=skills,
            n_train=settings.n_train,
            n_train_generic=settings.n_train_generic,
            n_validation=settings.n_validation,
            n_test=settings.n_test,
        )
        tokenizer = demo_tokenizer()
        torch.manual_seed(seed)
        model = LlamaForCausalLM(demo_config(tokenizer, settings))
        n_params = sum(p.numel() for p in model.parameters())
        logger.info(
            "demo: pre-training a %d-parameter base on %r for %d steps", n_params, GENERIC, settings.base_steps
        )

        generic = load_tasks([data[GENERIC]["train"]])[0].examples

        def fit(task: str, steps: int, lr: float, phase_seed: int) -> None:
            t0 = time.perf_counter()
            if task == GENERIC:
                train = generic
            else:
                train = load_tasks([data[task]["train"]])[0].examples + generic[: settings.replay]
            kwargs = {"batch_size": settings.batch_size, "warmup_steps": settings.warmup_steps, "seed": phase_seed}
            losses = train_lm(model, tokenizer, train, steps=steps, lr=lr, desc=task, progress=progress, **kwargs)
            seconds[task] = time.perf_counter() - t0
            final = f", final loss {sum(losses[-10:]) / len(losses[-10:]):.4f}" if losses else ""
            logger.info("demo: trained on %r in %.1f s (%d steps%s)", task, seconds[task], steps, final)

        fit(GENERIC, settings.base_steps, settings.base_lr, seed)
        model.save_pretrained(tmp / "base")
        save_tokenizer(tokenizer, tmp / "base")
        base_state = {k: v.clone() for k, v in model.state_dict().items()}
        for i, skill in enumerate(skills):
            model.load_state_dict(base_state)
            fit(skill, settings.expert_steps, settings.expert_lr, seed * 1000 + i + 1)
            model.save_pretrained(tmp / skill)
            save_tokenizer(tokenizer, tmp / skill)

        t0 = time.perf_counter()
        tasks = load_tasks([data[t]["test"] for t in data])
        results = []
        for name in ["base", *skills]:
            result = evaluate_model(tmp / name, tasks, batch_size=settings.eval_batch_size, name=name)
            accuracies = ", ".join(f"{t.task} {t.accuracy:.1f}%" for t in result.tasks)
            logger.info("demo: %s accuracy: %s", name, accuracies)
            results.append(result)
        seconds["eval"] = time.perf_counter() - t0
        kinship = {}
        for i, a in enumerate(skills):
            for b in skills[i + 1 :]:
                k = model_kinship(tmp / a, tmp / b, tmp / "base")
                kinship[f"{a}|{b}"] = k.overall.to_dict()
        seconds["total"] = time.perf_counter() - start
        report = {
            "seed": seed,
            "skills": list(skills),
            "settings": asdict(settings),
            "parameters": n_params,
            "models": {name: f"models/{name}" for name in ["base", *skills]},
            "datasets": {t: {s: str(p.relative_to(root)) for s, p in splits.items()} for t, splits in data.items()},
            "accuracy": {r.model: {t.task: t.accuracy for t in r.tasks} for r in results},
            "loss": {r.model: {t.task: t.loss for t in r.tasks} for r in results},
            "kinship": kinship,
            "seconds": seconds,
            "versions": {"torch": torch.__version__, "transformers": _transformers_version()},
            "cpu": cpu_model(),
        }
        (tmp / "build_report.json").write_text(json.dumps(report, indent=2) + "\n")
    logger.info(
        "demo: built in %.1f s; test accuracy of every model on every task:\n%s",
        seconds["total"],
        format_table(results),
    )
    logger.info("demo: kinship of the experts' task vectors:\n%s", format_kinship_matrix(report))
    return report


SHIPPED_FAMILY = Path(__file__).resolve().parent / "toy_family"
"""The toy family as ``dam demo build`` (seed 0, default :class:`DemoSettings`) made it, shipped as package data:
``base`` and the experts (safetensors, config, tokenizer) and ``build_report.json``, about 11 MB."""


def install_shipped_family(root: str | Path) -> dict[str, Any]:
    """Put the shipped toy family (:data:`SHIPPED_FAMILY`) under ``root``, so that a run needs no build: the seed-0
    datasets (written only if a file is missing; they are the committed ``data/demo`` files) and a copy of the
    models in ``root/models`` (written atomically). Returns the shipped build report."""
    import shutil

    report_file = SHIPPED_FAMILY / "build_report.json"
    if not report_file.is_file():
        raise DamError(
            f"the shipped demo family {SHIPPED_FAMILY} is missing (package data of dam.demo: reinstall dam)"
        )
    report = json.loads(report_file.read_text())
    root = Path(root)
    splits = [root / path for task in report["datasets"].values() for path in task.values()]
    if not all(p.is_file() for p in splits):
        settings = DemoSettings(**report["settings"])
        write_datasets(
            root,
            seed=report["seed"],
            skills=report["skills"],
            n_train=settings.n_train,
            n_train_generic=settings.n_train_generic,
            n_validation=settings.n_validation,
            n_test=settings.n_test,
        )
    with atomic_output_dir(root / "models") as tmp:
        for name in report["models"]:
            shutil.copytree(SHIPPED_FAMILY / name, tmp / name)
        shutil.copy2(report_file, tmp / "build_report.json")
    logger.info("demo: installed the shipped toy family (built by `dam demo build`) in %s", root / "models")
    return report


def cpu_model() -> str:
    """This machine's CPU model name (``/proc/cpuinfo``; :func:`platform.processor` elsewhere): float results of the
    same code and versions are bit for bit the same on the same CPU model, not across models."""
    import platform

    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def format_kinship_matrix(report: dict[str, Any]) -> str:
    """The experts' pairwise task-vector cosine and Pearson similarity from a build report, as aligned lines."""
    lines = []
    width = max(len(pair) for pair in report["kinship"]) if report["kinship"] else 0
    for pair, s in report["kinship"].items():
        cosine = "nan" if s["cosine"] is None else f"{s['cosine']:+.4f}"
        pearson = "nan" if s["pearson"] is None else f"{s['pearson']:+.4f}"
        rel_a = s["norm_a"] / s["norm_base"]
        rel_b = s["norm_b"] / s["norm_base"]
        a, b = pair.split("|")
        lines.append(
            f"{a + ' vs ' + b:<{width + 3}}  cosine {cosine}  pearson {pearson}  "
            f"|{a}-base|/|base| {rel_a:.4f}  |{b}-base|/|base| {rel_b:.4f}"
        )
    return "\n".join(lines)
