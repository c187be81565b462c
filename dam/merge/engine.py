"""The classic merge engine: plan the output tensors, check the checkpoints from their headers, then stream.

:func:`run_merge` works in three steps:

1. **Plan** (:func:`plan_merge`): open every model lazily (headers only), check that they are compatible
   (architecture, vocabulary size unless a ``tokenizer:`` section rebuilds the vocabularies, tensor names,
   shapes, dtypes, the config.json fields that change the forward), build a ``tokenizer:`` section's output
   vocabulary (:mod:`dam.merge.vocabulary`), lay out the output tensors (``slices`` stack layers and renumber
   them) and resolve every tensor's parameters. Each
   distinct parameter set is tried once on a 2x2 dummy tensor, so a bad value (a density outside (0, 1], slerp
   with three models...) fails here, before any tensor data is read.
2. **Stream**: for each output tensor, read the inputs, check them for NaN/Inf, rebuild vocabulary-indexed ones
   (embedding, ``lm_head``) to the output vocabulary under a ``tokenizer:`` section, call the method on float32
   copies on the compute device and write the result, in plan order, in the output dtype. Two tensors are read
   and merged at a time in worker threads, so I/O and single-threaded kernels overlap; memory holds the inputs
   of those tensors (one per model, plus the method's scratch), never a whole model.
3. **Finish**: ``config.json`` (dtype, layer count and ``vocab_size`` updated), the tokenizer (copied, or a
   ``tokenizer:`` section's, written by transformers) and ``generation_config.json``, the config saved as
   ``mergekit_config.yml`` and a short model card; all of it inside :func:`dam.io.writer.atomic_output_dir`, so a
   failure or Ctrl-C leaves nothing at the output path.

Precision: dam computes every method in float32, whatever ``dtype`` says; ``dtype`` only rounds the inputs as
they are loaded (as mergekit loads them) and ``out_dtype`` (else ``dtype``, else the inputs' dtype) is what is
written. mergekit 0.1.5 instead computes the TIES family in the load dtype, so in bfloat16 its results differ
from dam's by bfloat16 rounding; in float32 the two agree to 1e-6.

Random methods (DARE, DELLA) draw from a ``torch.Generator`` seeded per tensor from ``seed`` and the tensor's
name, so the output does not depend on the order tensors are processed in.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import itertools
import logging
import math
import re
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dam.errors import DamError
from dam.io.checkpoint import TOKENIZER_FILES, CheckpointReader, dtype_name, parse_dtype, resolve_model_path
from dam.io.forward_config import forward_differences
from dam.io.json_files import save_tokenizer
from dam.io.model_folder import check_model_files, render_model_card, write_model_files
from dam.io.paths import portable_reference
from dam.io.writer import ShardedWriter, assign_shards, atomic_output_dir
from dam.merge.chat_template import resolve_chat_template, write_chat_template
from dam.merge.config import MergeConfig, OutputSlice, load_merge_config, resolve_parameters
from dam.merge.registry import MergeMethod
from dam.merge.vocabulary import VocabularyPlan, plan_vocabulary

logger = logging.getLogger(__name__)

_LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
_PRE_LAYER = re.compile(r"embed|\bwte\b|\bwpe\b")  # tensors before the layer stack (the rest go after it)


@dataclass(frozen=True)
class TensorTask:
    """One output tensor: where its inputs come from and how they are merged."""

    name: str  # output tensor name
    models: tuple[str, ...]  # input models, in the method's order (config order; an unlisted base last)
    input_names: tuple[str, ...]  # the tensor's name in each input model
    base_index: int | None  # position of the base model in ``models``
    params: dict[str, Any]  # resolved global parameters
    model_params: tuple[dict[str, Any], ...]  # resolved per-model parameters
    position: float  # gradient position t of the tensor's layer (0 outside the layer stack)
    shape: tuple[int, ...]
    out_dtype: torch.dtype
    floating: bool  # False: an integer/bool buffer, copied when every input agrees
    vocabulary: bool = False  # rows are tokens, rebuilt by the plan's VocabularyPlan before merging

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.out_dtype.itemsize


@dataclass
class MergePlan:
    """Everything :func:`run_merge` needs, decided from configs and headers alone."""

    config: MergeConfig
    method: MergeMethod
    readers: dict[str, CheckpointReader]
    tasks: list[TensorTask]
    out_config: dict[str, Any]
    donor: Path  # model whose generation_config.json is copied
    tokenizer_source: Path | None  # whose tokenizer files are copied (None: the vocabulary plan's tokenizer)
    load_dtype: torch.dtype | None
    config_dtype: torch.dtype | None  # dtype written to config.json (None: keep the donor's)
    chat_template: str | None = None  # written as chat_template.jinja (dam.merge.chat_template)
    vocabulary: VocabularyPlan | None = None  # the tokenizer: section (dam.merge.vocabulary)

    def close(self) -> None:
        for reader in self.readers.values():
            reader.close()


@dataclass
class MergeSummary:
    """What a merge wrote (or, for a dry run, would write)."""

    method: str
    base_model: str | None
    models: list[str]
    num_tensors: int
    num_parameters: int
    out_dtype: str
    total_bytes: int
    num_shards: int
    out: Path
    dry_run: bool
    seed: int
    files: list[str] = field(default_factory=list)

    def describe(self) -> str:
        """A short human-readable plan/result summary (printed by ``dam merge``)."""
        lines = [
            f"method:      {self.method}" + (f" (base_model: {self.base_model})" if self.base_model else ""),
            f"models:      {', '.join(self.models)}",
            f"tensors:     {self.num_tensors} ({self.num_parameters / 1e6:.2f}M parameters)",
            f"output:      {self.out}",
            f"size:        {_human_bytes(self.total_bytes)} of {self.out_dtype} in {self.num_shards} shard(s)",
        ]
        if self.dry_run:
            lines.append("dry run:     config and checkpoints are compatible; nothing was written")
        else:
            lines.append(f"files:       {', '.join(self.files)}")
        return "\n".join(lines)


def _human_bytes(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


@dataclass(frozen=True)
class _Layout:
    """Where a checkpoint's transformer layers are: names ``{prefix}{index}.{suffix}``."""

    prefix: str | None
    layers: dict[int, list[str]]  # layer index -> suffixes, in checkpoint order
    other: list[str]  # names outside the layer stack

    @property
    def num_layers(self) -> int:
        return len(self.layers)


