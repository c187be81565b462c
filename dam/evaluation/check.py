"""``dam check CONFIG``: will this merge work? Every check that can fail a merge, run before the expensive step.

CONFIG is a merge YAML (what ``dam merge`` reads, multi-document recipes included) or a DAM run config (what
``dam train`` reads); which one is told from its keys (``merge_method``: a merge). ``command`` (default: the
config's own) picks whose refusals and estimate apply: a DAM config checked for ``merge`` is read as
``task_arithmetic`` of its models over its base (weight 1/N each), a merge config checked for ``train`` as DAM over
its ``base_model`` with the run defaults of :class:`dam.training.config.DAMConfig`.

What is checked, for each merge (each document of a recipe whose inputs exist) or DAM run:

- **compatibility** (headers and ``config.json`` only): exactly what the command refuses before it reads a weight.
  ``merge``: :func:`dam.merge.engine.plan_merge` (architectures, vocabulary sizes unless a ``tokenizer:`` section
  rebuilds them, tensor names, shapes and dtypes, the ``config.json`` fields that change the forward, every
  parameter). ``train``: :func:`refuse_training` (:func:`dam.adaptive.checks.check_configs`: architectures and
  every forward field, ``vocab_size`` and ``tie_word_embeddings`` included; and the sources' tokenizers against
  the base's, :func:`dam.training.data.check_vocabularies`). ``dam merge`` and ``dam train`` run the same checks
  first, so they stop on these before any heavy work.
- **models**: per model its architecture, ``vocab_size``, embedding rows, ``tie_word_embeddings``, tokenizer
  size (``tokenizer.json``), stored dtypes, parameters and weight bytes on disk.
- **NaN/Inf**: every floating tensor of every model read once, one tensor of each model at a time.
- **task vectors** (needs a base): ``tau_k = source_k - base`` over the tensors every source shares with the base
  (same shape). Pairwise cosine (:class:`dam.evaluation.kinship.SimilaritySums`, overall and per group), each
  source's ``|tau_k| / |base|``, and the **sign conflicts** TIES resolves: the fraction of parameters whose task
  vectors have both signs (some positive, some negative entry), overall, per group (embeddings, attention, mlp,
  norms, other) and per decoder layer. For S sources moved independently the chance level is ``1 - 2^(1 - S)``
  (0.5 for two). The same pass reads the tensors for the NaN scan; dot products are float32 per tensor.
- **estimate** of peak memory and disk, compared with this machine's available RAM:

  - ``merge``: the engine streams two tensors at a time, each as float32 copies of its M inputs plus its result
    and the method's scratch: ``peak = RUNTIME + sum over the two largest output tensors of numel * 4 * (M + 2)``;
    ``disk = sum of the output tensors' bytes`` (each document of a recipe).
  - ``train``: the wrapper holds the N sources frozen in ``dtype`` (b bytes) plus one model's activations
    (DAM saves those of one plain model): ``peak = RUNTIME + N * P * b + B * T * A * b`` with P the base's
    parameters, B ``train.batch_size``, T ``data.max_length``, and per token ``A = L * (12 h + 4 i)`` (L layers,
    hidden h, intermediate i), or ``A = L h + 12 h + 4 i`` with ``train.gradient_checkpointing``;
    ``disk = P * b`` (the export; checkpoints hold coefficients only, a teacher cache is not counted). With
    ``train.shard_sources`` the sources' term is split over the processes: not modelled.

  ``RUNTIME`` is 0.3 GB (Python and torch) for a merge, 1 GB (with transformers and accelerate) for training.
  Available memory is ``MemAvailable`` of ``/proc/meminfo`` (CPU RAM; a GPU's memory is not compared).

**Verdict**: ``refuse`` when a compatibility check fails, a model cannot be opened or a tensor holds NaN/Inf;
``warn`` for sign conflicts above halfway from chance to total (``conflicts >= chance + (1 - chance) / 2``), a
pair of task vectors with cosine <= -0.5, floating dtypes that differ between models, a tokenizer with more tokens
than its embedding has rows, or an estimated peak memory above the available RAM; else ``ok``.

**JSON** (``--json``; these keys are stable)::

    {"config": str, "kind": "merge" | "train", "command": "merge" | "train",
     "verdict": "ok" | "warn" | "refuse",
     "reasons": [{"level": "warn" | "refuse", "check": str, "message": str}],
     "targets": [{"name": str | null, "skipped": str | null,
                  "models": [{"model", "role", "path", "architectures", "model_type", "vocab_size",
                              "embedding_rows", "tie_word_embeddings", "tokenizer_vocab", "dtypes",
                              "parameters", "disk_bytes", "nonfinite": [tensor names]}],
                  "task_vectors": null | {"base", "sources", "relative_norms": {model: float},
                                          "kinship": [{"a", "b", "cosine", "by_group": {group: cosine}}],
                                          "sign_conflicts": {"chance", "overall", "by_group", "by_layer"}},
                  "estimate": null | {"command", "peak_memory_bytes", "disk_bytes",
                                      "available_memory_bytes", "formula"}}]}

``check`` names: ``models``, ``compatibility``, ``nonfinite``, ``sign_conflicts``, ``kinship``, ``dtypes``,
``vocabulary``, ``memory``. A target's ``name`` is its recipe document's (null: the final or only merge, or the
DAM run); ``skipped`` says why a recipe document was not checked (it uses an intermediate not built yet). Cosines
of a constant task vector are null.

**Exit status** of ``dam check``: 0 for ok and warn, 2 for refuse, 1 when the config itself cannot be read
(an ``error:`` line, as every command).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import yaml

from dam.errors import DamError
from dam.evaluation.kinship import SimilaritySums, layer_index
from dam.io.checkpoint import TOKENIZER_FILES, CheckpointReader, dtype_name, parse_dtype, resolve_model_path
from dam.io.gguf import gguf_source
from dam.io.lora import split_reference
from dam.merge.config import MergeConfig, load_merge_config, parse_merge_config
from dam.merge.engine import MergePlan, plan_merge
from dam.merge.multi import plan_merge_steps
from dam.training.config import DAMConfig, DataConfig, TrainConfig, load_config

Command = Literal["merge", "train"]
GROUPS = ("embeddings", "attention", "mlp", "norms", "other")
_RUNTIME = {"merge": 3 * 10**8, "train": 10**9}
_MERGE_WORKERS = 2  # tensors in flight in dam.merge.engine.run_merge (its default)
_OPPOSITE_COSINE = -0.5
_EMBEDDING = re.compile(r"(embed_tokens|wte|word_embeddings|embed_in)\.weight$")


@dataclass
class Reason:
    """One finding that moves the verdict: ``level`` warn or refuse, ``check`` the check's name."""

    level: Literal["warn", "refuse"]
    check: str
    message: str


