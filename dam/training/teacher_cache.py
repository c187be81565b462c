"""Teacher targets for DAM: computed on the fly per batch, or cached once on disk as top-K log-probabilities.

Teacher k is the DAM wrapper with source k's weights selected (``with model.select_source(k): model(...)``), so
no extra copy of any model is needed. Targets are **log-probabilities** ``log softmax(z)`` of the teacher logits
z, not the raw logits: they differ from z by one constant per token, so ``softmax(target / T)`` over the whole
vocabulary or over any K of its entries is exactly that of the logits, at every temperature T, while the top
entries sit near 0, where float16 is most precise. They also keep the probability mass outside the top K
(``1 - sum exp(target)``), which a tail-aware loss can use.

Cache layout (``data.cache_dir``, written atomically by :func:`cache_teacher_logits`)::

    dam_teacher_cache.json   the key: what the cache was computed from (see teacher_cache_key), local paths
                             relative to the cache folder (see stored_key)
    dataset/                 datasets.Dataset.save_to_disk: the columns of dam.training.data.build_train_dataset
                             plus teacher_logprobs (float16) and teacher_indices (int32), each [T, S, K] per row:
                             T tokens, S teachers (1 for pairing "own", N for "all"), K = top_k, best first

Storage is T * S * K * 6 bytes per sequence: 0.8 MB for T=2048, K=64, one teacher, against 262 MB of float32
full-vocabulary logits at a 32k vocabulary.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import datasets
import numpy as np
import torch
from datasets.arrow_writer import ArrowWriter
from tqdm import tqdm

from dam.adaptive.losses import chunk_rows, teacher_distribution, teacher_mixture, teacher_spread
from dam.errors import DamError
from dam.io.checkpoint import resolve_folder
from dam.io.lora import split_reference
from dam.io.paths import portable_paths, portable_reference
from dam.io.writer import atomic_output_dir
from dam.training.data import ALL_SOURCES, DataCollator, build_train_dataset, load_tokenizer, source_renderings

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from dam.training.config import DAMConfig, DataConfig

logger = logging.getLogger(__name__)

CACHE_VERSION = 2  # 2: local paths stored relative to the cache folder, Hub models by revision
KEY_FILE = "dam_teacher_cache.json"
DATASET_DIR = "dataset"
_WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.index.json")


class TeacherModel(Protocol):
    """What teacher computation needs from the DAM wrapper: source selection and a causal-LM forward."""

    def select_source(self, k: int) -> AbstractContextManager[Any]: ...

    def __call__(self, *, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs: Any) -> Any: ...


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def model_identity(name_or_path: str | Path) -> dict[str, Any]:
    """A cheap identity of a checkpoint: resolved folder (a Hub model: ``id@<snapshot revision>``), a hash of
    ``config.json``, and size + mtime of each weight file. Rewriting weights changes the mtime (and usually the
    size), so this catches changed sources without reading any weights; copying a folder also changes mtimes,
    which only costs a recomputation. A GGUF source is identified by its file (absolute path, size, mtime), not by
    the cache folder of its config and tokenizer.
    """
    from dam.io.gguf import file_identity, gguf_source

    model, adapter = split_reference(name_or_path)
    gguf_file = gguf_source(model)
    if gguf_file is not None:  # a GGUF file (or its cache folder): the file itself, its size and mtime
        stat = file_identity(gguf_file)
        identity = {
            "path": stat["gguf"],
            "config": _sha256((resolve_folder(gguf_file) / "config.json").read_bytes()),
            "weights": {gguf_file.name: [stat["size"], stat["mtime_ns"]]},
        }
        if adapter is not None:
            identity["adapter"] = model_identity(resolve_folder(adapter))
        return identity
    path = resolve_folder(model).resolve()
    local = Path(model).expanduser().is_dir()
    config = path / "config.json"
    weights = sorted({f for pattern in _WEIGHT_PATTERNS for f in path.glob(pattern)})
    identity = {
        "path": str(path) if local else f"{model}@{path.name}",
        "config": _sha256(config.read_bytes()) if config.exists() else None,
        "weights": {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in weights},
    }
    if adapter is not None:  # a LoRA source (MODEL+ADAPTER): the adapter's files too
        identity["adapter"] = model_identity(resolve_folder(adapter))
    return identity


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """Hash of the tokenizer's full definition (vocabulary, merges, normalisation, special tokens, chat template)."""
    if tokenizer.is_fast:
        definition = tokenizer.backend_tokenizer.to_str()
    else:
        definition = json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = json.dumps([getattr(tokenizer, "chat_template", None), tokenizer.all_special_tokens])
    return _sha256(definition.encode() + extra.encode())


