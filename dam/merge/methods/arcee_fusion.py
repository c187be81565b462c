"""Arcee Fusion: keep only the other model's changes whose importance is an outlier.

Reproduces mergekit 0.1.5's ``merge_methods/arcee_fusion.py``, including its quantile estimate: exact on tensors
of at most 1M entries, from 1M entries drawn with replacement on larger ones (drawn from ``generator`` here,
from torch's global RNG in mergekit, so large tensors agree between the two tools only statistically).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

QUANTILE_SAMPLE_SIZE = 1_000_000  # larger tensors estimate their quartiles from this many sampled entries


def approximate_quantiles(x: Tensor, q: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Lower order statistics ``sorted(x)[floor(q * (n - 1))]`` of the flattened ``x`` (or of a sample of it)."""
    flat = x.reshape(-1)
    if flat.numel() > QUANTILE_SAMPLE_SIZE:
        flat = flat[torch.randint(flat.numel(), (QUANTILE_SAMPLE_SIZE,), device=flat.device, generator=generator)]
    ordered = torch.sort(flat).values
    return ordered[(q.to(ordered.device) * (ordered.numel() - 1)).long()]


def importance(other: Tensor, base: Tensor) -> Tensor:
    """``|other - base| * KL(softmax(other) || softmax(base))``, the KL over the last dimension (kept, size 1),
    each softmax plus 1e-8."""
    p = F.softmax(other, dim=-1) + 1e-8
    q = F.softmax(base, dim=-1) + 1e-8
    kl = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    return (other - base).abs() * kl


def arcee_fusion(base: Tensor, other: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """``base + (other - base) * [s >= median(s) + 1.5 (q3(s) - q1(s))]`` with ``s`` the :func:`importance`."""
    scores = importance(other, base)
    q1, median, q3 = approximate_quantiles(scores, torch.tensor([0.25, 0.5, 0.75]), generator)
    mask = (scores >= median + 1.5 * (q3 - q1)).float()
    return base + (other - base) * mask


def merge_arcee_fusion(
    tensors: list[Tensor],
    base: Tensor | None,
    base_index: int | None,
    model_params: list[dict[str, Any]],
    params: dict[str, Any],
    generator: torch.Generator | None,
) -> Tensor:
    """Registry entry: the base and exactly one other model."""
    others = [x for i, x in enumerate(tensors) if i != base_index]
    if base is None or len(others) != 1:
        raise ValueError("arcee_fusion merges exactly two models: base_model and one other")
    return arcee_fusion(base, others[0], generator)
