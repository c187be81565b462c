"""mergekit 0.1.5's ``tokenizer:`` section (and the old ``tokenizer_source: union``): the output vocabulary, and
every model's vocabulary-indexed tensors (``embed_tokens``, ``lm_head``) rebuilt to it before merging.

**Output tokenizer** (``mergekit/tokenizer/build.py``, reproduced with transformers' tokenizers as mergekit does):
the base model's (or, without a base, the first model's) tokenizer with its tokens at ids >= its ``vocab_size``
stripped; ``source: base`` is that tokenizer, ``source: MODEL`` that model's own (not stripped), ``source: union``
the base's plus, added in model order (base first), every token of another model below its ``vocab_size``
(that model's added tokens last, with their settings). Tokens named under ``tokens:`` that the result lacks are
added. ``config.json``'s ``vocab_size`` is its length, rounded up to ``pad_to_multiple_of``.

**Rows** (``mergekit/tokenizer/embed.py``): row ``i`` of model ``m``'s rebuilt tensor is ``m``'s own row of output
token ``i`` when ``m`` has that token (below its ``vocab_size``) and the token is not forced; otherwise the token's
default row. A token under ``tokens:`` takes its ``source``: a model (that model's row of the same token), ``{kind:
model_token, model, token | token_id}`` (that row of the model's own vocabulary) or ``{kind: zero}``; ``force:
true`` gives that row to every model, not only to those lacking the token. Any other token some model lacks takes,
among the tensor's models: the one model's row if one has it, zeros if none has it, the base model's row if the base
is among them and has it, else the mean of the rows of the models that have it. Rows past the vocabulary (padding)
are each model's mean rebuilt row. Models whose tokenizer does not load are taken to have the base's vocabulary,
as in mergekit.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dam.errors import DamError

logger = logging.getLogger(__name__)


def _load_tokenizer(folder: Path, **kwargs: Any) -> Any:
    """The folder's tokenizer; missing, truncated or garbage tokenizer files are a DamError naming the folder."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, **kwargs)
    except Exception as e:  # transformers and tokenizers raise many types (OSError, ValueError, Exception)
        detail = " ".join(str(e).split())[:300] or type(e).__name__
        raise DamError(f"tokenizer: cannot load the tokenizer of {folder} ({detail})") from None


def stripped_tokenizer(folder: Path, vocab_size: int | None) -> Any:
    """The folder's (fast) tokenizer without the tokens at ids >= ``vocab_size`` (mergekit's
    ``get_stripped_tokenizer``: BPE vocabularies only, their merges through a stripped token dropped)."""
    from tokenizers import Tokenizer

    tokenizer = _load_tokenizer(folder, use_fast=True)
    vocab_size = vocab_size or len(tokenizer.get_vocab())
    unused = {t for t, i in tokenizer.get_vocab().items() if i >= vocab_size}
    if not unused:
        return tokenizer
    data = json.loads(tokenizer.backend_tokenizer.to_str())
    if data["model"]["type"] != "BPE":
        raise DamError(
            f"tokenizer: {folder} has tokens past its vocab_size {vocab_size} and a {data['model']['type']} "
            "vocabulary; only BPE ones can be stripped (as in mergekit)"
        )
    data["added_tokens"] = [e for e in data["added_tokens"] if e["id"] < vocab_size]
    data["model"]["vocab"] = {t: i for t, i in data["model"]["vocab"].items() if t not in unused}
    pairs = [m.split(" ") if isinstance(m, str) else m for m in data["model"]["merges"]]
    data["model"]["merges"] = [m for m, p in zip(data["model"]["merges"], pairs, strict=True) if not set(p) & unused]
    tokenizer._tokenizer = Tokenizer.from_str(json.dumps(data))
    return tokenizer