def _split_layer_name(name: str) -> tuple[str, int, str] | None:
    parts = name.split(".")
    for k, part in enumerate(parts[:-1]):
        if part.isdigit():
            return ".".join(parts[:k]) + "." if k else "", int(part), ".".join(parts[k + 1 :])
    return None


def _config_layer_count(config: dict[str, Any]) -> int | None:
    for key in _LAYER_COUNT_KEYS:
        if isinstance(config.get(key), int):
            return config[key]
    return None


def _layout(model: str, reader: CheckpointReader) -> _Layout:
    """Find the layer stack: the numbered prefix whose indices are ``0..n-1`` with ``n`` the config's layer count
    (else the numbered prefix with the most tensors)."""
    by_prefix: dict[str, dict[int, list[str]]] = {}
    for name in reader.names:
        split = _split_layer_name(name)
        if split is not None:
            prefix, index, suffix = split
            by_prefix.setdefault(prefix, {}).setdefault(index, []).append(suffix)
    if not by_prefix:
        return _Layout(None, {}, list(reader.names))
    expected = _config_layer_count(reader.config)
    matching = [p for p, layers in by_prefix.items() if expected is not None and set(layers) == set(range(expected))]
    prefix = matching[0] if matching else max(by_prefix, key=lambda p: sum(map(len, by_prefix[p].values())))
    layers = by_prefix[prefix]
    if set(layers) != set(range(len(layers))):
        raise DamError(f"model {model!r}: layers under {prefix!r} are not numbered 0..{len(layers) - 1}")
    other = [n for n in reader.names if (split := _split_layer_name(n)) is None or split[0] != prefix]
    return _Layout(prefix, {i: layers[i] for i in sorted(layers)}, other)


