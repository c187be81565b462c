"""Model kinship: how similar two fine-tunes' task vectors are, as a guide to which models to merge.

The task vector of a fine-tune A of base C is ``tau_A = A - C`` over all weights, flattened into one vector.
For two fine-tunes A and B this module computes, over every floating-point tensor the three checkpoints share,

    cosine(tau_A, tau_B)  = <tau_A, tau_B> / (|tau_A| |tau_B|)
    pearson(tau_A, tau_B) = cov(tau_A, tau_B) / (std(tau_A) std(tau_B))   (entries of the vectors as samples)

streaming tensor by tensor: only the six running sums ``n, sum a, sum b, sum a^2, sum b^2, sum ab`` (float64) are
kept, never a whole model. The same sums per module kind (``self_attn.q_proj.weight``, ``mlp.down_proj.weight``,
``embed_tokens.weight``...; the layer index removed) give a breakdown at no extra reading cost.

Kinship near 1 means the fine-tunes moved the base the same way (merging them is easy and gains little); near 0,
independent skills (what merging is for); negative, conflicting updates (sign conflicts that TIES-style methods
and DAM must resolve). The task vectors' norms relative to the base tell how far each fine-tune went.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dam.errors import DamError
from dam.io.checkpoint import CheckpointReader

_LAYER_INDEX = re.compile(r"(^|\.)(layers|h|blocks|layer)\.(\d+)\.")


def module_kind(name: str) -> str:
    """The tensor name without the layer index and ``model.`` prefix.

    ``model.layers.3.self_attn.q_proj.weight`` -> ``self_attn.q_proj.weight``;
    ``model.norm.weight`` -> ``norm.weight``.
    """
    return _LAYER_INDEX.sub(r"\1", name).removeprefix("model.")


def layer_index(name: str) -> int | None:
    """The decoder-layer index in a tensor name (``model.layers.3.mlp.up_proj.weight`` -> 3); None outside the
    layer stack."""
    match = _LAYER_INDEX.search(name)
    return int(match.group(3)) if match else None


@dataclass
class SimilaritySums:
    """Running float64 sums of two task vectors' entries (a, b) and of the base's squared entries (c)."""

    n: int = 0
    a: float = 0.0
    b: float = 0.0
    aa: float = 0.0
    bb: float = 0.0
    ab: float = 0.0
    cc: float = 0.0

    def add(self, da: torch.Tensor, db: torch.Tensor, c: torch.Tensor) -> None:
        self.n += da.numel()
        self.a += da.sum().item()
        self.b += db.sum().item()
        self.aa += torch.dot(da, da).item()
        self.bb += torch.dot(db, db).item()
        self.ab += torch.dot(da, db).item()
        self.cc += torch.dot(c, c).item()

    def similarity(self) -> Similarity:
        norm_a, norm_b, norm_c = math.sqrt(self.aa), math.sqrt(self.bb), math.sqrt(self.cc)
        cosine = self.ab / (norm_a * norm_b) if norm_a > 0 and norm_b > 0 else math.nan
        var_a = self.aa - self.a * self.a / self.n
        var_b = self.bb - self.b * self.b / self.n
        cov = self.ab - self.a * self.b / self.n
        pearson = cov / math.sqrt(var_a * var_b) if var_a > 0 and var_b > 0 else math.nan
        return Similarity(self.n, cosine, pearson, norm_a, norm_b, norm_c)


@dataclass(frozen=True)
class Similarity:
    """Similarity of two task vectors over ``numel`` entries; ``nan`` where a task vector is constant (e.g. zero)."""

    numel: int
    cosine: float
    pearson: float
    norm_a: float
    """L2 norm of ``A - C``."""
    norm_b: float
    """L2 norm of ``B - C``."""
    norm_base: float
    """L2 norm of ``C`` over the same entries (``norm_a / norm_base`` is how far A moved from the base)."""

    def to_dict(self) -> dict[str, Any]:
        values = {
            "numel": self.numel,
            "cosine": self.cosine,
            "pearson": self.pearson,
            "norm_a": self.norm_a,
            "norm_b": self.norm_b,
            "norm_base": self.norm_base,
        }
        return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in values.items()}


@dataclass
class Kinship:
    """Kinship of fine-tunes ``model_a`` and ``model_b`` of ``base``: overall and per module kind."""

    model_a: str
    model_b: str
    base: str
    overall: Similarity
    by_kind: dict[str, Similarity] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_a": self.model_a,
            "model_b": self.model_b,
            "base": self.base,
            "overall": self.overall.to_dict(),
            "by_kind": {k: s.to_dict() for k, s in self.by_kind.items()},
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def _shared_tensors(a: CheckpointReader, b: CheckpointReader, base: CheckpointReader) -> list[str]:
    """Names of the base's floating-point tensors, after checking A and B have each with the same shape."""
    names = [n for n in base.names if base.dtype(n).is_floating_point]
    if not names:
        raise DamError(f"base model {base.name!r} has no floating-point tensors")
    for reader in (a, b):
        extra = sorted(set(n for n in reader.names if reader.dtype(n).is_floating_point) - set(names))
        if extra:
            raise DamError(f"model {reader.name!r} has tensor {extra[0]!r} that base {base.name!r} lacks")
        for name in names:
            if name not in reader:
                raise DamError(f"model {reader.name!r} lacks tensor {name!r} of base {base.name!r}")
            if reader.shape(name) != base.shape(name):
                raise DamError(
                    f"tensor {name!r} has shape {list(reader.shape(name))} in model {reader.name!r} "
                    f"but {list(base.shape(name))} in base {base.name!r}"
                )
    return names