@dataclass
class ModelReport:
    """What one model's config.json, tokenizer and headers say, and the tensors the scan found non-finite."""

    model: str
    role: str  # base, source (a merge's or DAM's), or model (a merge without base_model)
    path: str
    architectures: list[str] | None
    model_type: str | None
    vocab_size: int | None
    embedding_rows: int | None
    tie_word_embeddings: bool | None
    tokenizer_vocab: int | None
    dtypes: list[str]
    parameters: int
    disk_bytes: int
    nonfinite: list[str] = field(default_factory=list)


@dataclass
class TaskVectorReport:
    """Kinship and sign conflicts of the sources' task vectors against ``base``."""

    base: str
    sources: list[str]
    relative_norms: dict[str, float | None]
    kinship: list[dict[str, Any]]
    sign_conflicts: dict[str, Any]


@dataclass
class Estimate:
    """Estimated peak memory and disk of ``command`` (formulas in the module docstring)."""

    command: Command
    peak_memory_bytes: int
    disk_bytes: int
    available_memory_bytes: int | None
    formula: str


@dataclass
class TargetReport:
    """One merge (a recipe document) or DAM run."""

    name: str | None
    skipped: str | None = None
    models: list[ModelReport] = field(default_factory=list)
    task_vectors: TaskVectorReport | None = None
    estimate: Estimate | None = None


@dataclass
class CheckReport:
    """The result of :func:`check_config`."""

    config: str
    kind: Command
    command: Command
    reasons: list[Reason]
    targets: list[TargetReport]

    @property
    def verdict(self) -> Literal["ok", "warn", "refuse"]:
        levels = {r.level for r in self.reasons}
        return "refuse" if "refuse" in levels else "warn" if levels else "ok"

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config,
            "kind": self.kind,
            "command": self.command,
            "verdict": self.verdict,
            "reasons": [asdict(r) for r in self.reasons],
            "targets": [asdict(t) for t in self.targets],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