def _vocab_size(config: dict[str, Any]) -> int | None:
    if "vocab_size" in config:
        return config["vocab_size"]
    text = config.get("text_config")
    return text.get("vocab_size") if isinstance(text, dict) else None


def _check_models_compatible(models: list[str], readers: dict[str, CheckpointReader], vocabularies: bool) -> None:
    """Same architecture everywhere (from config.json), named against the first model; the same vocabulary size
    too unless ``vocabularies`` (a tokenizer section rebuilds the vocabulary-indexed tensors)."""
    ref = models[0]
    ref_cfg = readers[ref].config
    for model in models[1:]:
        cfg = readers[model].config
        for key in ("architectures", "model_type"):
            if cfg.get(key) != ref_cfg.get(key):
                raise DamError(
                    f"model {model!r} has {key} {cfg.get(key)!r} but model {ref!r} has {ref_cfg.get(key)!r}: "
                    "dam merges models of one architecture"
                )
        if not vocabularies and _vocab_size(cfg) != _vocab_size(ref_cfg):
            raise DamError(
                f"vocab size mismatch: model {model!r} has vocab_size {_vocab_size(cfg)} but model {ref!r} has "
                f"{_vocab_size(ref_cfg)}; add a `tokenizer:` section (e.g. source: union) to merge their vocabularies"
            )


def _check_forward_configs(
    models: list[str], readers: dict[str, CheckpointReader], vocabularies: bool, sliced: bool
) -> None:
    """Every model's config.json agrees with the first model's in the fields that change the forward
    (:func:`dam.io.forward_config.forward_differences`; the text config of a multimodal one), compared where both
    files write the field (transformers versions write different defaults). Skipped: ``vocab_size`` when
    ``vocabularies`` (a tokenizer section rebuilds them), the layer count when ``sliced`` (slices stack layers).
    Weights of one shape under different head counts, rotary bases or norms merge into a model that computes
    something none of them did: refused, naming the field."""
    skipped = {"vocab_size"} if vocabularies else set()
    if sliced:
        skipped |= {*_LAYER_COUNT_KEYS, "layer_types"}

    def text(model: str) -> dict[str, Any]:
        cfg = readers[model].config
        return cfg["text_config"] if isinstance(cfg.get("text_config"), dict) else cfg

    ref = models[0]
    for model in models[1:]:
        a, b = text(model), text(ref)
        common = (a.keys() & b.keys()) - skipped
        differences = forward_differences({k: b[k] for k in common}, {k: a[k] for k in common})
        if differences:
            key, mine, theirs = differences[0]
            raise DamError(
                f"model {model!r} has {key} {mine!r} but model {ref!r} has {theirs!r} in config.json: the merge "
                "would run their weights under one config, so dam refuses it"
            )


def _check_same_names(models: list[str], readers: dict[str, CheckpointReader]) -> None:
    ref = models[0]
    ref_names = set(readers[ref].names)
    for model in models[1:]:
        names = set(readers[model].names)
        if ref_names - names:
            raise DamError(f"tensor {sorted(ref_names - names)[0]!r} is missing in model {model!r}")
        if names - ref_names:
            raise DamError(f"tensor {sorted(names - ref_names)[0]!r} of model {model!r} is missing in model {ref!r}")


def _layer_position(offset: int, num_layers: int) -> float:
    """mergekit's gradient position of layer ``offset`` in a slice of ``num_layers`` layers."""
    return offset / (num_layers - 1) if num_layers > 1 else 1.0


def _output_dtype(config: MergeConfig, name: str, models: tuple[str, ...], dtypes: list[torch.dtype]) -> torch.dtype:
    floating = [d.is_floating_point for d in dtypes]
    if not all(floating):
        if any(floating) or len(set(dtypes)) > 1:
            detail = ", ".join(f"{m!r}: {dtype_name(d)}" for m, d in zip(models, dtypes, strict=True))
            raise DamError(f"tensor {name!r} has incompatible dtypes across models ({detail})")
        return dtypes[0]
    if config.out_dtype or config.dtype:
        return parse_dtype(config.out_dtype or config.dtype)  # type: ignore[arg-type]
    out = dtypes[0]
    for d in dtypes[1:]:
        out = torch.promote_types(out, d)
    return out


