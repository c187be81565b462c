"""mergekit 0.1.5's ``tokenizer:`` section for models that share one vocabulary: embedding rows aligned to the
output tokenizer, token overrides and ``pad_to_multiple_of``.

With a ``tokenizer:`` section mergekit rebuilds every vocabulary-indexed tensor (``embed_tokens``, ``lm_head``)
of every model before merging it: row ``i`` of the output is the row of token ``i`` of the output tokenizer, so
rows past the tokenizer's vocabulary are dropped; a token with ``force: true`` takes, in every model, the row its
``source`` names (a model's row of the same token, ``{kind: model_token, model, token | token_id}``, or
``{kind: zero}``); with ``pad_to_multiple_of: k`` the row count is rounded up to a multiple of ``k`` and each
model's extra rows are the mean of its aligned rows. ``config.json``'s ``vocab_size`` becomes that row count.

dam supports this when every model's vocabulary (read from ``tokenizer.json``, ids below the model's
``vocab_size``) equals the output tokenizer's; different vocabularies (mergekit's ``source: union`` or
permutations) are refused naming the first differing token. ``source: union`` of equal vocabularies is the base's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dam.errors import DamError


def read_vocabulary(folder: Path, vocab_size: int | None) -> dict[str, int] | None:
    """``{token: id}`` of a folder's ``tokenizer.json`` (model vocabulary plus added tokens), ids below
    ``vocab_size`` only (mergekit's stripped tokenizer); None without a ``tokenizer.json``."""
    file = folder / "tokenizer.json"
    if not file.is_file():
        return None
    data = json.loads(file.read_text(encoding="utf-8"))
    vocab = data.get("model", {}).get("vocab", {})
    if isinstance(vocab, list):  # Unigram: [[token, score], ...]
        vocab = {entry[0]: i for i, entry in enumerate(vocab)}
    vocab = dict(vocab)
    for added in data.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
    return {t: i for t, i in vocab.items() if vocab_size is None or i < vocab_size}


@dataclass(frozen=True)
class ForcedRow:
    """The row every model gets for token ``token_id``: ``model``'s row ``source_id``, or zeros (``model`` None)."""

    token_id: int
    model: str | None
    source_id: int


@dataclass(frozen=True)
class VocabularyPlan:
    """How vocabulary-indexed tensors are rebuilt: ``rows`` aligned rows, ``forced`` overrides, ``size`` rows out."""

    rows: int
    size: int
    forced: tuple[ForcedRow, ...]

    def align(self, tensors: list[Tensor], models: tuple[str, ...]) -> list[Tensor]:
        """Each model's tensor (rows = tokens) rebuilt as the module docstring says."""
        for forced in self.forced:
            if forced.model is not None and forced.model not in models:
                raise DamError(f"tokenizer.tokens: model {forced.model!r} is not among this tensor's models")
        values = {
            f.token_id: (
                tensors[models.index(f.model)][f.source_id] if f.model is not None else tensors[0].new_zeros(())
            )
            for f in self.forced
        }
        out = []
        for tensor in tensors:
            new = tensor[: self.rows].clone()
            for token_id, value in values.items():
                new[token_id] = value
            if self.size > self.rows:
                new = torch.cat([new, new.mean(dim=0, keepdim=True).expand(self.size - self.rows, *new.shape[1:])])
            out.append(new)
        return out


def plan_vocabulary(
    section: Any, models: list[str], folders: dict[str, Path], vocab_sizes: dict[str, int | None], source: str
) -> VocabularyPlan:
    """Check the models' vocabularies against the output tokenizer's (``source``: the model whose tokenizer is
    written) and resolve the token overrides of ``section`` (a ``TokenizerSection``)."""
    vocab = read_vocabulary(folders[source], vocab_sizes[source])
    if vocab is None:
        raise DamError(f"tokenizer: model {source!r} has no tokenizer.json (dam reads vocabularies from it)")
    by_id = {i: t for t, i in vocab.items()}
    if sorted(by_id) != list(range(len(vocab))):
        raise DamError(f"tokenizer: the vocabulary of {source!r} has gaps in its token ids")
    model_vocabs = {}
    for model in models:
        other = read_vocabulary(folders[model], vocab_sizes[model])
        if other is None:  # mergekit assumes a model without a tokenizer has the base's
            other = vocab
        if other != vocab:
            # in the output tokenizer's id order, then tokens only the model has
            differing = [t for t, i in sorted(vocab.items(), key=lambda kv: kv[1]) if other.get(t) != i]
            token = (differing or sorted(set(other) - set(vocab)))[0]
            raise DamError(
                f"tokenizer: model {model!r} has another vocabulary than {source!r} (first difference: token "
                f"{token!r}, id {other.get(token)} vs {vocab.get(token)}); dam aligns only identical vocabularies"
            )
        model_vocabs[model] = other
    forced = []
    for token, cfg in (section.tokens or {}).items():
        if token not in vocab:
            raise DamError(f"tokenizer.tokens: token {token!r} is not in the vocabulary of {source!r}")
        if not cfg.force:
            continue  # every model has every token, so a source only matters when forced
        src = cfg.source
        if src is None:
            raise DamError(f"tokenizer.tokens.{token}: force needs a source")
        if getattr(src, "kind", None) == "zero":
            forced.append(ForcedRow(vocab[token], None, 0))
            continue
        model = src.model if hasattr(src, "model") else src
        if model not in model_vocabs:
            raise DamError(f"tokenizer.tokens.{token}: model {model!r} is not merged")
        if hasattr(src, "model"):
            source_id = src.token_id if src.token_id is not None else model_vocabs[model].get(src.token, -1)
            if not 0 <= source_id < len(vocab):
                raise DamError(f"tokenizer.tokens.{token}: no token {src.token or src.token_id!r} in {model!r}")
        else:
            source_id = vocab[token]
        forced.append(ForcedRow(vocab[token], model, source_id))
    rows = len(vocab)
    pad = section.pad_to_multiple_of
    size = rows if not pad or rows % pad == 0 else (rows // pad + 1) * pad
    return VocabularyPlan(rows=rows, size=size, forced=tuple(forced))


__all__ = ["ForcedRow", "VocabularyPlan", "plan_vocabulary", "read_vocabulary"]