def data_fingerprint(dataset: datasets.Dataset) -> str:
    """Hash of the training rows themselves: token ids, labels, sequence boundaries, teacher and dataset indices."""
    rows = dataset.select_columns(["input_ids", "labels", "source", "dataset_index"])  # a cache's rows carry more
    table = (rows if rows._indices is None else rows.flatten_indices(keep_in_memory=True)).data
    h = hashlib.sha256()
    for column in ("input_ids", "labels"):
        array = table.column(column).combine_chunks()
        offsets = array.offsets.to_numpy()
        h.update((offsets - offsets[0]).astype(np.int64).tobytes())
        h.update(array.flatten().to_numpy().astype(np.int32).tobytes())
    for column in ("source", "dataset_index"):
        h.update(table.column(column).to_numpy().astype(np.int32).tobytes())
    return h.hexdigest()


def teacher_cache_key(
    base_model: str | Path,
    sources: Sequence[tuple[str, str | Path]],
    tokenizer: PreTrainedTokenizerBase,
    dataset: datasets.Dataset,
    config: DataConfig,
    top_k: int,
) -> dict[str, Any]:
    """Everything a cache of teacher targets depends on, as a JSON-able dict; equal keys mean a reusable cache.

    ``sources`` is ``[(name, model)]`` in the wrapper's source order (the ``source`` column indexes it). The data
    enter through :func:`data_fingerprint` of the tokenized training set (which already reflects the dataset
    files, sampling seed and count, templates, ``max_length``, ``packing``, ``pairing`` and
    ``response_only_loss``); those settings are also listed by name so that a refusal can say what changed.
    Learning rate, steps, loss weights and anything else a sweep varies are not part of the key.
    """
    if top_k < 1:
        raise DamError(f"loss.top_k must be at least 1 to cache teacher logits, got {top_k}")
    return {
        "version": CACHE_VERSION,
        "base_model": {"model": str(base_model), **model_identity(base_model)},
        "sources": [{"name": name, "model": str(model), **model_identity(model)} for name, model in sources],
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "data": data_fingerprint(dataset),
        "num_sequences": len(dataset),
        "max_length": config.max_length,
        "packing": config.packing,
        "pairing": config.pairing,
        "response_only_loss": config.response_only_loss,
        "top_k": top_k,
    }