class _Planner:
    """Builds the list of :class:`TensorTask` for one config (see :func:`plan_merge`)."""

    def __init__(
        self, config: MergeConfig, readers: dict[str, CheckpointReader], vocabulary: VocabularyPlan | None = None
    ):
        self.vocabulary = vocabulary
        self.config = config
        self.method = config.method
        self.readers = readers
        self.layouts = {m: _layout(m, r) for m, r in readers.items()}
        self.tasks: list[TensorTask] = []
        self.slices: list[OutputSlice] = []
        self._probed: set[str] = set()

    def slice_base_index(self, index: int, slice_: OutputSlice) -> int | None:
        base = slice_.base_model or self.config.base_model
        models = [s.model for s in slice_.sources]
        if base is not None and base in models:
            return models.index(base)
        if base is not None and self.method.requires_base:
            raise DamError(
                f"slices[{index}]: base_model {base!r} is not among the slice's sources; {self.method.name} needs "
                "it there (list it with the same layer_range)"
            )
        return None

    def add(self, slice_: OutputSlice, base_index: int | None, name: str, input_names: list[str], t: float) -> None:
        models = tuple(s.model for s in slice_.sources)
        shapes, dtypes = [], []
        for model, input_name in zip(models, input_names, strict=True):
            reader = self.readers[model]
            if input_name not in reader:
                raise DamError(f"tensor {input_name!r} is missing in model {model!r}")
            shapes.append(reader.shape(input_name))
            dtypes.append(reader.dtype(input_name))
        # a vocabulary-indexed tensor (embedding, lm_head): rows = each model's vocab_size, rebuilt to the output's
        vocab_sizes = [_vocab_size(self.readers[m].config) for m in models]
        vocabulary = (
            self.vocabulary is not None
            and t == 0.0
            and (_split_layer_name(input_names[0]) is None or name in self.layouts[models[0]].other)
            and all(len(s) == 2 and s[0] == v for s, v in zip(shapes, vocab_sizes, strict=True))
        )
        first = 1 if vocabulary else 0  # vocabulary rows may differ between models
        for model, input_name, shape in zip(models, input_names, shapes, strict=True):
            if shape[first:] != shapes[0][first:]:
                raise DamError(
                    f"tensor {input_name!r} has shape {list(shape)} in model {model!r} but {list(shapes[0])} in "
                    f"model {models[0]!r}"
                )
        out_dtype = _output_dtype(self.config, name, models, dtypes)
        shape = shapes[0]
        if vocabulary:
            assert self.vocabulary is not None
            shape = (self.vocabulary.size, shape[1])
        params, model_params = resolve_parameters(
            self.config, slice_, tensor_name=name, input_names=input_names, t=t, base_index=base_index
        )
        task = TensorTask(
            name=name,
            models=models,
            input_names=tuple(input_names),
            base_index=base_index,
            params=params,
            model_params=tuple(model_params),
            position=t,
            shape=shape,
            out_dtype=out_dtype,
            floating=out_dtype.is_floating_point,
            vocabulary=vocabulary and out_dtype.is_floating_point,
        )
        if task.floating:
            self.probe(task)
        self.tasks.append(task)

    def probe(self, task: TensorTask) -> None:
        """Run the method once per distinct parameter set on 2x2 random tensors (seeded, distinct per model, so
        data-dependent degenerate cases such as multislerp's antipodal inputs do not trip): its parameter checks
        fail here, not mid-merge."""
        key = repr((task.base_index, len(task.models), task.params, task.model_params))
        if key in self._probed:
            return
        self._probed.add(key)
        dummies = list(torch.randn(len(task.models), 2, 2, generator=torch.Generator().manual_seed(0)))
        base = dummies[task.base_index] if task.base_index is not None else None
        generator = torch.Generator().manual_seed(0) if self.method.random else None
        try:
            self.method.fn(dummies, base, task.base_index, list(task.model_params), task.params, generator)
        except DamError as e:
            raise DamError(f"tensor {task.name!r}: {_name_models(str(e), task.models)}") from None

    def plan(self) -> list[TensorTask]:
        self.slices = slices = self.config.output_slices(lambda m: self.layouts[m].num_layers)
        if self.config.models is not None:
            _check_same_names([s.model for s in slices[0].sources], self.readers)
        first, last = slices[0], slices[-1]
        ref = self.layouts[first.sources[0].model]
        pre = [n for n in ref.other if _PRE_LAYER.search(n)]
        post = [n for n in ref.other if not _PRE_LAYER.search(n)]
        first_base = self.slice_base_index(0, first)
        for name in pre:
            self.add(first, first_base, name, [name] * len(first.sources), 0.0)
        out_index = 0
        for i, slice_ in enumerate(slices):
            base_index = self.slice_base_index(i, slice_)
            length = slice_.sources[0].layer_range[1] - slice_.sources[0].layer_range[0]
            for offset in range(length):
                t = _layer_position(offset, length)
                suffixes = self.layer_suffixes(i, slice_, offset)
                for suffix in suffixes:
                    inputs = []
                    for src in slice_.sources:
                        layout = self.layouts[src.model]
                        inputs.append(f"{layout.prefix}{src.layer_range[0] + offset}.{suffix}")
                    self.add(slice_, base_index, f"{ref.prefix}{out_index}.{suffix}", inputs, t)
                out_index += 1
        last_base = self.slice_base_index(len(slices) - 1, last)
        for name in post:
            self.add(last, last_base, name, [name] * len(last.sources), 0.0)
        return self.tasks

    def layer_suffixes(self, index: int, slice_: OutputSlice, offset: int) -> list[str]:
        """The tensors of one output layer; every source must have the same ones in its corresponding layer."""
        found = []
        for src in slice_.sources:
            layout = self.layouts[src.model]
            layer = src.layer_range[0] + offset
            if layer not in layout.layers:
                raise DamError(
                    f"slices[{index}]: model {src.model!r} has {layout.num_layers} layers, so layer_range "
                    f"{list(src.layer_range)} is out of range"
                )
            found.append((src.model, layout.prefix, layer, layout.layers[layer]))
        ref_model, _, _, ref_suffixes = found[0]
        for model, prefix, layer, suffixes in found[1:]:
            missing = [s for s in ref_suffixes if s not in suffixes]
            if missing:
                raise DamError(f"tensor {f'{prefix}{layer}.{missing[0]}'!r} is missing in model {model!r}")
            extra = [s for s in suffixes if s not in ref_suffixes]
            if extra:
                raise DamError(
                    f"tensor {f'{prefix}{layer}.{extra[0]}'!r} of model {model!r} has no match in {ref_model!r}"
                )
        return ref_suffixes