def _union_tokenizer(base: Any, tokenizers: dict[str, Any], vocab_sizes: dict[str, int | None]) -> Any:
    """mergekit's ``build_union_tokenizer``: a copy of ``base`` with every other token of ``tokenizers`` added."""
    vocab: dict[str, None] = {}  # ordered set
    added: dict[str, Any] = {}
    for model, tokenizer in tokenizers.items():
        size = vocab_sizes[model] or tokenizer.vocab_size
        decoder = tokenizer.added_tokens_decoder
        added_contents = {info.content for info in decoder.values()}
        vocab.update({t: None for t, i in tokenizer.get_vocab().items() if i < size and t not in added_contents})
        for i, info in decoder.items():
            if i < size:
                added.setdefault(info.content, info)
    with tempfile.TemporaryDirectory() as tmp:  # a copy, so that ``base`` itself is not changed
        base.save_pretrained(tmp)
        union = _load_tokenizer(Path(tmp), use_fast=True)
    base_vocab = base.get_vocab()
    for token in vocab:
        if token not in added and token not in base_vocab:
            union.add_tokens(token)
    for info in added.values():
        union.add_tokens(info)
    return union


@dataclass(frozen=True)
class TokenSource:
    """A ``tokenizer.tokens`` entry resolved: the row of ``model`` (its row ``row``, or, when ``row`` is None, its
    row of the same token) or zeros (``model`` None); ``force`` gives it to every model."""

    model: str | None
    row: int | None
    force: bool


@dataclass(frozen=True)
class VocabularyPlan:
    """The output vocabulary and how each model's vocabulary-indexed tensors are rebuilt to it."""

    tokenizer: Any  # the output tokenizer (transformers), written with ``save_pretrained``
    rows: int  # tokens in the output vocabulary
    size: int  # rows written: ``rows`` rounded up to ``pad_to_multiple_of``
    ids: dict[str, Tensor]  # model -> [rows] its row of each output token, -1 where it lacks the token
    tokens: dict[int, TokenSource]  # the ``tokenizer.tokens`` entries, by output token id

    def align(self, tensors: list[Tensor], models: tuple[str, ...], base_index: int | None) -> list[Tensor]:
        """Each model's tensor ([its vocab_size, ...]) rebuilt to ``[size, ...]`` as the module docstring says;
        ``base_index``: the base model's position in ``models`` (None when it is not among them)."""
        for source in self.tokens.values():
            if source.model is not None and source.model not in models:
                raise DamError(f"tokenizer.tokens: model {source.model!r} is not among this tensor's models")
        ids = torch.stack([self.ids[m] for m in models]).to(tensors[0].device)  # [M, rows]
        present = ids >= 0
        gathered = [x[i.clamp(min=0)] for x, i in zip(tensors, ids, strict=True)]  # each [rows, ...]
        # the mean of the rows of the models that have the token, summed in model order as mergekit does: the one
        # model's row when one has it, zeros when none has it
        total = torch.zeros_like(gathered[0])
        for g, p in zip(gathered, present, strict=True):
            total = total + torch.where(_rows(p, g), g, 0.0)
        default = total / _rows(present.sum(0).clamp(min=1), total)
        if base_index is not None:  # the base's row, where it has the token
            default = torch.where(_rows(present[base_index], default), gathered[base_index], default)
        forced = torch.zeros(self.rows, dtype=torch.bool, device=ids.device)
        for token_id, source in self.tokens.items():
            forced[token_id] = source.force
            if source.model is None:
                default[token_id] = 0.0
                continue
            k = models.index(source.model)
            row = int(ids[k, token_id]) if source.row is None else source.row
            if not 0 <= row < tensors[k].shape[0]:
                raise DamError(
                    f"tokenizer.tokens: token id {token_id}'s source row {row} is not in model {source.model!r}"
                )
            default[token_id] = tensors[k][row]
        out = []
        for g, p in zip(gathered, present, strict=True):
            replaced = ~p | forced
            g[replaced] = default[replaced]  # in place: ``g`` is this function's copy
            if self.size > self.rows:
                g = torch.cat([g, g.mean(dim=0, keepdim=True).expand(self.size - self.rows, *g.shape[1:])])
            out.append(g)
        return out


def _rows(mask: Tensor, like: Tensor) -> Tensor:
    """A per-row mask ``[rows]`` shaped to broadcast over ``like`` ``[rows, ...]``."""
    return mask.view(-1, *[1] * (like.dim() - 1))