def _model_changes(what: str, old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    changes = []
    if old.get("path") != new.get("path"):
        changes.append(f"{what} is now {new.get('path')} (was {old.get('path')})")
    if old.get("config") != new.get("config"):
        changes.append(f"{what}: config.json changed")
    old_w, new_w = old.get("weights", {}), new.get("weights", {})
    changed = sorted(f for f in set(old_w) | set(new_w) if old_w.get(f) != new_w.get(f))
    if changed:
        changes.append(f"{what}: weight files changed ({', '.join(changed)})")
    return changes


def describe_key_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Human-readable differences between a stored cache key and the current one (empty when they match)."""
    if old.get("version") != new.get("version"):
        return [f"cache format version {old.get('version')} -> {new.get('version')}"]
    changes = _model_changes(
        f"base model {new['base_model']['model']!r}", old.get("base_model", {}), new["base_model"]
    )
    old_names = [s.get("name") for s in old.get("sources", [])]
    new_names = [s["name"] for s in new["sources"]]
    if old_names != new_names:
        changes.append(f"models (in order) {old_names} -> {new_names}")
    else:
        for o, n in zip(old["sources"], new["sources"], strict=True):
            changes += _model_changes(f"model {n['name']!r}", o, n)
    if old.get("tokenizer") != new["tokenizer"]:
        changes.append("the base tokenizer changed")
    for key in ("max_length", "packing", "pairing", "response_only_loss", "top_k"):
        if old.get(key) != new[key]:
            changes.append(f"{key if key == 'top_k' else 'data.' + key}: {old.get(key)} -> {new[key]}")
    if old.get("data") != new["data"]:
        counts = (old.get("num_sequences"), new["num_sequences"])
        detail = f" ({counts[0]} -> {counts[1]} sequences)" if counts[0] != counts[1] else ""
        changes.append(f"the tokenized training data changed{detail}")
    if not changes and old != new:
        changes.append("the cache key differs")
    return changes


def stored_key(key: dict[str, Any], cache_dir: str | Path) -> dict[str, Any]:
    """``key`` as ``cache_dir`` stores it: local paths relative to the cache folder (``./x``, ``../x``; Hub ids as
    given), so the key file holds no absolute path of the machine. Stored keys are compared in this form."""
    folder = Path(cache_dir).expanduser().absolute()

    def model(entry: dict[str, Any]) -> dict[str, Any]:
        return {**portable_paths(entry, folder), "model": portable_reference(entry["model"], folder)}

    return {**key, "base_model": model(key["base_model"]), "sources": [model(s) for s in key["sources"]]}


def read_cache_key(cache_dir: str | Path) -> dict[str, Any] | None:
    """The key stored in ``cache_dir``, or ``None`` when there is no complete cache there."""
    path = Path(cache_dir) / KEY_FILE
    if not path.exists() or not (Path(cache_dir) / DATASET_DIR).is_dir():
        return None
    return json.loads(path.read_text())


def _open_cache(cache_dir: Path) -> datasets.Dataset:
    """The cached dataset, memory-mapped, in numpy format: rows come back as arrays, not nested Python lists
    (decoding a [T, S, K] target as lists would cost more than the training step that uses it)."""
    return datasets.load_from_disk(str(cache_dir / DATASET_DIR)).with_format("numpy")


def load_teacher_cache(cache_dir: str | Path, key: dict[str, Any]) -> datasets.Dataset:
    """The cached training set (training columns + teacher targets) if its key equals ``key``; else a DamError
    saying what changed since the cache was written."""
    cache_dir = Path(cache_dir)
    stored = read_cache_key(cache_dir)
    if stored is None:
        raise DamError(f"data.cache_dir: no teacher-logit cache at {cache_dir}; run `dam cache-logits CONFIG` first")
    changes = describe_key_changes(stored, stored_key(key, cache_dir))
    if changes:
        raise DamError(
            f"data.cache_dir: the teacher-logit cache at {cache_dir} is stale: {'; '.join(changes)}. "
            "Recompute it with `dam cache-logits CONFIG --force` (or point data.cache_dir elsewhere)"
        )
    dataset = _open_cache(cache_dir)
    if len(dataset) != key["num_sequences"]:
        raise DamError(f"data.cache_dir: {cache_dir} holds {len(dataset)} rows, its key says {key['num_sequences']}")
    logger.info("using the teacher-logit cache at %s (%d sequences)", cache_dir, len(dataset))
    return dataset


def _model_device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def _teacher_plan(
    source: torch.Tensor, num_sources: int, every_teacher: bool = False
) -> tuple[list[tuple[int, int, torch.Tensor]], int]:
    """``[(teacher, slot, rows)]`` for a batch's ``source`` column ``[B]``, and the number of slots S: one teacher
    forward per distinct index over its rows into slot 0 (S = 1), or every teacher over all rows into its own slot
    (S = N) when every row is :data:`ALL_SOURCES`.

    ``every_teacher``: every teacher 0..N-1 runs, in order, whatever the rows name (a teacher no row names runs on
    no row); sharded sources need it, since each forward gathers weights collectively and every process must run
    the same forwards."""
    source = source.to(torch.long).cpu()
    every = source == ALL_SOURCES
    if bool(every.any()) and not bool(every.all()):
        raise DamError("a batch mixes rows for all teachers (source -1) with rows for one teacher")
    bad = source[(source < ALL_SOURCES) | (source >= num_sources)]
    if len(bad):
        raise DamError(f"source index {int(bad[0])} is out of range for {num_sources} sources")
    if bool(every.all()):
        return [(k, k, torch.arange(len(source))) for k in range(num_sources)], num_sources
    teachers = range(num_sources) if every_teacher else [int(k) for k in source.unique()]
    return [(k, 0, (source == k).nonzero().flatten()) for k in teachers], 1


def _teacher_forward(
    model: TeacherModel,
    k: int,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    rows: torch.Tensor,
    last_hidden: bool = False,
    layer_states: bool = False,
) -> Any:
    """Teacher k's logits ``[len(rows), T, V]`` for ``rows`` (its final hidden states ``[len(rows), T, hidden]``
    with ``last_hidden``; with ``layer_states`` too, the pair of those and its hidden states after every decoder
    layer ``[L, len(rows), T, hidden]``); with no rows, a forward of the first row whose result is dropped (the
    forward itself is what the other processes of a sharded run wait for)."""
    picked = rows.to(input_ids.device) if len(rows) else torch.zeros(1, dtype=torch.long, device=input_ids.device)
    with model.select_source(k):
        inputs = {"input_ids": input_ids[picked], "attention_mask": attention_mask[picked]}
        if layer_states:
            final, states = model(**inputs, last_hidden=True, layer_states=True)
            return final[: len(rows)], torch.stack(states)[:, : len(rows)]
        out = model(**inputs, last_hidden=True) if last_hidden else model(**inputs).logits
    return out[: len(rows)]


@torch.no_grad()
def teacher_hidden_states(
    model: TeacherModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    source: torch.Tensor,
    num_sources: int,
    every_teacher: bool = False,
    layer_states: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Full-vocabulary teacher targets for one batch, before the ``lm_head``: each row's teachers' final hidden
    states ``[B, S, T, hidden]`` (compute dtype), the teacher of each slot ``[B, S]`` (int64), and with
    ``layer_states`` their hidden states after every decoder layer ``[L, B, S, T, hidden]`` (the targets of
    ``loss.align``; else None); S is 1, or N for :data:`ALL_SOURCES` rows. The loss projects the final states
    chunk by chunk (:func:`hidden_state_target`), so no ``[B, T, V]`` tensor is made. Needs ``model(...,
    last_hidden=True)`` (a DAM model whose :meth:`~dam.adaptive.model.DAMModel.head_fusable` is True).
    ``every_teacher``: see :func:`_teacher_plan`."""
    batch, length = input_ids.shape
    plan, slots = _teacher_plan(source, num_sources, every_teacher)
    hidden = layers = None
    teacher = torch.zeros((batch, slots), dtype=torch.long, device=input_ids.device)
    for k, slot, rows in plan:
        out = _teacher_forward(model, k, input_ids, attention_mask, rows, last_hidden=True, layer_states=layer_states)
        states, per_layer = out if layer_states else (out, None)
        if hidden is None:
            hidden = states.new_zeros((batch, slots, length, states.shape[-1]))
        rows_out = rows.to(states.device)
        hidden[rows_out, slot] = states
        teacher[rows_out, slot] = k
        if per_layer is not None:
            if layers is None:
                layers = per_layer.new_zeros((per_layer.shape[0], batch, slots, length, per_layer.shape[-1]))
            layers[:, rows_out, slot] = per_layer
    assert hidden is not None  # a plan has at least one teacher
    return hidden, teacher, layers