# -------------------------------------------------------------------------------------------- the checks


def refuse_training(config: DAMConfig) -> None:
    """``dam train``'s refusals that need no weight read: the sources' config.json against the base's
    (:func:`dam.adaptive.checks.check_configs`) and their tokenizers' vocabularies against the base's
    (:func:`dam.training.data.check_vocabularies`), and an objective blind to a tied head
    (:meth:`dam.training.config.DAMConfig.refuse_blind_tied_head`). Raises the first as a DamError; ``dam train``
    calls it before it creates the run folder."""
    _refuse_dam_sources(config.base_model, [(m.name, m.model) for m in config.models], config)


def _refuse_dam_sources(base: str, sources: list[tuple[str, str]], settings: DAMConfig | None = None) -> None:
    from dam.adaptive.checks import check_configs, load_source_config
    from dam.training.data import check_vocabularies, load_tokenizer

    base_config = load_source_config(base, "base")
    if settings is not None:
        settings.refuse_blind_tied_head(bool(getattr(base_config, "tie_word_embeddings", False)))
    models = [model for _, model in sources]
    check_configs(base, base_config, models, [load_source_config(m, "source") for m in models])
    own = {
        name: load_tokenizer(model, f"model {name!r}")
        for name, model in sources
        if any((resolve_model_path(model) / f).exists() for f in TOKENIZER_FILES)
    }
    check_vocabularies(load_tokenizer(base, "base"), own)


def layer_group(name: str) -> str:
    """The group of a tensor for the sign-conflict breakdown: one of :data:`GROUPS`."""
    lower = name.lower()
    if "norm" in lower or re.search(r"(^|\.)ln_", lower):
        return "norms"
    if re.search(r"embed|\bwte\b|\bwpe\b|lm_head", lower):
        return "embeddings"
    if "attn" in lower or "attention" in lower:
        return "attention"
    if re.search(r"mlp|ffn|feed_forward|experts", lower):
        return "mlp"
    return "other"


def conflict_chance(num_sources: int) -> float:
    """The sign-conflict fraction of ``num_sources`` task vectors whose signs are independent and fair coins:
    every entry conflicts unless all signs agree, ``1 - 2 * 2^-S``."""
    return 1.0 - 2.0 ** (1 - num_sources) if num_sources > 1 else 0.0


@dataclass
class _Counts:
    entries: int = 0
    conflicts: int = 0

    def fraction(self) -> float | None:
        return self.conflicts / self.entries if self.entries else None


class _TaskVectorStats:
    """Running sums over the tensors of a scan: pairwise similarity, norms and sign conflicts."""

    def __init__(self, base: str, sources: list[str]):
        self.base = base
        self.sources = sources
        pairs = [(i, j) for i in range(len(sources)) for j in range(i + 1, len(sources))]
        self.pairs = {p: {g: SimilaritySums() for g in ("overall", *GROUPS)} for p in pairs}
        self.squares = [0.0] * len(sources)
        self.base_squares = 0.0
        self.by_group = {g: _Counts() for g in ("overall", *GROUPS)}
        self.by_layer: dict[int, _Counts] = {}

    def add(self, name: str, base: torch.Tensor, tensors: list[torch.Tensor]) -> None:
        c = base.float().reshape(-1)
        deltas = torch.stack([t.float().reshape(-1) - c for t in tensors])  # [S, n]
        group = layer_group(name)
        for (i, j), sums in self.pairs.items():
            for key in ("overall", group):
                sums[key].add(deltas[i], deltas[j], c)
        for k in range(len(tensors)):
            self.squares[k] += torch.dot(deltas[k], deltas[k]).item()
        self.base_squares += torch.dot(c, c).item()
        conflicts = int(((deltas > 0).any(0) & (deltas < 0).any(0)).sum())
        layer = layer_index(name)
        counts = [self.by_group["overall"], self.by_group[group]]
        counts += [self.by_layer.setdefault(layer, _Counts())] if layer is not None else []
        for count in counts:
            count.entries += c.numel()
            count.conflicts += conflicts

    def report(self) -> TaskVectorReport | None:
        if self.by_group["overall"].entries == 0:
            return None
        base_norm = math.sqrt(self.base_squares)
        kinship = []
        for (i, j), sums in self.pairs.items():
            similarities = {g: s.similarity() for g, s in sums.items() if s.n}
            kinship.append(
                {
                    "a": self.sources[i],
                    "b": self.sources[j],
                    "cosine": _finite(similarities["overall"].cosine),
                    "by_group": {g: _finite(s.cosine) for g, s in similarities.items() if g != "overall"},
                }
            )
        return TaskVectorReport(
            base=self.base,
            sources=self.sources,
            relative_norms={
                s: math.sqrt(sq) / base_norm if base_norm > 0 else None
                for s, sq in zip(self.sources, self.squares, strict=True)
            },
            kinship=kinship,
            sign_conflicts={
                "chance": conflict_chance(len(self.sources)),
                "overall": self.by_group["overall"].fraction(),
                "by_group": {g: c.fraction() for g, c in self.by_group.items() if g != "overall" and c.entries},
                "by_layer": {str(k): self.by_layer[k].fraction() for k in sorted(self.by_layer)},
            },
        )