def _name_models(message: str, models: tuple[str, ...]) -> str:
    """Replace the registry's ``models[i]`` with the model's name, so the message names the culprit."""
    return re.sub(r"models\[(\d+)\]", lambda m: f"model {models[int(m.group(1))]!r}", message)


def _output_config(
    config: MergeConfig, plan_slices: list[OutputSlice], readers: dict[str, CheckpointReader], donor: str
) -> dict[str, Any]:
    """The donor's config.json with the layer count (and per-layer ``layer_types``) of a sliced output."""
    out = copy.deepcopy(readers[donor].config)
    if config.slices is None:
        return out
    total = sum(s.sources[0].layer_range[1] - s.sources[0].layer_range[0] for s in plan_slices)
    key = next((k for k in _LAYER_COUNT_KEYS if k in out), None)
    if key is None:
        logger.warning("config.json of %s has no layer count key; set it to %d by hand", donor, total)
    else:
        out[key] = total
    if isinstance(out.get("layer_types"), list):
        types = []
        for s in plan_slices:
            src = s.sources[0]
            src_types = readers[src.model].config.get("layer_types") or []
            types += [src_types[i] for i in range(*src.layer_range) if i < len(src_types)]
        if len(types) == total:
            out["layer_types"] = types
    return out


def plan_merge(config: MergeConfig) -> MergePlan:
    """Open the models (headers only), check them, and lay out and parametrise every output tensor."""
    models = config.referenced_models()
    readers: dict[str, CheckpointReader] = {}
    try:
        for model in models:
            readers[model] = CheckpointReader(model)
        section = config.vocabulary_section()
        _check_models_compatible(models, readers, vocabularies=section is not None)
        vocabulary = None
        if section is not None:
            if section.source not in ("base", "union", *readers):
                raise DamError(f"tokenizer.source {section.source!r}: use base, union or one of the merged models")
            folders = {m: r.path for m, r in readers.items()}
            sizes = {m: _vocab_size(r.config) for m, r in readers.items()}
            base = config.base_model or models[0]
            vocabulary = plan_vocabulary(section, base, models, folders, sizes)
        planner = _Planner(config, readers, vocabulary)
        tasks = planner.plan()
        _check_forward_configs(models, readers, vocabularies=section is not None, sliced=config.slices is not None)
        donor = config.base_model or planner.slices[0].sources[0].model
        out_config = _output_config(config, planner.slices, readers, donor)
        if vocabulary is not None:  # config.json's vocab_size (top level, or a multimodal config's text_config)
            (out_config if "vocab_size" in out_config else out_config["text_config"])["vocab_size"] = vocabulary.size
        tokenizer_source: Path | None
        if vocabulary is not None:
            tokenizer_source = None
        elif config.tokenizer_source in (None, "base"):
            tokenizer_source = readers[donor].path
        elif config.tokenizer_source in readers:
            tokenizer_source = readers[config.tokenizer_source].path
        else:
            try:
                tokenizer_source = resolve_model_path(config.tokenizer_source)
            except DamError as e:
                raise DamError(f"tokenizer_source: {e}") from None
        chat_template = resolve_chat_template(config.chat_template, [readers[m].path for m in models])
        if (
            chat_template is not None
            and tokenizer_source is not None
            and not any((tokenizer_source / f).exists() for f in TOKENIZER_FILES)
        ):
            raise DamError(
                f"chat_template: the tokenizer source {str(tokenizer_source)!r} has no tokenizer to set it on"
            )
        # the files copied into the output (the donor's generation config, the tokenizer source's tokenizer) are
        # read once here, so that a damaged one is named before any tensor is merged, not copied as it is
        check_model_files(readers[donor].path, f"model {donor!r}")
        if tokenizer_source is not None and tokenizer_source != readers[donor].path:
            check_model_files(tokenizer_source, "tokenizer_source")
    except BaseException:
        for reader in readers.values():
            reader.close()
        raise
    out_name = config.out_dtype or config.dtype
    return MergePlan(
        config=config,
        method=config.method,
        readers=readers,
        tasks=tasks,
        out_config=out_config,
        donor=readers[donor].path,
        tokenizer_source=tokenizer_source,
        load_dtype=parse_dtype(config.dtype) if config.dtype else None,
        config_dtype=parse_dtype(out_name) if out_name else None,
        chat_template=chat_template,
        vocabulary=vocabulary,
    )


