"""Configuration models. ``DAMOptions``: what the DAM wrapper learns; ``LossConfig``: the training objective;
``DataConfig``: the training data; ``DAMConfig``: one training run (``train_dam.py``), read by :func:`load_config`.

Both are pydantic v2 models with ``extra="forbid"``, so a misspelt key fails loudly with its name. The docstring
under each field is its description (``use_attribute_docstrings``) and shows up in ``model_json_schema()``.
"""

from __future__ import annotations

import os
import re
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dam.adaptive.options import DAMOptions
from dam.errors import DamError
from dam.io.paths import portable_reference, resolve_reference


class LossConfig(BaseModel):
    """The DAM objective: distillation from the source teachers plus coefficient regularisers. 0 disables a term."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    objective: Literal["kl", "entropy"] = "kl"
    """What the merged model minimises besides the regularisers. ``kl``: distillation from each source's teacher
    (DAM), weighted by ``kl``. ``entropy``: the entropy of the merged model's own predictions (weight 1, no
    temperature) on the tokens the KL would use, the sources' data as unlabeled input: no teacher runs and no
    label or teacher output enters the loss. With ``dam.granularity: tensor`` this is layer-wise AdaMerging
    (Yang et al., 2024), here per tensor and over all sources (the base included when it is a source)."""

    temperature: float = Field(2.0, gt=0)
    """Softmax temperature T of the distillation KL; the KL is multiplied by T^2 to keep gradient scales."""

    kl: float = Field(1.0, ge=0)
    """Weight of KL(teacher || student), averaged over non-padding tokens."""

    align: float = Field(0.0, ge=0)
    """Weight of the layer-wise alignment term (0: off): on each loss token of a source's example, the merged
    model's hidden state after every decoder layer against that source's own (its teacher's) at the same layer,
    ``||h - g||^2 / ||g||^2`` averaged over the layers (:func:`dam.adaptive.losses.layer_alignment`), a token mean
    like the KL. A signal at every layer instead of the output alone, as in progressive layer-wise distillation
    (ProDistill, arXiv 2502.12706) and Expert Merging (arXiv 2509.25712); alone with ``kl: 0`` or beside the KL.
    Alone it never reads the output: an untied ``lm_head``'s coefficients then stay at the init, and a tied one's
    embedding must be left out of ``dam.targets`` (:meth:`DAMConfig.refuse_blind_tied_head`).
    The teachers' layer states come from their on-the-fly forwards (``data.teacher_logits: on_the_fly``; the
    logits cache holds none); they add ``L x tokens x hidden`` values per teacher to the step's memory, no model
    copy."""

    similarity: float = Field(2.9, ge=0)
    """Weight of the mean pairwise cosine similarity of the per-source coefficient vectors, averaged over modules
    (minimised, so the sources' coefficients move apart). A mean, so one value pulls alike on any model size; 2.9
    is the paper's 0.01 on a sum over the 291 coefficient modules of its 7-8B Mistral and Llama-3 models."""

    l1: float = Field(0.0, ge=0)
    """Weight of the L1 penalty on the coefficients, a mean over every coefficient (see ``regularize_toward``)."""

    l2: float = Field(0.0, ge=0)
    """Weight of the squared L2 penalty on the coefficients, a mean over every coefficient (see
    ``regularize_toward``)."""

    regularize_toward: Literal["zero", "init"] = "zero"
    """Target of the L1/L2 penalties: ``zero`` penalises the coefficients themselves, ``init`` their distance from
    the starting merge."""

    top_k: int | None = Field(None, ge=1)
    """Teacher logits cached as the top-K logits and indices per token (typically 50 to 128); ``None`` uses full
    teacher logits. See :func:`dam.adaptive.losses.topk_kl_divergence` for the approximation."""

    @property
    def reads_output(self) -> bool:
        """Whether a term of the objective reads the merged model's output (the KL or the entropy): with
        ``loss.kl: 0`` only the layer alignment is left, which stops at the final norm."""
        return self.objective != "kl" or self.kl > 0


class DataConfig(BaseModel):
    """Training data: how each model's dataset is read, rendered, sampled and paired with teachers
    (:mod:`dam.training.data`)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    text_field: str = "text"
    """Column of ready-to-train text, used for datasets that lack the prompt/response columns."""

    prompt_field: str = "prompt"
    """Column of the user prompt. A dataset with both prompt and response columns is read as prompt/response."""

    response_field: str = "response"
    """Column of the assistant response."""

    use_chat_template: bool = True
    """Render prompt/response data as a user/assistant conversation through a chat template, as each source's
    ``render`` says; false renders every source whose ``render`` is ``auto`` with the plain ``template``."""

    template: str = "{prompt}\n{response}"
    """Plain template for prompt/response data when no chat template is used: ``{prompt}`` then ``{response}``
    once each (``{{``/``}}`` for literal braces). The tokenizer's BOS (if it adds one) goes before it, EOS after."""

    response_only_loss: bool = False
    """Distil on the response tokens only (prompt tokens get label -100). Text data always counts every token."""

    split: str = "train"
    """Split read from Hub datasets and saved ``DatasetDict`` folders (local data files are read whole)."""

    num_examples: int | None = Field(None, ge=1)
    """Examples sampled from each dataset after the seeded shuffle (the paper's code used 1729); ``None`` keeps
    them all."""

    seed: int = 0
    """Seed of the shuffle that samples each dataset and of the shuffle that interleaves the sources."""

    max_length: int = Field(2048, ge=2)
    """Tokens per sequence: longer examples are truncated on the right; with ``packing``, the block length."""

    packing: bool = False
    """Concatenate each dataset's examples, EOS-separated, into blocks of exactly ``max_length`` tokens (the last
    may be shorter); a block is one causal sequence (see ``dam.training.data.pack_dataset``)."""

    pairing: Literal["own", "all"] = "own"
    """Which teacher supervises which data: ``own``, source k's teacher on source k's dataset (the paper's
    default); ``all``, every teacher on every example, the distillation loss averaged over the teachers."""

    teacher_logits: Literal["on_the_fly", "cached"] = "on_the_fly"
    """``on_the_fly``: teacher forwards at every step; ``cached``: top-``loss.top_k`` teacher log-probabilities
    precomputed once by ``dam cache-logits CONFIG`` into ``cache_dir`` and read from there."""

    cache_dir: str | None = None
    """Folder of the teacher-logit cache (needed for ``teacher_logits: cached``). It records the models, data and
    settings it came from: a stale cache is refused, a matching one is reused across runs and sweeps."""

    @field_validator("template")
    @classmethod
    def _template_fields(cls, v: str) -> str:
        import string

        fields = [f for _, f, _, _ in string.Formatter().parse(v) if f is not None]
        if fields != ["prompt", "response"]:
            raise ValueError(f"must contain {{prompt}} then {{response}} once each, found fields {fields}")
        return v

    @model_validator(mode="after")
    def _cache_dir_for_cached(self) -> DataConfig:
        if self.teacher_logits == "cached" and not self.cache_dir:
            raise ValueError("teacher_logits: cached needs cache_dir (the folder `dam cache-logits` writes)")
        return self


# ------------------------------------------------------------------------------------------- training run


class SourceModel(BaseModel):
    """One source of the merge: a model and the dataset its teacher supervises, tied together by ``name``."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    name: str = Field(min_length=1, pattern=r"^[^.=\s]+$")
    """Short unique name (``math``, ``ja``...): maps the source to its dataset and labels its logs. It can address
    the entry in overrides (``models.math.model=...``), so it holds no dots, ``=`` or spaces."""

    model: str = Field(min_length=1)
    """Local model folder or Hugging Face Hub id."""

    dataset: str = Field(min_length=1)
    """This source's training data: a local file (jsonl/json/parquet/csv/txt) or folder, or a Hub dataset id."""

    loss_weight: float = Field(1.0, gt=0)
    """Weight of this source's examples in the objective: the KL (or entropy) of each of their tokens is multiplied
    by it. Weights are not normalised: the objective is still divided by the number of loss tokens, so 1 for every
    source is the plain token mean. A skill that the merge keeps worse than the others can be weighted up."""

    render: Literal["auto", "own", "base", "plain"] = "auto"
    """How this source's prompt/response data is rendered: ``own``, with the source's own chat template (and
    tokenizer), the format it was tuned on; ``base``, with the base tokenizer's chat template; ``plain``, with
    ``data.template``. ``auto``: ``own`` when the source has a chat template, else ``base`` when the base has one,
    else ``plain`` (and ``plain`` whenever ``data.use_chat_template`` is false). Text data is never rendered."""


class TrainConfig(BaseModel):
    """Optimisation, schedule, precision, checkpointing and resumption of a DAM run."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    lr: float = Field(1e-3, gt=0)
    """Peak learning rate of AdamW on the coefficients (the only trained parameters)."""

    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""

    weight_decay: float = Field(0.0, ge=0)
    """AdamW decoupled weight decay. It pulls coefficients toward 0, not toward the init, so it is off by default;
    ``loss.l2`` with ``loss.regularize_toward: init`` pulls toward the starting merge instead."""

    warmup_steps: int = Field(0, ge=0)
    """Optimizer steps of linear warmup from 0 to ``lr``."""

    schedule: Literal["constant", "linear", "cosine"] = "linear"
    """Learning rate after warmup: constant, linear decay to 0 at the last step, or cosine decay to 0."""

    batch_size: int = Field(1, ge=1)
    """Sequences per micro-batch on each process."""

    grad_accum: int = Field(1, ge=1)
    """Micro-batches per optimizer step. The global batch is ``batch_size * grad_accum * processes`` sequences; the
    distillation loss is normalised by the loss tokens of the whole global batch, so any split of it into
    processes and micro-batches gives the same gradient."""

    max_steps: int | None = Field(None, ge=1)
    """Optimizer steps to train. ``None``: ``epochs`` passes over the data; when set it wins over ``epochs``, and
    the data is cycled (a new seeded order each pass) if it needs more than one pass."""

    epochs: int = Field(1, ge=1)
    """Passes over the training data when ``max_steps`` is not set."""

    seed: int = 0
    """Seed of the data order (reshuffled per epoch) and of every random number generator."""

    mixed_precision: Literal["no", "bf16", "fp16"] | None = None
    """Autocast precision of the forward (GPU). ``None`` takes the accelerate launch config's setting (``no``
    without one). Coefficients and their optimizer state stay float32 whatever this is."""

    gradient_checkpointing: bool = False
    """Recompute each decoder layer's activations in backward instead of storing them (long sequences)."""

    shard_sources: bool = False
    """Shard the frozen sources over the processes (torch FSDP2, :mod:`dam.training.sharding`): each process holds
    about 1/G of them plus one gathered decoder layer, for sources that do not fit one device. Launch with
    ``configs/accelerate/ddp.yaml`` (accelerate only starts the processes; DAM shards). The coefficients stay whole
    on every process. Needs torch 2.7 or later."""

    save_every: int = Field(0, ge=0)
    """Save a resumable checkpoint (``accelerator.save_state``) every this many optimizer steps; the last step is
    always saved. 0: only the last step."""

    keep_checkpoints: int = Field(2, ge=1)
    """How many of the most recent checkpoints to keep under ``<output_dir>/checkpoints``."""

    log_every: int = Field(10, ge=1)
    """Optimizer steps between logs: loss terms, learning rate, tokens/s, coefficient statistics."""

    max_grad_norm: float | None = Field(1.0, gt=0)
    """Clip the global gradient norm of the coefficients to this; ``None`` disables clipping."""

    resume: Literal["auto", "never"] = "auto"
    """``auto``: continue from the latest checkpoint in ``<output_dir>/checkpoints`` when there is one, else start.
    ``never``: start from scratch, refusing an ``output_dir`` that already holds checkpoints."""

    resume_from: str | None = None
    """A checkpoint folder (``<run>/checkpoints/step_<n>``) to continue from; wins over ``resume``."""

    @model_validator(mode="after")
    def _warmup_within_run(self) -> TrainConfig:
        if self.max_steps is not None and self.warmup_steps > self.max_steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) exceeds max_steps ({self.max_steps})")
        return self