def _slot_projector(
    hidden: torch.Tensor, teacher: torch.Tensor, source_logits: Callable[[torch.Tensor, int], torch.Tensor]
) -> Callable[[slice, int], torch.Tensor]:
    """``slot_logits(rows, slot)``: the logits (r, V) of the flattened tokens ``rows`` (row-major over ``[B, T]``)
    of slot ``slot``, each token through its own teacher's ``lm_head``, from :func:`teacher_hidden_states`'
    ``hidden`` ``[B, S, T, hidden]`` and ``teacher`` ``[B, S]``."""
    batch, slots, length, width = hidden.shape
    states = hidden.transpose(1, 2).reshape(batch * length, slots, width)  # (M, S, hidden)
    owners = teacher[:, None, :].expand(batch, length, slots).reshape(batch * length, slots)  # (M, S)

    def slot_logits(rows: slice, slot: int) -> torch.Tensor:
        h, owner = states[rows, slot], owners[rows, slot]
        ks = owner.unique().tolist()
        if len(ks) == 1:
            return source_logits(h, ks[0])
        out = None
        for k in ks:
            picked = (owner == k).nonzero().flatten()
            logits = source_logits(h[picked], k)
            out = logits.new_empty((len(owner), logits.shape[-1])) if out is None else out
            out[picked] = logits
        return out

    return slot_logits