def tensor_seed(seed: int, name: str) -> int:
    """A 63-bit generator seed from the run's seed and a tensor name (stable across processes and orders)."""
    digest = hashlib.blake2b(f"{seed}\0{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def _load_inputs(plan: MergePlan, task: TensorTask, device: torch.device) -> list[Tensor]:
    """Read one task's inputs: floats rounded to ``dtype`` (if set) then float32 on ``device``, checked finite."""
    tensors = []
    for model, name in zip(task.models, task.input_names, strict=True):
        if not task.floating:
            tensors.append(plan.readers[model].get(name, device=device))
            continue
        x = plan.readers[model].get(name, dtype=plan.load_dtype, device=device).float()
        if not torch.isfinite(x.sum()) and not bool(torch.isfinite(x).all()):
            raise DamError(f"model {model!r}: tensor {name!r} contains NaN or Inf")
        tensors.append(x)
    if task.vocabulary:
        assert plan.vocabulary is not None
        tensors = plan.vocabulary.align(tensors, task.models, task.base_index)
    return tensors


def _merge_task(plan: MergePlan, task: TensorTask, tensors: list[Tensor], seed: int) -> Tensor:
    if not task.floating:
        if any(not torch.equal(x, tensors[0]) for x in tensors[1:]):
            raise DamError(
                f"tensor {task.name!r}: this non-float buffer differs between models, so it cannot be merged"
            )
        return tensors[0]
    generator = None
    if plan.method.random:
        generator = torch.Generator(device=tensors[0].device).manual_seed(tensor_seed(seed, task.name))
    base = tensors[task.base_index] if task.base_index is not None else None
    try:
        out = plan.method.fn(tensors, base, task.base_index, list(task.model_params), task.params, generator)
    except DamError as e:
        raise DamError(f"tensor {task.name!r}: {_name_models(str(e), task.models)}") from None
    return out.to(task.out_dtype)


def _load_and_merge(plan: MergePlan, task: TensorTask, device: torch.device, seed: int) -> Tensor:
    return _merge_task(plan, task, _load_inputs(plan, task, device), seed)


def _merged(plan: MergePlan, device: torch.device, seed: int, workers: int) -> Iterator[tuple[TensorTask, Tensor]]:
    """Yield every task with its merged tensor, in plan order, with up to ``workers`` tasks in flight.

    Each task is read and merged in a worker thread. File reads and torch kernels release the GIL, so reading,
    the math of another tensor (some kernels, such as sorts, use one core) and writing overlap; memory holds at
    most ``workers`` tasks' inputs and results.
    """
    tasks = iter(plan.tasks)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dam-merge") as pool:
        window: deque[tuple[TensorTask, Future[Tensor]]] = deque()
        try:
            for task in itertools.islice(tasks, workers):
                window.append((task, pool.submit(_load_and_merge, plan, task, device, seed)))
            while window:
                task, future = window.popleft()
                result = future.result()
                following = next(tasks, None)
                if following is not None:
                    window.append((following, pool.submit(_load_and_merge, plan, following, device, seed)))
                yield task, result
                del result
        finally:
            for _, future in window:
                future.cancel()


def merged_tensors(
    config: MergeConfig, *, seed: int = 0, device: str = "cpu", workers: int = 2
) -> Iterator[tuple[str, Tensor]]:
    """Every output tensor of ``config``'s merge, ``(name, tensor)`` in plan order, in memory instead of on disk.

    The same plan, checks and math as :func:`run_merge` (a search over merges evaluates candidates this way and
    writes only the one it keeps). The plan, with every check, runs at the first ``next``, before any tensor data
    is read; the checkpoints are closed when the generator is exhausted or closed.
    """
    plan = plan_merge(config)
    try:
        with contextlib.closing(_merged(plan, torch.device(device), seed, workers)) as merged:
            for task, tensor in merged:
                yield task.name, tensor
    finally:
        plan.close()


def _model_card(plan: MergePlan, out: Path, seed: int, config_text: str) -> str:
    """The output's ``README.md``: every model read in ``base_model`` (as written in ``config_text``: Hub ids as
    given, local folders relative to ``out``), the method, and the config."""
    config = plan.config
    models = [portable_reference(m, out) for m in config.referenced_models()]
    base = portable_reference(config.base_model, out) if config.base_model else None
    lines = [
        f"# {out.name}",
        "",
        "A merge of pre-trained language models made with [dam](https://arxiv.org/abs/2410.08371)'s classic merges "
        f"using the `{config.merge_method}` method (mergekit-compatible config"
        + (f", random seed {seed}" if plan.method.random else "")
        + ").",
        "",
    ]
    if base:
        lines += [f"Base model: `{base}`", ""]
    lines += ["Models merged:", *[f"- `{m}`" for m in models if m != base], ""]
    lines += ["Configuration (also saved as `mergekit_config.yml`):", "", "```yaml", config_text.rstrip(), "```"]
    return render_model_card(base_models=models, tags=["merge", "dam", "mergekit"], body="\n".join(lines) + "\n")


def run_merge(
    config: MergeConfig | str | Path,
    out: str | Path,
    *,
    force: bool = False,
    shard_size: int = 5 * 10**9,
    device: str = "cpu",
    seed: int = 0,
    dry_run: bool = False,
    progress: bool = True,
    workers: int = 2,
) -> MergeSummary:
    """Merge the models of ``config`` (a :class:`MergeConfig` or a YAML path) into the folder ``out``.

    ``shard_size``: bytes per output shard. ``device``: where the math runs (``cpu``, ``cuda``, ``cuda:1``).
    ``seed``: seeds the random methods (per tensor, see :func:`tensor_seed`). ``dry_run``: plan and check from
    headers, write nothing. ``progress``: a tqdm bar over tensors (shown on a terminal only). ``workers``: how many
    tensors are read and merged at once (memory grows with it; 2 overlaps I/O and single-threaded kernels).
    Raises :class:`DamError` on bad input; nothing is left at ``out`` unless the merge completes.
    """
    if not isinstance(config, MergeConfig):
        config = load_merge_config(config)
    out = Path(out).expanduser().absolute()
    try:
        compute = torch.device(device)
    except RuntimeError as e:
        raise DamError(f"--device {device!r}: {e}") from None
    if compute.type == "cuda" and not torch.cuda.is_available():
        raise DamError(f"--device {device}: CUDA is not available on this machine")
    if workers < 1:
        raise DamError(f"workers must be at least 1, got {workers}")
    plan = plan_merge(config)
    try:
        sizes = [t.nbytes for t in plan.tasks]
        dtypes = sorted({dtype_name(t.out_dtype) for t in plan.tasks if t.floating})
        summary = MergeSummary(
            method=config.merge_method,
            base_model=config.base_model,
            models=[m for m in config.referenced_models() if m != config.base_model],
            num_tensors=len(plan.tasks),
            num_parameters=sum(math.prod(t.shape) for t in plan.tasks),
            out_dtype="/".join(dtypes) or "n/a",
            total_bytes=sum(sizes),
            num_shards=assign_shards(sizes, shard_size)[-1] + 1 if sizes else 0,
            out=out,
            dry_run=dry_run,
            seed=seed,
        )
        if dry_run:
            return summary
        with atomic_output_dir(out, force=force) as tmp:
            logger.info(
                "%s: merging %d tensors of %d model(s) into %s",
                config.merge_method,
                len(plan.tasks),
                len(plan.readers),
                out,
            )
            layout = [(t.name, t.shape, t.out_dtype) for t in plan.tasks]
            writer = ShardedWriter(tmp, layout, max_shard_size=shard_size)
            try:
                from dam.progress import progress_bar

                bar = progress_bar(total=len(plan.tasks), unit="tensor", desc=f"merge {out.name}", enabled=progress)
                with bar, contextlib.closing(_merged(plan, compute, seed, workers)) as merged:
                    for task, tensor in merged:
                        writer.add(task.name, tensor)
                        del tensor
                        bar.update()
                files = writer.finalize()
            except BaseException:
                writer.abort()
                raise
            write_model_files(
                tmp,
                plan.out_config,
                dtype=plan.config_dtype,
                tokenizer_source=plan.tokenizer_source,
                generation_config_source=plan.donor,
            )
            if plan.vocabulary is not None:
                save_tokenizer(plan.vocabulary.tokenizer, tmp)
            if plan.chat_template is not None:
                write_chat_template(tmp, plan.chat_template)
            config_text = config.portable_text(out)
            (tmp / "mergekit_config.yml").write_text(config_text, encoding="utf-8")
            (tmp / "README.md").write_text(_model_card(plan, out, seed, config_text), encoding="utf-8")
            summary.files = sorted(p.name for p in tmp.iterdir())
        logger.info("wrote %s (%s)", out, ", ".join(files))
        return summary
    finally:
        plan.close()


__all__ = ["MergePlan", "MergeSummary", "TensorTask", "merged_tensors", "plan_merge", "run_merge", "tensor_seed"]