class WandbConfig(BaseModel):
    """Weights & Biases tracking, through Accelerate's tracker. No entity is assumed: wandb's default is used."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    project: str = "dam"
    """wandb project."""

    entity: str | None = None
    """wandb entity (user or team); ``None`` uses the logged-in account's default."""

    name: str | None = None
    """Run name; ``None`` lets wandb pick one."""

    tags: list[str] = Field(default_factory=list)
    """Run tags."""

    mode: Literal["online", "offline", "disabled"] | None = None
    """``None`` honours the ``WANDB_MODE`` environment variable (online when unset); ``disabled`` turns tracking
    off entirely."""


class ExportConfig(BaseModel):
    """What the exported merge (``merged/``) carries besides the weights, as mergekit's ``tokenizer_source`` and
    ``chat_template`` (see :mod:`dam.adaptive.export`)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    tokenizer_source: str = "base"
    """``base`` or a source's ``name``: whose tokenizer files are copied (the base's when it has none: the first
    source's). The sources share one vocabulary (checked), so this picks special tokens and settings, not ids."""

    chat_template: str | None = None
    """``None`` keeps the tokenizer source's own; ``base`` or a source's ``name`` takes that model's chat template;
    any other value containing ``{{`` or ``{%`` is a Jinja template written as is. The generation config's EOS ids
    are the tokenizer source's plus those of the model the template comes from (its end-of-turn tokens)."""