def _finite(x: float) -> float | None:
    return None if math.isnan(x) else x


def _scan(
    readers: dict[str, CheckpointReader], base: str | None, sources: list[str], progress: bool
) -> tuple[dict[str, list[str]], TaskVectorReport | None]:
    """Every floating tensor of every model read once: the non-finite ones per model, and, when ``base`` and
    ``sources`` are given, the task-vector statistics over the tensors each source shares with the base. Memory
    holds one tensor of each model at a time."""
    from tqdm.auto import tqdm

    stats = _TaskVectorStats(base, sources) if base is not None and sources else None
    names = list(dict.fromkeys(n for r in readers.values() for n in r.names))
    nonfinite: dict[str, list[str]] = {m: [] for m in readers}
    for name in tqdm(names, unit="tensor", desc="dam check", disable=None if progress else True):
        values: dict[str, torch.Tensor] = {}
        for model, reader in readers.items():
            if name not in reader or not reader.dtype(name).is_floating_point:
                continue
            tensor = reader.get(name)
            if not bool(torch.isfinite(tensor).all()):
                nonfinite[model].append(name)
            elif stats is not None and model in (base, *sources):
                values[model] = tensor
        if stats is not None and base in values and all(s in values for s in sources):
            shape = values[base].shape
            if all(values[s].shape == shape for s in sources):
                stats.add(name, values[base], [values[s] for s in sources])
    return nonfinite, stats.report() if stats is not None else None


def _tokenizer_size(folder: Path) -> int | None:
    """Token ids a ``tokenizer.json`` uses (its highest id plus one, added tokens included); None without one."""
    file = folder / "tokenizer.json"
    if not file.is_file():
        return None
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
        vocab = data["model"].get("vocab")
        ids = list(vocab.values()) if isinstance(vocab, dict) else [len(vocab) - 1] if vocab else []
        ids += [t["id"] for t in data.get("added_tokens") or []]
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        raise DamError(f"tokenizer: {file} is not a readable tokenizer.json") from None
    return max(ids) + 1 if ids and all(isinstance(i, int) for i in ids) else None


def _disk_bytes(model: str, reader: CheckpointReader) -> int:
    """Bytes of the weight files (a GGUF's file; a LoRA adapter not counted)."""
    gguf = gguf_source(split_reference(model)[0])
    if gguf is not None:
        return gguf.stat().st_size
    files = {*reader.path.glob("*.safetensors"), *reader.path.glob("pytorch_model*.bin")}
    return sum(f.stat().st_size for f in files)


def _model_report(model: str, role: str, reader: CheckpointReader) -> ModelReport:
    cfg = reader.config
    text = cfg["text_config"] if isinstance(cfg.get("text_config"), dict) else cfg
    embedding = next((n for n in reader.names if _EMBEDDING.search(n)), None)
    floating = [n for n in reader.names if reader.dtype(n).is_floating_point]
    return ModelReport(
        model=model,
        role=role,
        path=str(reader.path),
        architectures=cfg.get("architectures"),
        model_type=cfg.get("model_type"),
        vocab_size=text.get("vocab_size"),
        embedding_rows=reader.shape(embedding)[0] if embedding is not None else None,
        tie_word_embeddings=cfg.get("tie_word_embeddings", text.get("tie_word_embeddings")),
        tokenizer_vocab=_tokenizer_size(reader.path),
        dtypes=sorted({dtype_name(reader.dtype(n)) for n in floating}),
        parameters=sum(math.prod(reader.shape(n)) for n in reader.names),
        disk_bytes=_disk_bytes(model, reader),
    )


