"""DAM training data: one dataset per source, rendered, tokenized, sampled, paired with teachers, and collated.

:func:`build_train_dataset` turns ``{source name: dataset}`` into one tokenized ``datasets.Dataset``:

1. **Load** each source's dataset by the source's *name* (never by position): a local ``.jsonl``/``.json``/
   ``.parquet``/``.csv``/``.txt`` file, a folder (data files, or one written by ``save_to_disk``), or a Hub id.
2. **Sample**: seeded shuffle (``data.seed``), then the first ``data.num_examples`` rows of each dataset.
3. **Render**: the ``data.text_field`` column as is, or ``data.prompt_field``/``data.response_field`` as a
   user/assistant conversation through a chat template, else through the plain ``data.template`` (default
   ``"{prompt}\\n{response}"``). Which one, per source (:func:`source_renderings`, the source's ``render``):
   the source's own chat template and tokenizer, the base's, or the plain template. All sources must share the
   base's vocabulary (:func:`check_vocabularies`), so every source's ids mean the same tokens to every teacher.
   Prompt/response fields win when a dataset has both kinds of column.
4. **Tokenize**: plain and text examples get the tokenizer's special tokens (BOS for most) and an EOS at the end;
   chat-rendered examples are tokenized as rendered (the template writes its own BOS and end-of-turn tokens).
5. **Truncate** to ``data.max_length`` tokens, or **pack** (see :func:`pack_dataset`).
6. **Pair** each example with its teacher in column ``source``: source k's index on source k's own data
   (``pairing: own``, the paper's default), or :data:`ALL_SOURCES` (``-1``, every teacher; ``pairing: all``).

Columns: ``input_ids`` and ``labels`` (int32 lists; ``labels`` is ``input_ids`` with ``-100`` where no loss is
taken: prompt tokens under ``response_only_loss`` and packing separators), ``source`` (teacher index or -1) and
``dataset_index`` (index of the source whose dataset the example came from). Labels follow the Hugging Face
convention: ``labels[t]`` is the token that ``logits[t - 1]`` predicts, so the distillation loss at position t-1 is
counted when ``labels[t] != -100``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import datasets
import numpy as np
import pyarrow as pa
import torch

from dam.errors import DamError
from dam.io.checkpoint import resolve_model_path
from dam.progress import bars_shown

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from dam.training.config import DataConfig, SourceModel

logger = logging.getLogger(__name__)

ALL_SOURCES = -1
"""``source`` value of an example that every teacher supervises (``pairing: all``); the loss averages over them."""

IGNORE_INDEX = -100

_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}
_SENTINEL = "\u0000DAM-RESPONSE\u0000"


def load_raw_dataset(spec: str | Path, *, split: str = "train", owner: str = "") -> datasets.Dataset:
    """One dataset from a local file, a local folder or a Hub id. ``owner`` names the model it is for, in errors.

    Files are read with the ``datasets`` builder their extension names (``.jsonl``/``.json`` -> json,
    ``.parquet``, ``.csv``, ``.txt`` -> text with one example per line in column ``text``). A folder written by
    ``Dataset.save_to_disk`` is loaded as saved (``split`` picks from a ``DatasetDict``); any other folder is
    handed to ``load_dataset``, which infers the format from its files.
    """
    what = f"dataset {str(spec)!r}" + (f" (for model {owner!r})" if owner else "")
    path = Path(spec).expanduser()
    try:
        if path.is_file():
            if path.stat().st_size == 0:
                raise DamError(f"{what}: the file is empty")
            builder = _FILE_BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise DamError(
                    f"{what}: unsupported file type {path.suffix!r}; use one of {', '.join(_FILE_BUILDERS)}"
                )
            return datasets.load_dataset(builder, data_files=str(path), split="train")
        if path.is_dir():
            if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
                loaded = datasets.load_from_disk(str(path))
                if isinstance(loaded, datasets.DatasetDict):
                    if split not in loaded:
                        raise DamError(f"{what}: no split {split!r} (has {', '.join(loaded)}); set data.split")
                    loaded = loaded[split]
                return loaded
            return datasets.load_dataset(str(path), split=split)
        if _local_spec(spec):
            raise DamError(f"{what}: not found")
        return datasets.load_dataset(str(spec), split=split)
    except DamError:
        raise
    except Exception as e:  # any datasets/Hub failure becomes one line naming the dataset
        raise DamError(f"{what}: cannot load it: {e}") from e


def _local_spec(spec: str | Path) -> bool:
    """Whether a dataset ``spec`` that is neither a file nor a folder here names a local path (so it is missing),
    not a Hub dataset id: it starts with ``.``, ``/`` or ``~``, or ends in a file extension dam reads."""
    path = Path(spec).expanduser()
    return path.exists() or str(spec).startswith((".", "/", "~")) or path.suffix.lower() in _FILE_BUILDERS


def check_local_datasets(models: Sequence[Any]) -> None:
    """Every source's dataset that names a local path exists (a DamError naming the first missing one), checked
    before a run writes anything (``dam train``: no ``config.yaml`` left behind for a run that cannot start)."""
    for m in models:
        path = Path(m.dataset).expanduser()
        if not path.is_file() and not path.is_dir() and _local_spec(m.dataset):
            raise DamError(f"dataset {str(m.dataset)!r} (for model {m.name!r}): not found")


def load_tokenizer(model: str | Path, role: str = "base model") -> PreTrainedTokenizerBase:
    """The tokenizer of ``model`` (the base's by default; a source's for its own chat template)."""
    from transformers import AutoTokenizer

    path = resolve_model_path(model)
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:  # a missing or broken tokenizer becomes one line naming the model
        raise DamError(f"{role} {str(model)!r}: cannot load its tokenizer from {path}: {e}") from e


def check_vocabularies(base: PreTrainedTokenizerBase, sources: Mapping[str, PreTrainedTokenizerBase]) -> None:
    """Every source tokenizer maps the same tokens to the same ids as the base's (added tokens included); else a
    DamError naming the source and the first (lowest id) token that differs."""
    expected = {i: t for t, i in base.get_vocab().items()}
    for name, tokenizer in sources.items():
        found = {i: t for t, i in tokenizer.get_vocab().items()}
        if found == expected:
            continue
        first = min(i for i in expected.keys() | found.keys() if expected.get(i) != found.get(i))
        theirs = "no token" if found.get(first) is None else repr(found[first])
        ours = "no token" if expected.get(first) is None else repr(expected[first])
        raise DamError(
            f"model {name!r}: its tokenizer has {theirs} at id {first} but the base's has {ours}; DAM needs one "
            "vocabulary (the same ids for the same tokens; `dam merge` with a `tokenizer:` section merges others)"
        )


def source_renderings(
    base_tokenizer: PreTrainedTokenizerBase, models: Sequence[SourceModel], config: DataConfig
) -> dict[str, tuple[PreTrainedTokenizerBase, bool]]:
    """Per source name, the tokenizer that renders and tokenizes its data and whether through its chat template.

    ``render: own`` uses the source's tokenizer and chat template, ``base`` the base's, ``plain`` the base
    tokenizer with ``data.template``; ``auto`` is ``own`` if the source has a chat template, else ``base`` if the
    base has one, else ``plain`` (``plain`` when ``data.use_chat_template`` is false). A source folder without
    tokenizer files uses the base's. Every source tokenizer must share the base's vocabulary.
    """
    from dam.io.checkpoint import TOKENIZER_FILES

    own: dict[str, PreTrainedTokenizerBase] = {}
    for m in models:
        path = resolve_model_path(m.model)
        if any((path / f).exists() for f in TOKENIZER_FILES):
            own[m.name] = load_tokenizer(m.model, f"model {m.name!r}")
    check_vocabularies(base_tokenizer, own)
    base_chat = bool(getattr(base_tokenizer, "chat_template", None))
    out = {}
    for m in models:
        tokenizer = own.get(m.name)
        source_chat = tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))
        mode = m.render
        if mode == "auto":
            mode = (
                "plain" if not config.use_chat_template else "own" if source_chat else "base" if base_chat else "plain"
            )
        if mode == "own" and not source_chat:
            raise DamError(f"models.{m.name}.render is 'own' but model {m.name!r} has no chat template")
        if mode == "base" and not base_chat:
            raise DamError(f"models.{m.name}.render is 'base' but the base tokenizer has no chat template")
        out[m.name] = (tokenizer, True) if mode == "own" else (base_tokenizer, mode == "base")
        logger.info(
            "model %r: data rendered with %s",
            m.name,
            {"own": "its own chat template", "base": "the base's chat template", "plain": "data.template"}[mode],
        )
    plain = [m.name for m in models if out[m.name] == (base_tokenizer, False)]
    if plain and "template" not in config.model_fields_set:
        logger.warning(
            "models %s: no chat template, so their data is rendered with the default data.template %r; if they were "
            "fine-tuned on another format, set data.template to it (the demo family's is '{prompt}{response}': "
            "configs/dam/demo.yaml)",
            ", ".join(plain),
            config.template,
        )
    return out


def _render(prompt: str, response: str, tokenizer: PreTrainedTokenizerBase, chat: bool, template: str) -> str:
    if chat:
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False)
        except Exception as e:  # e.g. a template that insists on a system turn
            raise DamError(
                f"the chat template of {tokenizer.name_or_path!r} fails on a user/assistant pair ({e}); "
                "set that model's render to plain (or data.use_chat_template=false) to use data.template"
            ) from e
    return template.format(prompt=prompt, response=response)


def _response_start(prompt: str, tokenizer: PreTrainedTokenizerBase, chat: bool, template: str) -> int:
    """Character offset where the response begins in the rendered text.

    The example is rendered once more with a sentinel response; everything before the sentinel depends only on
    the prompt, so its position is the response's offset in the real rendering, for any chat template.
    """
    rendered = _render(prompt, _SENTINEL, tokenizer, chat, template)
    start = rendered.find(_SENTINEL)
    if start < 0:
        raise DamError("the chat template drops the assistant message; set data.use_chat_template=false")
    return start


class _Encoder:
    """Renders and tokenizes batches of rows of one source's dataset (a ``datasets.map`` function)."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        config: DataConfig,
        columns: list[str],
        name: str,
        chat: bool | None = None,
    ):
        self.tokenizer = tokenizer
        self.config = config
        self.name = name
        self.template = config.template
        self.pair = config.prompt_field in columns and config.response_field in columns
        if not self.pair and config.text_field not in columns:
            raise DamError(
                f"dataset for model {name!r} has columns {columns}; expected a text column "
                f"(data.text_field={config.text_field!r}) or prompt/response columns "
                f"(data.prompt_field={config.prompt_field!r}, data.response_field={config.response_field!r})"
            )
        if chat is None:  # the tokenizer's chat template when it has one and data.use_chat_template
            chat = config.use_chat_template and bool(getattr(tokenizer, "chat_template", None))
        self.chat = self.pair and chat
        if config.response_only_loss and self.pair and not tokenizer.is_fast:
            raise DamError("data.response_only_loss needs a fast tokenizer (character offsets of tokens)")
        self.eos = tokenizer.eos_token_id
        if self.eos is None and not self.chat:
            raise DamError(f"the tokenizer rendering {name!r} has no EOS token (needed to end its examples)")
        self.dropped = 0

    def _text(self, row: dict[str, Any], field: str, index: int) -> str:
        value = row[field]
        if not isinstance(value, str):
            raise DamError(f"dataset for model {self.name!r}: row {index} field {field!r} is {value!r}, not text")
        return value

    def __call__(self, batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        rows = [{k: batch[k][i] for k in batch} for i in range(len(indices))]
        starts: list[int] | None = None
        if self.pair:
            prompts = [self._text(r, self.config.prompt_field, i) for r, i in zip(rows, indices, strict=True)]
            responses = [self._text(r, self.config.response_field, i) for r, i in zip(rows, indices, strict=True)]
            texts = [
                _render(p, r, self.tokenizer, self.chat, self.template)
                for p, r in zip(prompts, responses, strict=True)
            ]
            if self.config.response_only_loss:
                starts = [_response_start(p, self.tokenizer, self.chat, self.template) for p in prompts]
        else:
            texts = [self._text(r, self.config.text_field, i) for r, i in zip(rows, indices, strict=True)]
        enc = self.tokenizer(
            texts, add_special_tokens=not self.chat, return_offsets_mapping=starts is not None, verbose=False
        )
        out: dict[str, list] = {"input_ids": [], "labels": []}
        for i, ids in enumerate(enc["input_ids"]):
            ids = list(ids)
            labels = list(ids)
            if starts is not None:
                offsets = enc["offset_mapping"][i]
                labels = [t if s >= starts[i] else IGNORE_INDEX for t, (s, _) in zip(ids, offsets, strict=True)]
            if not self.chat and (not ids or ids[-1] != self.eos):
                ids.append(self.eos)
                labels.append(self.eos)
            if not self.config.packing:
                ids, labels = ids[: self.config.max_length], labels[: self.config.max_length]
            if all(label == IGNORE_INDEX for label in labels[1:]):  # nothing to learn (e.g. truncated response)
                self.dropped += 1
                continue
            out["input_ids"].append(ids)
            out["labels"].append(labels)
        return out


def tokenize_dataset(
    dataset: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    config: DataConfig,
    name: str = "",
    chat: bool | None = None,
) -> datasets.Dataset:
    """Render and tokenize one source's raw rows into ``input_ids``/``labels`` (truncated unless packing).

    ``chat``: render prompt/response pairs through ``tokenizer``'s chat template (True) or ``config.template``
    (False); ``None``: the chat template when the tokenizer has one and ``config.use_chat_template``.

    Examples left with no loss token (a prompt longer than ``max_length`` under ``response_only_loss``, or an
    empty text) are dropped, with a warning.
    """
    encoder = _Encoder(tokenizer, config, dataset.column_names, name, chat)
    features = datasets.Features(
        {"input_ids": datasets.Sequence(datasets.Value("int32")), "labels": datasets.Sequence(datasets.Value("int32"))}
    )
    out = dataset.map(
        encoder,
        batched=True,
        with_indices=True,
        remove_columns=dataset.column_names,
        features=features,
        keep_in_memory=True,
        new_fingerprint=datasets.fingerprint.generate_random_fingerprint(),
        desc=f"tokenizing {name}" if name else "tokenizing",
    )
    if encoder.dropped:
        logger.warning("dataset for model %r: dropped %d examples with no loss tokens", name, encoder.dropped)
    if len(out) == 0:
        hint = f" (is data.max_length={config.max_length} shorter than the prompts?)" if encoder.dropped else ""
        raise DamError(f"dataset for model {name!r}: no example has a token to learn from{hint}")
    return out


def sample_dataset(dataset: datasets.Dataset, num_examples: int | None, seed: int, name: str = "") -> datasets.Dataset:
    """A seeded shuffle of ``dataset``, cut to its first ``num_examples`` rows (all rows when ``None``)."""
    shuffled = dataset.shuffle(seed=seed, keep_in_memory=True)
    if num_examples is None:
        return shuffled
    if num_examples > len(dataset):
        logger.warning(
            "dataset for model %r has %d rows, fewer than num_examples=%d", name, len(dataset), num_examples
        )
        return shuffled
    return shuffled.select(range(num_examples), keep_in_memory=True)


def _list_column(dataset: datasets.Dataset, column: str) -> tuple[np.ndarray, np.ndarray]:
    """(flat values, offsets) of a list column: example i is ``values[offsets[i]:offsets[i + 1]]``."""
    array = dataset.flatten_indices(keep_in_memory=True).data.column(column).combine_chunks()
    offsets = array.offsets.to_numpy()
    return array.flatten().to_numpy(), offsets - offsets[0]


def informing_token_ids(dataset: datasets.Dataset) -> np.ndarray:
    """The sorted distinct token ids that some loss token reads: in each sequence, the tokens before its last
    labelled position (a label at index j is predicted from the tokens at 0..j-1, so a token at the end of a
    sequence, e.g. its EOS, or after its last label informs no loss). Read through Arrow, not as Python lists; the
    other columns, e.g. cached teacher logits, are not copied."""
    ids, offsets = _list_column(dataset.select_columns("input_ids"), "input_ids")
    labels, _ = _list_column(dataset.select_columns("labels"), "labels")
    lengths = np.diff(offsets)
    sequence = np.repeat(np.arange(len(lengths)), lengths)
    position = np.arange(len(ids)) - offsets[:-1][sequence]
    labelled = np.where(labels != IGNORE_INDEX, position, -1)
    last = np.full(len(lengths), -1)
    np.maximum.at(last, sequence, labelled)
    return np.unique(ids[position < last[sequence]])


def pack_dataset(dataset: datasets.Dataset, block_size: int, eos_token_id: int) -> datasets.Dataset:
    """Concatenate examples, separated by EOS, and cut the stream into blocks of ``block_size`` tokens.

    An EOS separator (label -100) is inserted after every example that does not already end with EOS. Examples
    are not truncated first: a long one continues in the next block. The last block may be shorter (the collator
    pads it); one shorter than 2 tokens is dropped. Each block is one causal sequence: its tokens attend to the
    earlier examples in the same block and positions run 0..block_size-1 across the block, as in GPT-style
    pre-training packing. Teacher and student see exactly the same blocks, so the distillation targets stay
    consistent; packing only trades a little cross-example context for no padding.
    """
    ids, offsets = _list_column(dataset, "input_ids")
    labels, _ = _list_column(dataset, "labels")
    ends = offsets[1:]
    need_sep = ids[ends - 1] != eos_token_id
    ids = np.insert(ids, ends[need_sep], eos_token_id)
    labels = np.insert(labels, ends[need_sep], IGNORE_INDEX)
    bounds = np.append(np.arange(0, len(ids), block_size), len(ids))
    if bounds[-1] - bounds[-2] < 2:
        bounds = bounds[:-1]
    block_offsets = pa.array(bounds, type=pa.int32())
    table = pa.table(
        {
            "input_ids": pa.ListArray.from_arrays(block_offsets, pa.array(ids[: bounds[-1]], type=pa.int32())),
            "labels": pa.ListArray.from_arrays(block_offsets, pa.array(labels[: bounds[-1]], type=pa.int32())),
        }
    )
    return datasets.Dataset(table)


def build_train_dataset(
    dataset_specs: Mapping[str, str | Path | datasets.Dataset],
    source_names: Sequence[str],
    tokenizer: PreTrainedTokenizerBase,
    config: DataConfig,
    renderings: Mapping[str, tuple[PreTrainedTokenizerBase, bool]] | None = None,
) -> datasets.Dataset:
    """The tokenized, sampled, paired training set for sources ``source_names`` (in the wrapper's source order).

    ``renderings`` (from :func:`source_renderings`) gives each source's tokenizer and whether its chat template
    renders it; without it every source is rendered by ``tokenizer`` as :func:`tokenize_dataset` decides.

    ``dataset_specs`` maps each source *name* to its dataset (a path, a Hub id, or a loaded ``Dataset``), so the
    order of the models list never decides which data a source gets. Every source must have a dataset, and every
    dataset must belong to a listed source. The result is shuffled with ``config.seed`` across sources.
    """
    if not bars_shown():  # a log or --quiet: no datasets bar per tokenized source (dam logs its phases)
        datasets.disable_progress_bars()
    names = list(source_names)
    if len(set(names)) != len(names):
        raise DamError(f"model names must be unique, got {names}")
    missing = [n for n in names if n not in dataset_specs]
    unknown = [n for n in dataset_specs if n not in names]
    if missing:
        raise DamError(f"no dataset for model(s) {', '.join(map(repr, missing))}; give each model a dataset")
    if unknown:
        raise DamError(f"dataset(s) given for unknown model(s) {', '.join(map(repr, unknown))}; known: {names}")
    if config.packing and tokenizer.eos_token_id is None:
        raise DamError("data.packing needs an EOS token to separate examples; the base tokenizer has none")
    raw = {}
    for name in names:  # load everything first: a bad path fails before any tokenization
        spec = dataset_specs[name]
        raw[name] = (
            spec if isinstance(spec, datasets.Dataset) else load_raw_dataset(spec, split=config.split, owner=name)
        )
    parts = []
    for k, name in enumerate(names):
        sampled = sample_dataset(raw[name], config.num_examples, config.seed, name)
        source_tokenizer, chat = renderings[name] if renderings is not None else (tokenizer, None)
        tokenized = tokenize_dataset(sampled, source_tokenizer, config, name, chat)
        if config.packing:
            tokenized = pack_dataset(tokenized, config.max_length, source_tokenizer.eos_token_id)
        n = len(tokenized)
        source = k if config.pairing == "own" else ALL_SOURCES
        tokenized = tokenized.add_column("source", [source] * n, feature=datasets.Value("int32"))
        tokenized = tokenized.add_column("dataset_index", [k] * n, feature=datasets.Value("int32"))
        logger.info("model %r: %d training sequences", name, n)
        parts.append(tokenized)
    combined = datasets.concatenate_datasets(parts)
    return combined.shuffle(seed=config.seed, keep_in_memory=True).flatten_indices(keep_in_memory=True)


def _as_tensor(value: Any, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.to(dtype)
    return torch.as_tensor(np.asarray(value), dtype=dtype)


@dataclass
class DataCollator:
    """Right-pads a list of examples into a batch, to the longest example (or a multiple of ``pad_to_multiple_of``).

    Returns ``input_ids`` and ``attention_mask`` (1 on tokens, 0 on padding), ``labels`` (-100 on padding),
    ``source`` and ``dataset_index``, all int64: ``[B, T]`` and ``[B]``. Rows of a teacher cache also carry
    ``teacher_logprobs`` (float32) and ``teacher_indices`` (int64), stored per row as ``[T, S, K]`` and returned
    as ``[B, S, T, K]`` (S teachers per row: 1 for ``pairing: own``, N for ``all``), zero on padding.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids = [_as_tensor(f["input_ids"], torch.long) for f in features]
        longest = max(len(x) for x in ids)
        if self.pad_to_multiple_of:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch_size = len(features)
        input_ids = torch.full((batch_size, longest), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((batch_size, longest), dtype=torch.long)
        labels = torch.full((batch_size, longest), IGNORE_INDEX, dtype=torch.long)
        for i, (f, x) in enumerate(zip(features, ids, strict=True)):
            input_ids[i, : len(x)] = x
            attention_mask[i, : len(x)] = 1
            labels[i, : len(x)] = _as_tensor(f["labels"], torch.long) if "labels" in f else x
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        for key in ("source", "dataset_index"):
            if key in features[0]:
                batch[key] = torch.tensor([int(f[key]) for f in features], dtype=torch.long)
        if "teacher_logprobs" in features[0]:
            for key, dtype in (("teacher_logprobs", torch.float32), ("teacher_indices", torch.long)):
                rows = [_as_tensor(f[key], dtype) for f in features]  # [T, S, K] each
                _, s, k = rows[0].shape
                out = torch.zeros((batch_size, s, longest, k), dtype=dtype)
                for i, row in enumerate(rows):
                    out[i, :, : row.shape[0]] = row.transpose(0, 1)
                batch[key] = out
        return batch