class DAMConfig(BaseModel):
    """One DAM training run: ``accelerate launch train_dam.py CONFIG.yaml [key=value ...]``."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    base_model: str = Field(min_length=1)
    """Architecture, config and tokenizer of the merge (local folder or Hub id). It is merged only if it is also
    listed under ``models``."""

    models: list[SourceModel]
    """The N >= 2 sources, each with its dataset. Their order is the order of the coefficients' source axis."""

    output_dir: str = Field(min_length=1)
    """Run folder: ``config.yaml``, ``checkpoints/``, ``dam_coefficients.safetensors`` and the export ``merged/``.
    Environment variables are expanded, so ``out/sweep/${WANDB_RUN_ID}`` gives each sweep run its own folder."""

    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    """Dtype of the frozen source weights in the wrapper, and of the exported checkpoint."""

    dam: DAMOptions = Field(default_factory=DAMOptions)
    """What the wrapper learns: targets, init, transform, coefficient dtype, biases."""

    loss: LossConfig = Field(default_factory=LossConfig)
    """Temperature and weights of the objective's terms."""

    data: DataConfig = Field(default_factory=DataConfig)
    """Rendering, sampling, sequence length, teacher pairing and teacher logits."""

    train: TrainConfig = Field(default_factory=TrainConfig)
    """Optimisation, precision, checkpoints and resumption."""

    wandb: WandbConfig = Field(default_factory=WandbConfig)
    """Tracking."""

    export: ExportConfig = Field(default_factory=ExportConfig)
    """Tokenizer and chat template of the exported merge."""

    @field_validator("output_dir")
    @classmethod
    def _expand_environment(cls, v: str) -> str:
        expanded = os.path.expandvars(v)
        unset = re.findall(r"\$\{?(\w+)", expanded)
        if unset:
            raise ValueError(f"environment variable {unset[0]} in {v!r} is not set")
        return expanded

    @field_validator("models")
    @classmethod
    def _models_named_uniquely(cls, v: list[SourceModel]) -> list[SourceModel]:
        if len(v) < 2:
            raise ValueError(f"DAM merges two or more models, got {len(v)}")
        names = [m.name for m in v]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"model names must be unique; repeated: {', '.join(repeated)}")
        seen: dict[str, str] = {}
        for m in v:
            local = Path(m.model).expanduser()
            key = str(local.resolve()) if local.exists() else m.model
            if key in seen:
                raise ValueError(
                    f"models {seen[key]!r} and {m.name!r} are the same model ({m.model!r}); list each source once"
                )
            seen[key] = m.name
        return v

    @model_validator(mode="after")
    def _export_names_a_model(self) -> DAMConfig:
        names = ["base", *(m.name for m in self.models)]
        template = self.export.chat_template
        if self.export.tokenizer_source not in names:
            raise ValueError(f"export.tokenizer_source must be one of {', '.join(names)}")
        if template is not None and template not in names and "{{" not in template and "{%" not in template:
            raise ValueError(f"export.chat_template must be one of {', '.join(names)} or a Jinja template")
        return self

    @model_validator(mode="after")
    def _frozen_base_without_decay(self) -> DAMConfig:
        if not self.dam.train_base and self.train.weight_decay > 0:
            raise ValueError(
                "dam.train_base: false keeps the base's coefficients at the init, which train.weight_decay "
                f"{self.train.weight_decay:g} would shrink anyway: set train.weight_decay: 0"
            )
        return self

    @model_validator(mode="after")
    def _entropy_needs_no_teachers(self) -> DAMConfig:
        if self.loss.objective == "entropy" and self.data.teacher_logits == "cached":
            raise ValueError(
                "loss.objective: entropy runs no teacher; data.teacher_logits: cached would read a cache it never "
                "uses: set data.teacher_logits: on_the_fly"
            )
        return self

    @model_validator(mode="after")
    def _align_needs_teacher_states(self) -> DAMConfig:
        if self.loss.align > 0 and self.loss.objective != "kl":
            raise ValueError("loss.align pulls the merged model toward its teachers; loss.objective: entropy has none")
        if self.loss.align > 0 and self.data.teacher_logits == "cached":
            raise ValueError(
                "loss.align needs the teachers' hidden states after every layer, which the logits cache does not "
                "hold: set data.teacher_logits: on_the_fly"
            )
        if not self.loss.reads_output and self.loss.align == 0:
            raise ValueError("loss.kl and loss.align are both 0: no term pulls the merge toward the sources")
        return self

    def refuse_blind_tied_head(self, tied: bool) -> None:
        """Refuse an objective that never sees the output while the output head trains: with ``loss.kl: 0`` the
        alignment stops at the final norm, so an ``lm_head`` tied to a trained embedding (``tied``: the base's
        ``tie_word_embeddings``) moves with the embedding's coefficients, driven by the input side alone. Measured
        on SmolLM2-135M (docs/real-family.md): the vocabulary row scales of the letters the ``initials`` skill
        reads grew to 1.8, so the merge began every general answer with ``R``. Needs the base's config, hence not
        a validator: ``dam train`` calls it before the run folder, :func:`dam.training.loop.train` on its model."""
        if tied and not self.loss.reads_output and "embedding" in self.dam.targets:
            raise DamError(
                f"loss.kl: 0 with dam.targets [{', '.join(self.dam.targets)}]: the lm_head of base "
                f"{self.base_model!r} is tied to its embedding, which would train with no term on the output "
                "(loss.align stops at the final norm); leave the embedding out (dam.targets: [linear, norm]) or set "
                "loss.kl > 0"
            )

    @model_validator(mode="after")
    def _cached_logits_need_top_k(self) -> DAMConfig:
        if self.data.teacher_logits == "cached" and self.loss.top_k is None:
            raise ValueError("data.teacher_logits: cached needs loss.top_k (how many logits per token are cached)")
        return self