def _available_memory() -> int | None:
    """``MemAvailable`` of ``/proc/meminfo`` in bytes; None where there is none."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def merge_estimate(plan: MergePlan) -> Estimate:
    """Peak memory and disk of ``dam merge`` for a plan (see the module docstring)."""
    footprints = sorted((math.prod(t.shape) * 4 * (len(t.models) + 2) for t in plan.tasks), reverse=True)
    return Estimate(
        command="merge",
        peak_memory_bytes=_RUNTIME["merge"] + sum(footprints[:_MERGE_WORKERS]),
        disk_bytes=sum(t.nbytes for t in plan.tasks),
        available_memory_bytes=_available_memory(),
        formula="0.3 GB + sum over the 2 largest output tensors of numel * 4 * (inputs + 2); disk: output bytes",
    )


def train_estimate(
    base: CheckpointReader,
    num_sources: int,
    *,
    dtype: str,
    batch_size: int,
    max_length: int,
    gradient_checkpointing: bool,
) -> Estimate:
    """Peak memory and disk of ``dam train`` over ``num_sources`` sources of ``base`` (see the module docstring)."""
    cfg = base.config
    text = cfg["text_config"] if isinstance(cfg.get("text_config"), dict) else cfg
    b = parse_dtype(dtype).itemsize
    params = sum(math.prod(base.shape(n)) for n in base.names if base.dtype(n).is_floating_point)
    layers = text.get("num_hidden_layers") or 0
    hidden = text.get("hidden_size") or 0
    inter = text.get("intermediate_size") or 4 * hidden
    per_layer = 12 * hidden + 4 * inter
    per_token = layers * hidden + per_layer if gradient_checkpointing else layers * per_layer
    return Estimate(
        command="train",
        peak_memory_bytes=_RUNTIME["train"] + num_sources * params * b + batch_size * max_length * per_token * b,
        disk_bytes=params * b,
        available_memory_bytes=_available_memory(),
        formula=(
            f"1 GB + N*P*b + B*T*A*b with N={num_sources}, P={params}, b={b}, B={batch_size}, T={max_length}, "
            f"A={per_token} ({'L*h + 12h + 4i' if gradient_checkpointing else 'L*(12h + 4i)'}); disk: P*b"
        ),
    )


# ------------------------------------------------------------------------------------------ one target


def _open_readers(models: list[str], reasons: list[Reason], label: str) -> dict[str, CheckpointReader]:
    readers = {}
    for model in models:
        try:
            readers[model] = CheckpointReader(model)
        except DamError as e:
            reasons.append(Reason("refuse", "models", f"{label}{e}"))
    return readers


def _inspect(
    target: TargetReport,
    readers: dict[str, CheckpointReader],
    roles: dict[str, str],
    base: str | None,
    sources: list[str],
    reasons: list[Reason],
    label: str,
    progress: bool,
) -> None:
    """The per-model facts, the NaN/Inf scan and the task vectors of one target, with their reasons."""
    target.models = [_model_report(m, roles[m], r) for m, r in readers.items()]
    for report in target.models:
        if report.tokenizer_vocab and report.embedding_rows and report.tokenizer_vocab > report.embedding_rows:
            reasons.append(
                Reason(
                    "warn",
                    "vocabulary",
                    f"{label}model {report.model!r}: its tokenizer uses {report.tokenizer_vocab} token ids but its "
                    f"embedding has {report.embedding_rows} rows",
                )
            )
    dtypes = {m.model: tuple(m.dtypes) for m in target.models if m.dtypes}
    if len(set(dtypes.values())) > 1:
        detail = ", ".join(f"{m!r}: {'/'.join(d)}" for m, d in dtypes.items())
        reasons.append(Reason("warn", "dtypes", f"{label}the models are stored in different dtypes ({detail})"))
    in_readers = [s for s in sources if s in readers]
    nonfinite, target.task_vectors = _scan(readers, base if base in readers else None, in_readers, progress)
    for report in target.models:
        report.nonfinite = nonfinite[report.model]
        if report.nonfinite:
            more = f" (and {len(report.nonfinite) - 1} more)" if len(report.nonfinite) > 1 else ""
            reasons.append(
                Reason(
                    "refuse",
                    "nonfinite",
                    f"{label}model {report.model!r}: tensor {report.nonfinite[0]!r} contains NaN or Inf{more}",
                )
            )
    if target.task_vectors is not None:
        reasons += _task_vector_reasons(target.task_vectors, label)


def _task_vector_reasons(tv: TaskVectorReport, label: str) -> list[Reason]:
    reasons = []
    conflicts, chance = tv.sign_conflicts["overall"], tv.sign_conflicts["chance"]
    if len(tv.sources) > 1 and conflicts is not None and conflicts >= chance + (1 - chance) / 2:
        reasons.append(
            Reason(
                "warn",
                "sign_conflicts",
                f"{label}{conflicts:.0%} of the parameters have task vectors of both signs (independent "
                f"fine-tunes: {chance:.0%}): TIES-style sign election will drop much of each source's update",
            )
        )
    for pair in tv.kinship:
        if pair["cosine"] is not None and pair["cosine"] <= _OPPOSITE_COSINE:
            reasons.append(
                Reason(
                    "warn",
                    "kinship",
                    f"{label}the task vectors of {pair['a']!r} and {pair['b']!r} point in near-opposite directions "
                    f"(cosine {pair['cosine']:+.2f}): averaging them cancels both",
                )
            )
    return reasons


def _memory_reason(estimate: Estimate, label: str) -> list[Reason]:
    available = estimate.available_memory_bytes
    if available is None or estimate.peak_memory_bytes <= available:
        return []
    return [
        Reason(
            "warn",
            "memory",
            f"{label}estimated peak memory of dam {estimate.command} {_human(estimate.peak_memory_bytes)} is above "
            f"the available RAM {_human(available)}",
        )
    ]


def _check_merge(
    config: MergeConfig, name: str | None, reasons: list[Reason], label: str, progress: bool
) -> TargetReport:
    target = TargetReport(name=name)
    models = config.referenced_models()
    readers = _open_readers(models, reasons, label)
    try:
        if len(readers) == len(models):
            try:
                plan = plan_merge(config)
            except DamError as e:
                reasons.append(Reason("refuse", "compatibility", f"{label}{e}"))
            else:
                try:
                    target.estimate = merge_estimate(plan)
                finally:
                    plan.close()
                reasons += _memory_reason(target.estimate, label)
        base = config.base_model
        sources = [m for m in models if m != base] if base is not None else []
        roles = {m: "base" if m == base else "source" if base is not None else "model" for m in models}
        _inspect(target, readers, roles, base, sources, reasons, label, progress)
    finally:
        for reader in readers.values():
            reader.close()
    return target


def _check_train(
    base: str,
    sources: list[tuple[str, str]],
    settings: DAMConfig | None,
    reasons: list[Reason],
    progress: bool,
) -> TargetReport:
    """A DAM run of ``sources`` (name, model) over ``base``; ``settings`` None: the run config's defaults."""
    target = TargetReport(name=None)
    try:
        _refuse_dam_sources(base, sources, settings)
    except DamError as e:
        reasons.append(Reason("refuse", "compatibility", str(e)))
    models = list(dict.fromkeys([base, *(m for _, m in sources)]))
    readers = _open_readers(models, reasons, "")
    try:
        if base in readers:
            train = settings.train if settings else TrainConfig()
            target.estimate = train_estimate(
                readers[base],
                len(sources),
                dtype=settings.dtype if settings else DAMConfig.model_fields["dtype"].default,
                batch_size=train.batch_size,
                max_length=(settings.data if settings else DataConfig()).max_length,
                gradient_checkpointing=train.gradient_checkpointing,
            )
            reasons += _memory_reason(target.estimate, "")
        others = [m for _, m in sources if not _same_model(m, base)]
        roles = {m: "base" if m == base else "source" for m in models}
        _inspect(target, readers, roles, base, others, reasons, "", progress)
    finally:
        for reader in readers.values():
            reader.close()
    return target