def hidden_state_target(
    hidden: torch.Tensor,
    teacher: torch.Tensor,
    source_logits: Callable[[torch.Tensor, int], torch.Tensor],
    temperature: float,
) -> Callable[[slice], tuple[torch.Tensor, torch.Tensor]]:
    """``target(rows)`` for :func:`dam.adaptive.losses.distribution_kl_loss`: ``log pbar`` (r, V) float32 and the
    spread (r,) of the flattened tokens ``rows`` (row-major over ``[B, T]``), from :func:`teacher_hidden_states`'
    ``hidden`` ``[B, S, T, hidden]`` and ``teacher`` ``[B, S]``; ``source_logits(states, k)`` is teacher k's
    ``lm_head`` (:meth:`dam.adaptive.model.DAMModel.source_logits`). Equal to :func:`teacher_distributions`' rows,
    up to the rounding of a GEMM over a chunk of rows instead of whole sequences."""
    slot_logits = _slot_projector(hidden, teacher, source_logits)

    def target(rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        return teacher_mixture((slot_logits(rows, s) for s in range(hidden.shape[1])), temperature)

    return target


@torch.no_grad()
def hidden_state_topk(
    hidden: torch.Tensor,
    teacher: torch.Tensor,
    source_logits: Callable[[torch.Tensor, int], torch.Tensor],
    top_k: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """On-the-fly top-K targets from the teachers' final hidden states, a chunk of tokens at a time: what
    :func:`teacher_logprobs` returns with ``top_k``, ``[B, S, T, K]`` float32 log-probabilities ``z_k - logsumexp(z)``
    of each token's K most likely tokens (best first) and their int64 ids, without its ``[rows, T, V]`` logits.

    ``hidden`` ``[B, S, T, hidden]`` and ``teacher`` ``[B, S]`` from :func:`teacher_hidden_states`;
    ``source_logits(states, k)`` is teacher k's ``lm_head`` (:meth:`dam.adaptive.model.DAMModel.source_logits`;
    sharded sources must have the ``lm_head``'s unit gathered around this call). The logits exist
    :func:`dam.adaptive.losses.chunk_rows` ``(V)`` tokens of one slot at a time, as the loss's do (a float32
    temporary of 16 MiB up to a 16k vocabulary, 256 tokens' worth above), whatever the batch. Equal to
    :func:`teacher_logprobs`' top-K up to the rounding of a GEMM over a chunk of rows instead of whole sequences;
    an index can differ only where two logits tie to that rounding at the K-th place.
    """
    batch, slots, length, _ = hidden.shape
    slot_logits = _slot_projector(hidden, teacher, source_logits)
    vocab = slot_logits(slice(0, 1), 0).shape[-1]  # one token's logits: the vocabulary's size
    if top_k > vocab:
        raise DamError(f"loss.top_k={top_k} is larger than the vocabulary ({vocab})")
    tokens, step = batch * length, chunk_rows(vocab)
    values = torch.empty((tokens, slots, top_k), dtype=torch.float32, device=hidden.device)
    indices = torch.empty((tokens, slots, top_k), dtype=torch.long, device=hidden.device)
    for start in range(0, tokens, step):
        rows = slice(start, start + step)
        for slot in range(slots):
            logits = slot_logits(rows, slot)  # (r, V), the compute dtype
            top = logits.topk(top_k, dim=-1)
            values[rows, slot] = top.values.float() - logits.float().logsumexp(-1, keepdim=True)
            indices[rows, slot] = top.indices
            del logits, top
    shape = (batch, length, slots, top_k)
    return values.view(shape).transpose(1, 2), indices.view(shape).transpose(1, 2)


@torch.no_grad()
def teacher_distributions(
    model: TeacherModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    source: torch.Tensor,
    num_sources: int,
    temperature: float,
    every_teacher: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-vocabulary teacher targets for one batch, compactly: ``log pbar``, the log of the mean over each row's
    teachers (its own, or all N for :data:`ALL_SOURCES` rows) of ``p = softmax(z / T)``, ``[B, T, V]`` float32, and
    the teachers' spread around it (:func:`dam.adaptive.losses.teacher_spread`, 0 for one teacher), ``[B, T]``: what
    :func:`dam.adaptive.losses.distribution_kl` takes. One ``[B, T, V]`` tensor whatever the number of teachers,
    where per-teacher log-probabilities would be ``[B, S, T, V]``. ``every_teacher``: see :func:`_teacher_plan`.
    The training loop uses it only for models whose logits are not their ``lm_head``'s output (see
    :func:`teacher_hidden_states` for the others).
    """
    batch, length = input_ids.shape
    plan, slots = _teacher_plan(source, num_sources, every_teacher)
    log_mean = neg_entropy = None
    for k, _, rows in plan:
        logits = _teacher_forward(model, k, input_ids, attention_mask, rows)
        if log_mean is None:
            shape = (batch, length, logits.shape[-1])
            log_mean = torch.full(shape, -math.inf, dtype=torch.float32, device=logits.device)
            neg_entropy = torch.zeros((batch, length), dtype=torch.float32, device=logits.device)
        for j, row in enumerate(rows.to(logits.device)):  # one row at a time bounds the float32 [T, V] temporaries
            log_p, h = teacher_distribution(logits[j], temperature)
            log_mean[row] = log_p if slots == 1 else torch.logaddexp(log_mean[row], log_p)
            neg_entropy[row] += h / slots
        del logits
    if slots == 1:
        return log_mean, torch.zeros_like(neg_entropy)
    log_mean -= math.log(slots)
    return log_mean, teacher_spread(log_mean, neg_entropy)


@torch.no_grad()
def teacher_logprobs(
    model: TeacherModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    source: torch.Tensor,
    num_sources: int,
    top_k: int | None = None,
    every_teacher: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Teacher log-probabilities for one batch, each row from the teacher(s) its ``source`` names.

    ``input_ids``/``attention_mask``: ``[B, T]``; ``source``: ``[B]``, a teacher index per row (``pairing:
    own``; each distinct index is one teacher forward over its rows) or :data:`ALL_SOURCES` on every row
    (``pairing: all``; every teacher runs on the whole batch). Returns ``(logprobs, indices)``: with ``top_k``,
    ``[B, S, T, K]`` float32 log-probabilities of the K most likely tokens (best first) and their int64 token
    ids; without, ``[B, S, T, V]`` full log-probabilities and ``None``. S is 1, or N for ``ALL_SOURCES`` rows.
    """
    batch, length = input_ids.shape
    plan, slots = _teacher_plan(source, num_sources, every_teacher)
    values = indices = None
    for k, slot, rows in plan:
        logits = _teacher_forward(model, k, input_ids, attention_mask, rows)
        vocab = logits.shape[-1]
        if top_k is not None and top_k > vocab:
            raise DamError(f"loss.top_k={top_k} is larger than the vocabulary ({vocab})")
        width = vocab if top_k is None else top_k
        if values is None:
            values = torch.zeros((batch, slots, length, width), dtype=torch.float32, device=logits.device)
            if top_k is not None:
                indices = torch.zeros((batch, slots, length, width), dtype=torch.long, device=logits.device)
        rows_out = rows.to(logits.device)
        for j, row in enumerate(rows_out):  # one row at a time bounds the float32 [T, V] temporaries
            lse = logits[j].float().logsumexp(-1, keepdim=True)  # [T, 1]
            if top_k is None:
                values[row, slot] = logits[j].float() - lse
            else:
                top = logits[j].topk(top_k, dim=-1)
                values[row, slot] = top.values.float() - lse
                indices[row, slot] = top.indices
        del logits
    return values, indices


def compute_teacher_cache(
    model: TeacherModel,
    dataset: datasets.Dataset,
    path: str | Path,
    *,
    num_sources: int,
    top_k: int,
    batch_size: int = 8,
    progress: bool = False,
) -> datasets.Dataset:
    """Run the teachers over ``dataset`` and write it, with ``teacher_logprobs``/``teacher_indices``, as one arrow
    file at ``path``; returns that dataset (memory-mapped).

    Rows keep their order; inside windows of ``32 * batch_size`` rows they are batched by length to waste little
    on padding. Inputs go to the device of the model's first parameter. A DAM model whose logits are its
    ``lm_head``'s (:meth:`~dam.adaptive.model.DAMModel.head_fusable`) runs each teacher to its final hidden states
    and takes the top-K a chunk of tokens at a time (:func:`hidden_state_topk`): no ``[rows, T, V]`` logits.
    ``progress``: a tqdm bar over sequences (shown on a terminal only).
    """
    every = set(dataset.unique("source")) == {ALL_SOURCES}
    slots = num_sources if every else 1
    features = datasets.Features(
        {
            **dataset.features,
            "teacher_logprobs": datasets.Array3D(shape=(None, slots, top_k), dtype="float16"),
            "teacher_indices": datasets.Array3D(shape=(None, slots, top_k), dtype="int32"),
        }
    )
    device = _model_device(model)
    head_fusable = getattr(model, "head_fusable", None)  # a DAM model: DAMModel.head_fusable, source_logits
    fusable = head_fusable is not None and bool(head_fusable())
    collate = DataCollator(pad_token_id=0)
    rows = dataset.with_format("numpy")
    window = 32 * batch_size
    finite = torch.finfo(torch.float16)
    bar = tqdm(total=len(dataset), unit="seq", desc="teacher logits", disable=None if progress else True)
    with bar, ArrowWriter(features=features, path=str(path)) as writer:
        for start in range(0, len(dataset), window):
            chunk = rows[start : start + window]
            n = len(chunk["input_ids"])
            order = sorted(range(n), key=lambda i: len(chunk["input_ids"][i]))
            targets: list[tuple[np.ndarray, np.ndarray] | None] = [None] * n
            for b in range(0, n, batch_size):
                picked = order[b : b + batch_size]
                batch = collate([{"input_ids": chunk["input_ids"][i], "source": chunk["source"][i]} for i in picked])
                args = (model, batch["input_ids"].to(device), batch["attention_mask"].to(device), batch["source"])
                if fusable:  # the teachers to their final hidden states, then top-K a chunk of tokens at a time
                    hidden, teacher, _ = teacher_hidden_states(*args, num_sources)
                    values, indices = hidden_state_topk(hidden, teacher, model.source_logits, top_k)
                else:
                    values, indices = teacher_logprobs(*args, num_sources, top_k)
                values = values.clamp(finite.min, finite.max).to(torch.float16).cpu()
                indices = indices.to(torch.int32).cpu()
                for j, i in enumerate(picked):
                    length = len(chunk["input_ids"][i])
                    targets[i] = (
                        values[j, :, :length].transpose(0, 1).numpy(),  # [T, S, K]
                        indices[j, :, :length].transpose(0, 1).numpy(),
                    )
            columns: dict[str, list] = {k: list(v) for k, v in chunk.items()}
            columns["teacher_logprobs"] = [t[0] for t in targets]
            columns["teacher_indices"] = [t[1] for t in targets]
            writer.write_batch(columns)
            bar.update(n)
            logger.info("teacher logits: %d/%d sequences", start + n, len(dataset))
        writer.finalize()
    return datasets.Dataset.from_file(str(path))


def _cache_is_current(cache_dir: Path, key: dict[str, Any]) -> bool:
    """True when ``cache_dir`` holds a cache for ``key``; False when it holds none; DamError when it holds a cache
    for other inputs (overwriting it takes ``force``)."""
    stored = read_cache_key(cache_dir)
    if stored is None:
        return False
    changes = describe_key_changes(stored, stored_key(key, cache_dir))
    if changes:
        raise DamError(
            f"data.cache_dir: {cache_dir} holds a teacher-logit cache for other inputs ({'; '.join(changes)}); "
            "pass --force to overwrite it"
        )
    return True


def cache_teacher_logits(
    model: TeacherModel,
    dataset: datasets.Dataset,
    key: dict[str, Any],
    cache_dir: str | Path,
    *,
    batch_size: int = 8,
    force: bool = False,
    progress: bool = False,
) -> datasets.Dataset:
    """Reuse the cache at ``cache_dir`` when its key equals ``key``; otherwise compute it and write it there.

    A cache that exists but is stale is refused (DamError naming what changed) unless ``force``, so a cache that
    another config still uses is never overwritten by accident. ``force`` also recomputes a matching cache. The
    folder is replaced atomically: an interrupted run leaves the previous cache (or nothing) in place.
    """
    cache_dir = Path(cache_dir)
    if not force and _cache_is_current(cache_dir, key):
        logger.info("teacher-logit cache at %s is up to date; reusing it", cache_dir)
        return _open_cache(cache_dir)
    num_sources = len(key["sources"])
    with atomic_output_dir(cache_dir, force=True) as tmp:
        raw = tmp / "teacher_logits.arrow"
        computed = compute_teacher_cache(
            model, dataset, raw, num_sources=num_sources, top_k=key["top_k"], batch_size=batch_size, progress=progress
        )
        computed.save_to_disk(str(tmp / DATASET_DIR))
        del computed
        raw.unlink()
        (tmp / KEY_FILE).write_text(json.dumps(stored_key(key, cache_dir), indent=2) + "\n")
    logger.info("wrote the teacher-logit cache to %s", cache_dir)
    return _open_cache(cache_dir)


# ------------------------------------------------------------------------------------------- whole-run helpers


def _build_run_dataset(config: DAMConfig, tokenizer: PreTrainedTokenizerBase) -> datasets.Dataset:
    """The run's training rows, each source's data rendered as its ``render`` setting says."""
    renderings = source_renderings(tokenizer, config.models, config.data)
    specs = {m.name: m.dataset for m in config.models}
    return build_train_dataset(specs, [m.name for m in config.models], tokenizer, config.data, renderings)


def _run_data(config: DAMConfig, tokenizer: PreTrainedTokenizerBase) -> tuple[datasets.Dataset, dict[str, Any]]:
    """The run's tokenized training set and the cache key it would have (``loss.top_k`` must be set)."""
    dataset = _build_run_dataset(config, tokenizer)
    sources = [(m.name, m.model) for m in config.models]
    key = teacher_cache_key(config.base_model, sources, tokenizer, dataset, config.data, config.loss.top_k)
    return dataset, key


def load_training_dataset(config: DAMConfig, tokenizer: PreTrainedTokenizerBase) -> datasets.Dataset:
    """The training rows of a run, for the training loop.

    ``teacher_logits: on_the_fly``: :func:`dam.training.data.build_train_dataset` of the config's models and datasets.
    ``teacher_logits: cached``: the same rows read from ``data.cache_dir`` with their ``teacher_logprobs`` and
    ``teacher_indices``, after checking that the cache was made from exactly these models, data and settings
    (DamError naming what changed otherwise). Either way :class:`dam.training.data.DataCollator` batches the rows.
    """
    if config.data.teacher_logits == "on_the_fly":
        return _build_run_dataset(config, tokenizer)
    _, key = _run_data(config, tokenizer)
    return load_teacher_cache(config.data.cache_dir, key)


def cache_logits_for_config(
    config: DAMConfig, *, force: bool = False, batch_size: int = 8, device: str | None = None, progress: bool = False
) -> Path:
    """``dam cache-logits``: compute (or find up to date) the teacher-logit cache of a run config; returns its folder.

    The data are built and an existing cache is checked before any model weight is read. The teachers are the DAM
    wrapper's sources (built with the config's ``dtype`` and ``dam`` options) on ``device`` (CUDA when available,
    else CPU), one process.
    """
    if config.loss.top_k is None:
        raise DamError("loss.top_k: set how many teacher logits per token to cache (typically 50 to 128)")
    if not config.data.cache_dir:
        raise DamError("data.cache_dir: set the folder to write the teacher-logit cache to")
    cache_dir = Path(config.data.cache_dir)
    tokenizer = load_tokenizer(config.base_model)
    dataset, key = _run_data(config, tokenizer)
    if not force and _cache_is_current(cache_dir, key):
        logger.info("teacher-logit cache at %s is up to date (%d sequences); nothing to do", cache_dir, len(dataset))
        return cache_dir
    from dam.adaptive.model import DAMModel

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = DAMModel.from_pretrained(
        config.base_model, [m.model for m in config.models], config.dam, dtype=config.dtype, device=device
    )
    cache_teacher_logits(model, dataset, key, cache_dir, batch_size=batch_size, force=True, progress=progress)
    return cache_dir