class _YAMLLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also reads ``1e-3`` as a float (YAML 1.1 wants a dot, as in ``1.0e-3``)."""


_YAMLLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789")
)


def _yaml_value(text: str) -> Any:
    """An override value typed as YAML types it; ``None`` (how a wandb agent renders Python's None) is null."""
    if text == "None":
        return None
    try:
        return yaml.load(text, Loader=_YAMLLoader)  # a SafeLoader subclass
    except yaml.YAMLError:
        return text


def _nested(annotation: Any) -> tuple[str, type[BaseModel] | None]:
    """How a field nests: ``("model", cls)``, ``("list", item model)`` or ``("leaf", None)``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "model", annotation
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is list:
        item = args[0] if args else None
        return ("list", item) if isinstance(item, type) and issubclass(item, BaseModel) else ("leaf", None)
    options = [a for a in args if a is not type(None)]
    return _nested(options[0]) if len(options) == 1 else ("leaf", None)


def _where(path: Sequence[str | int]) -> str:
    return f"under {'.'.join(map(str, path))}" if path else "at the top level"


def _unknown_key(path: Sequence[str | int], key: str, schema: type[BaseModel]) -> DamError:
    full = ".".join(map(str, [*path, key]))
    return DamError(f"unknown config key {full!r}; valid keys {_where(path)}: {', '.join(schema.model_fields)}")


def _list_index(entries: list[Any], part: str, path: Sequence[str | int], item: str) -> int:
    """An entry of a config list by position (``models.0``) or by its ``name`` (``models.math``)."""
    names = [e.get("name") if isinstance(e, dict) else None for e in entries]
    if part.isdigit() and int(part) < len(entries):
        return int(part)
    if part in names:
        return names.index(part)
    where = ".".join(map(str, path))
    listed = ", ".join(str(n) for n in names if n is not None)
    raise DamError(
        f"override {item!r}: {where} has no entry {part!r} (indices 0-{len(entries) - 1}; names: {listed or 'none'})"
    )


def apply_override(data: dict[str, Any], item: str) -> None:
    """Set ``a.b.c=value`` (or ``--a.b.c=value``) in a raw config mapping, the value typed as YAML.

    Every key is checked against the :class:`DAMConfig` schema on the way down, so a typo fails here with the
    keys valid at that level. List entries are addressed by index or name: ``models.0.model=...`` or
    ``models.math.model=...``.
    """
    text = item[2:] if item.startswith("--") else item
    key, sep, raw = text.partition("=")
    if not sep or not key or "" in key.split("."):
        raise DamError(f"override {item!r}: expected key=value, e.g. train.lr=1e-3 or --train.lr=1e-3")
    value = _yaml_value(raw)
    parts = key.split(".")
    node: Any = data
    schema: type[BaseModel] | None = DAMConfig
    path: list[str | int] = []
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        if isinstance(node, list):
            index = _list_index(node, part, path, item)
            if last:
                node[index] = value
                return
            node = node[index]
            path.append(index)
            if not isinstance(node, dict):
                raise DamError(f"override {item!r}: {'.'.join(map(str, path))} is not a mapping")
            continue
        if schema is None:
            raise DamError(f"override {item!r}: {'.'.join(map(str, path))} is a value, it has no key {part!r}")
        if part not in schema.model_fields:
            raise _unknown_key(path, part, schema)
        if last:
            node[part] = value
            return
        kind, child_schema = _nested(schema.model_fields[part].annotation)
        child = node.get(part)
        if kind == "model":
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise DamError(f"config key {'.'.join(map(str, [*path, part]))} must be a mapping")
        elif kind == "list" and not isinstance(child, list):
            raise DamError(f"override {item!r}: config key {'.'.join(map(str, [*path, part]))} is not a list yet")
        node, schema = child, child_schema
        path.append(part)


def _clean_location(loc: Sequence[str | int]) -> tuple[list[str | int], type[BaseModel] | None]:
    """The part of a pydantic error location that names config keys (union-member tags dropped), and the model
    class it ends in (None for a value)."""
    kept: list[str | int] = []
    schema: type[BaseModel] | None = DAMConfig
    item_schema: type[BaseModel] | None = None
    for part in loc:
        if item_schema is not None and isinstance(part, int):
            kept.append(part)
            schema, item_schema = item_schema, None
        elif schema is not None and isinstance(part, str) and part in schema.model_fields:
            kept.append(part)
            kind, sub = _nested(schema.model_fields[part].annotation)
            schema, item_schema = (sub, None) if kind == "model" else (None, sub if kind == "list" else None)
        else:
            break
    return kept, schema


def _describe(error: dict[str, Any]) -> str:
    loc = list(error["loc"])
    if error["type"] == "extra_forbidden":
        path, schema = _clean_location(loc[:-1])
        if schema is not None:
            return str(_unknown_key(path, str(loc[-1]), schema))
    path, _ = _clean_location(loc)
    key = ".".join(map(str, path))
    if error["type"] == "missing":
        return f"missing config key {key!r}"
    message = str(error["msg"]).removeprefix("Value error, ")
    if isinstance(error.get("input"), dict):  # a check across keys: the message names them
        return f"{key}: {message}" if key else message
    shown = repr(error.get("input"))
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    return f"config key {key!r}: {message} (got {shown})"


def validate_config(data: Any, source: str = "config") -> DAMConfig:
    """A :class:`DAMConfig` from a raw mapping; DamError naming every bad key otherwise."""
    if not isinstance(data, dict):
        raise DamError(f"{source}: expected a mapping of config keys, got {type(data).__name__}")
    try:
        return DAMConfig.model_validate(data)
    except ValidationError as e:
        raise DamError(f"{source}: " + "; ".join(_describe(err) for err in e.errors())) from None


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> DAMConfig:
    """Read a run config YAML, apply ``key=value`` / ``--key=value`` overrides in order, validate.

    Values are typed as YAML (``train.lr=1e-3`` is a float, ``wandb.tags=[a,b]`` a list, ``x=None`` null).
    Relative paths in the config are relative to the working directory, as on the command line.
    """
    path = Path(path)
    if not path.is_file():
        raise DamError(f"config file {path} not found")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_YAMLLoader)  # a SafeLoader subclass
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise DamError(f"config file {path} is not valid YAML: {e}".replace("\n", " ")) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise DamError(f"config file {path}: expected a mapping of config keys, got {type(data).__name__}")
    for item in overrides:
        apply_override(data, item)
    return validate_config(data, str(path))


def config_to_dict(config: DAMConfig) -> dict[str, Any]:
    """The resolved config as plain YAML/JSON-able data, paths as in ``config``."""
    return config.model_dump(mode="json")


def _map_paths(data: dict[str, Any], convert: Any) -> dict[str, Any]:
    """``data`` (a :func:`config_to_dict`) with ``convert`` applied to every path: the models, the datasets,
    ``output_dir``, ``data.cache_dir`` and ``train.resume_from``."""
    data = {**data, "models": [dict(m) for m in data["models"]], "data": dict(data["data"])}
    data["train"] = dict(data["train"])
    data["base_model"] = convert(data["base_model"])
    data["output_dir"] = convert(data["output_dir"])
    for m in data["models"]:
        m["model"], m["dataset"] = convert(m["model"]), convert(m["dataset"])
    for section, key in (("data", "cache_dir"), ("train", "resume_from")):
        if data[section][key] is not None:
            data[section][key] = convert(data[section][key])
    return data


def portable_config(config: DAMConfig, folder: str | Path) -> dict[str, Any]:
    """The config as written in a file inside ``folder`` (the run folder's ``config.yaml``, a checkpoint's
    ``trainer_state.json``, the tracker): every local path relative to ``folder`` (``./x``, ``../x``; see
    :mod:`dam.io.paths`), Hub ids as given, so no absolute path of the machine is written."""
    return _map_paths(config_to_dict(config), lambda p: portable_reference(p, folder))


def resolve_config_paths(data: dict[str, Any], folder: str | Path) -> dict[str, Any]:
    """The inverse of :func:`portable_config` for config data read from a file in ``folder``: its ``./x`` and
    ``../x`` paths resolved against ``folder`` (absolute paths and Hub ids as they are)."""
    return _map_paths(data, lambda p: resolve_reference(p, folder))


def save_config(config: DAMConfig, path: str | Path) -> None:
    """Write the resolved config as YAML, local paths relative to the file's folder (:func:`portable_config`);
    :func:`load_saved_config` reads it back from anywhere, ``load_config`` from inside that folder."""
    path = Path(path)
    path.write_text(yaml.safe_dump(portable_config(config, path.parent), sort_keys=False))


def load_saved_config(path: str | Path) -> DAMConfig:
    """A config written by :func:`save_config`, its local paths resolved against the file's folder."""
    path = Path(path)
    data = yaml.load(path.read_text(), Loader=_YAMLLoader)  # a SafeLoader subclass
    return validate_config(resolve_config_paths(data, path.parent), str(path))
