"""NearSwap: take the other model's value where it is near the base's, keep the base's where they are far apart.

Reproduces mergekit 0.1.5's ``merge_methods/nearswap.py``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def nearswap(base: Tensor, other: Tensor, t: float) -> Tensor:
    """Per entry ``a = base``, ``b = other``: ``w = clamp(t / max(|a - b|, 1e-6), 0, 1)``, ``out = w b + (1 - w) a``.

    Entries closer than ``t`` take ``b``; farther ones move from ``a`` towards ``b`` by ``t / |a - b|``."""
    weight = (t / torch.abs(base - other).clamp(min=1e-6)).clamp(min=0, max=1)
    return weight * other + (1 - weight) * base


def merge_nearswap(
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
        raise ValueError("nearswap merges exactly two models: base_model and one other")
    return nearswap(base, others[0], params["t"])