def _same_model(a: str, b: str) -> bool:
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.resolve() == pb.resolve() if pa.exists() and pb.exists() else a == b


# ------------------------------------------------------------------------------------------ the config


def _documents(path: Path) -> list[Any]:
    """The YAML documents of ``path`` (empty ones dropped); DamError naming the file if it cannot be read."""
    try:
        return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]
    except OSError as e:
        raise DamError(f"config {str(path)!r}: cannot read it ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise DamError(f"config {str(path)!r}: not a text (UTF-8) file: byte {e.start}") from None
    except yaml.YAMLError as e:
        raise DamError(f"config {str(path)!r}: invalid YAML: {str(e).splitlines()[0]}") from None


def config_kind(path: str | Path) -> Command:
    """``merge`` for a merge YAML (a document with ``merge_method``), ``train`` for a DAM run config."""
    path = Path(path)
    documents = _documents(path)
    if any(isinstance(d, dict) and "merge_method" in d for d in documents):
        return "merge"
    if len(documents) == 1 and isinstance(documents[0], dict) and "output_dir" in documents[0]:
        return "train"
    raise DamError(
        f"config {str(path)!r}: neither a merge config (merge_method) nor a DAM run config (output_dir, models with "
        "datasets)"
    )


def _merge_targets(
    path: Path, intermediate_dir: str | Path | None
) -> Iterator[tuple[str | None, MergeConfig | None, str | None]]:
    """(name, config, why skipped) of each merge of a merge YAML: its one config, or a recipe's documents."""
    documents = _documents(path)
    if len(documents) == 1 and isinstance(documents[0], dict) and "name" not in documents[0] and not intermediate_dir:
        yield None, load_merge_config(path), None
        return
    for step in plan_merge_steps(path, "OUT", intermediate_dir):
        missing = [d for d in sorted(step.depends) if not (Path(intermediate_dir) / d).is_dir()]  # type: ignore[arg-type]
        if missing:
            yield step.name, None, f"uses intermediate {missing[0]!r}, not built yet (dam merge builds it)"
        else:
            yield step.name, step.config, None


def check_config(
    path: str | Path,
    command: Command | None = None,
    *,
    intermediate_dir: str | Path | None = None,
    progress: bool = False,
) -> CheckReport:
    """Check the merge or DAM config at ``path`` for ``command`` (default: the config's own); see the module
    docstring. A config that cannot be read at all raises DamError; every other finding is in the report."""
    path = Path(path)
    kind = config_kind(path)
    command = command or kind
    reasons: list[Reason] = []
    targets: list[TargetReport] = []
    if kind == "merge":
        steps = list(_merge_targets(path, intermediate_dir))
        for name, config, skipped in steps:
            if config is None:
                targets.append(TargetReport(name=name, skipped=skipped))
                continue
            label = f"{name or 'final merge'}: " if len(steps) > 1 else ""
            if command == "merge":
                targets.append(_check_merge(config, name, reasons, label, progress))
            else:
                targets.append(_check_train(*_as_dam(config), None, reasons, progress))
    else:
        dam = load_config(path)
        sources = [(m.name, m.model) for m in dam.models]
        if command == "train":
            targets.append(_check_train(dam.base_model, sources, dam, reasons, progress))
        else:
            targets.append(_check_merge(_as_merge(dam), None, reasons, "", progress))
    unique = list({r.message: r for r in reasons}.values())  # a missing model fails two checks with one message
    return CheckReport(config=str(path), kind=kind, command=command, reasons=unique, targets=targets)


def _as_dam(config: MergeConfig) -> tuple[str, list[tuple[str, str]]]:
    """A merge config read as a DAM run: its base_model and its other models."""
    if config.base_model is None:
        raise DamError("--command train: the merge config needs base_model (DAM trains over a base)")
    return config.base_model, [(m, m) for m in config.referenced_models() if m != config.base_model]


def _as_merge(config: DAMConfig) -> MergeConfig:
    """A DAM run config read as a merge: task_arithmetic of its models over its base, weight 1/N each."""
    weight = 1.0 / len(config.models)
    return parse_merge_config(
        {
            "merge_method": "task_arithmetic",
            "base_model": config.base_model,
            "models": [{"model": m.model, "parameters": {"weight": weight}} for m in config.models],
        },
        origin="the DAM config as a merge",
    )


# ------------------------------------------------------------------------------------------ human output


def _human(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.0%}"


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[j]) for r in rows) for j in range(len(rows[0]))]
    return ["  " + "  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in rows]


def _format_target(target: TargetReport, short: Callable[[str], str]) -> list[str]:
    lines = []
    if target.name is not None:
        lines.append(f"document {target.name}:")
    if target.skipped:
        return [*lines, f"  skipped: {target.skipped}"]
    header = ["role", "model", "architecture", "vocab", "emb rows", "tied", "tokenizer", "dtypes", "params", "disk"]
    rows = [header]
    for m in target.models:
        tied = {True: "yes", False: "no", None: "?"}[m.tie_word_embeddings]
        rows.append(
            [
                m.role,
                short(m.model),
                ",".join(m.architectures or []) or m.model_type or "?",
                str(m.vocab_size or "?"),
                str(m.embedding_rows or "?"),
                tied,
                str(m.tokenizer_vocab or "-"),
                "/".join(m.dtypes),
                f"{m.parameters / 1e6:.2f}M",
                _human(m.disk_bytes),
            ]
        )
    lines += ["models:", *_table(rows)]
    bad = ", ".join(f"{short(m.model)} ({len(m.nonfinite)} tensors)" for m in target.models if m.nonfinite)
    lines.append(f"NaN/Inf: {bad or 'none (every floating tensor read)'}")
    tv = target.task_vectors
    if tv is None:
        lines.append("task vectors: not computed (needs a base model and tensors the sources share with it)")
    else:
        norms = ", ".join(
            f"{short(s)} {n:.4f}" if n is not None else f"{short(s)} n/a" for s, n in tv.relative_norms.items()
        )
        lines.append(f"task vectors against {short(tv.base)}: |tau|/|base| {norms}")
        for pair in tv.kinship:
            cosine = "n/a" if pair["cosine"] is None else f"{pair['cosine']:+.3f}"
            lines.append(f"  cosine {short(pair['a'])} / {short(pair['b'])}: {cosine}")
        sc = tv.sign_conflicts
        if len(tv.sources) > 1:
            groups = ", ".join(f"{g} {_pct(v)}" for g, v in sc["by_group"].items())
            worst = max(sc["by_layer"].items(), key=lambda kv: kv[1] or 0.0, default=None)
            at = f"; worst layer {worst[0]} {_pct(worst[1])}" if worst else ""
            lines.append(
                f"  sign conflicts: {_pct(sc['overall'])} of parameters (chance {_pct(sc['chance'])}): {groups}{at}"
            )
    est = target.estimate
    if est is not None:
        available = (
            f" (available RAM {_human(est.available_memory_bytes)})" if est.available_memory_bytes is not None else ""
        )
        lines.append(
            f"estimate for dam {est.command}: peak memory {_human(est.peak_memory_bytes)}{available}, "
            f"disk {_human(est.disk_bytes)}"
        )
    return lines


def format_report(report: CheckReport) -> str:
    """The report as text: the models, the scan, the task vectors, the estimate, then the verdict and its
    reasons."""
    models = [m.model for t in report.targets for m in t.models]
    prefix = _common_folder(models)

    def short(model: str) -> str:
        return model[len(prefix) :] if prefix and model.startswith(prefix) else model

    lines = [f"dam check {report.config} ({report.kind} config, checked for dam {report.command})"]
    if prefix:
        lines.append(f"models under {prefix}")
    for target in report.targets:
        lines += _format_target(target, short)
    lines.append(f"verdict: {report.verdict}")
    lines += [f"  {r.level}: {r.message} [{r.check}]" for r in report.reasons]
    return "\n".join(lines)


def _common_folder(models: list[str]) -> str:
    """The folder every model path starts with (``/a/b/``), so the table shows short names; empty if none."""
    local = [m for m in models if "/" in m and Path(m).expanduser().exists()]
    if len(local) != len(models) or len(models) < 2:
        return ""
    parts = [Path(m).parts for m in models]
    common = []
    for column in zip(*parts, strict=False):
        if len(set(column)) != 1:
            break
        common.append(column[0])
    common = common[: min(len(p) for p in parts) - 1]
    return str(Path(*common)) + "/" if common else ""


__all__ = [
    "GROUPS",
    "CheckReport",
    "Estimate",
    "ModelReport",
    "Reason",
    "TargetReport",
    "TaskVectorReport",
    "check_config",
    "config_kind",
    "conflict_chance",
    "format_report",
    "layer_group",
    "merge_estimate",
    "refuse_training",
    "train_estimate",
]