def _task_vectors(
    a: CheckpointReader, b: CheckpointReader, base: CheckpointReader, names: list[str]
) -> Iterator[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``(name, A - C, B - C, C)`` per tensor, flattened float64, read one tensor of each model at a time."""
    for name in names:
        c = base.get(name, dtype=torch.float64).reshape(-1)
        yield (
            name,
            a.get(name, dtype=torch.float64).reshape(-1) - c,
            b.get(name, dtype=torch.float64).reshape(-1) - c,
            c,
        )


def model_kinship(model_a: str | Path, model_b: str | Path, base: str | Path, *, progress: bool = False) -> Kinship:
    """Cosine and Pearson similarity of the task vectors ``A - base`` and ``B - base``, overall and per module kind.

    All three checkpoints must hold the same floating-point tensors with the same shapes (checked from the headers
    before any tensor is read). Memory holds one tensor of each model at a time.
    """
    from dam.progress import progress_bar

    with CheckpointReader(model_a) as ra, CheckpointReader(model_b) as rb, CheckpointReader(base) as rc:
        names = _shared_tensors(ra, rb, rc)
        total = SimilaritySums()
        kinds: dict[str, SimilaritySums] = {}
        for name, da, db, c in progress_bar(
            _task_vectors(ra, rb, rc, names), total=len(names), desc="kinship", unit="tensor", enabled=progress
        ):
            total.add(da, db, c)
            kinds.setdefault(module_kind(name), SimilaritySums()).add(da, db, c)
    return Kinship(
        str(model_a),
        str(model_b),
        str(base),
        total.similarity(),
        {k: s.similarity() for k, s in sorted(kinds.items())},
    )


def _fmt(x: float, spec: str) -> str:
    return "nan" if math.isnan(x) else format(x, spec)


def format_kinship(k: Kinship) -> str:
    """An aligned table: overall then per module kind, with cosine, Pearson and relative task-vector norms."""
    header = ["", "cosine", "pearson", "|A-C|/|C|", "|B-C|/|C|", "params"]
    rows = []
    for label, s in [("overall", k.overall), *k.by_kind.items()]:
        rel_a = s.norm_a / s.norm_base if s.norm_base > 0 else math.nan
        rel_b = s.norm_b / s.norm_base if s.norm_base > 0 else math.nan
        rows.append(
            [
                label,
                _fmt(s.cosine, "+.4f"),
                _fmt(s.pearson, "+.4f"),
                _fmt(rel_a, ".4f"),
                _fmt(rel_b, ".4f"),
                str(s.numel),
            ]
        )
    widths = [max(len(r[j]) for r in [header, *rows]) for j in range(len(header))]
    lines = [f"kinship of A={k.model_a} and B={k.model_b} (task vectors against base C={k.base})"]
    for r in [header, *rows]:
        lines.append("  ".join([r[0].ljust(widths[0])] + [v.rjust(w) for v, w in zip(r[1:], widths[1:], strict=True)]))
    return "\n".join(lines)