def plan_vocabulary(
    section: Any,
    base: str,
    models: list[str],
    folders: dict[str, Path],
    vocab_sizes: dict[str, int | None],
) -> VocabularyPlan:
    """Build the output tokenizer of ``section`` (a ``TokenizerSection``; its ``source``: ``base``, ``union`` or a
    model) over ``models`` (``base`` among them: the base model, else the first), each model's row of every
    output token, and the resolved ``tokens`` entries. DamError naming the token or model at fault."""
    tokenizers = {base: stripped_tokenizer(folders[base], vocab_sizes[base])}
    for model in models:
        if model in tokenizers:
            continue
        try:
            tokenizers[model] = _load_tokenizer(folders[model])
        except Exception as e:  # mergekit: "Unable to load tokenizer ... Assuming same as base"
            logger.warning("tokenizer: model %r: no loadable tokenizer (%s); taking the base's vocabulary", model, e)
    if section.source == "base":
        tokenizer = tokenizers[base]
    elif section.source == "union":
        tokenizer = _union_tokenizer(tokenizers[base], tokenizers, vocab_sizes)
    else:
        tokenizer = _load_tokenizer(folders[section.source])
    existing = set(tokenizer.get_vocab())
    for token in section.tokens or {}:
        if token not in existing:
            tokenizer.add_tokens(token)
            existing.add(token)
    vocab = tokenizer.get_vocab()
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise DamError(f"tokenizer: the output vocabulary (source {section.source!r}) has gaps in its token ids")
    order = sorted(vocab, key=vocab.__getitem__)
    ids, vocabs = {}, {}
    for model in models:
        own = (tokenizers.get(model) or tokenizers[base]).get_vocab()
        size = vocab_sizes[model] or len(own)
        for token in order:
            if own.get(token, -1) >= size:
                raise DamError(
                    f"tokenizer: model {model!r} has token {token!r} at id {own[token]}, past its vocab_size {size} "
                    "(mergekit fails on this too)"
                )
        ids[model] = torch.tensor([own.get(t, -1) for t in order], dtype=torch.long)
        vocabs[model] = own
    tokens = {}
    for token, cfg in (section.tokens or {}).items():
        source = _token_source(token, cfg, models, vocabs, ids, vocab)
        if source is not None:
            tokens[vocab[token]] = source
    rows = len(vocab)
    pad = section.pad_to_multiple_of
    size = rows if not pad or rows % pad == 0 else (rows // pad + 1) * pad
    return VocabularyPlan(tokenizer=tokenizer, rows=rows, size=size, ids=ids, tokens=tokens)


def _token_source(
    token: str,
    cfg: Any,
    models: list[str],
    vocabs: dict[str, dict[str, int]],
    ids: dict[str, Tensor],
    vocab: dict[str, int],
) -> TokenSource | None:
    """A ``tokenizer.tokens.<token>`` entry resolved against the models' vocabularies; None for an entry without a
    source that no model needs (every model has the token and it is not forced)."""
    src = cfg.source
    where = f"tokenizer.tokens.{token}"
    token_id = vocab[token]
    needed = cfg.force or any(int(ids[m][token_id]) < 0 for m in models)
    if src is None:
        if needed:
            raise DamError(f"{where}: some model lacks this token (or it is forced), so it needs a source")
        return None
    if getattr(src, "kind", None) == "zero":
        return TokenSource(model=None, row=None, force=cfg.force)
    model = src.model if hasattr(src, "model") else src
    if model not in vocabs:
        raise DamError(f"{where}: model {model!r} is not merged")
    if hasattr(src, "model"):  # {kind: model_token}: a row of the model's own vocabulary
        row = src.token_id if src.token_id is not None else vocabs[model].get(src.token, -1)
        if row < 0:
            raise DamError(f"{where}: no token {src.token!r} in model {model!r}")
        return TokenSource(model=model, row=row, force=cfg.force)
    if needed and int(ids[model][token_id]) < 0:
        raise DamError(f"{where}: model {model!r} has no token {token!r}")
    return TokenSource(model=model, row=None, force=cfg.force)


__all__ = ["TokenSource", "VocabularyPlan", "plan_vocabulary", "stripped_tokenizer"]
