"""Passthrough at the tensor level: one model's tensor, optionally scaled (layer stacking is the engine's job)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def merge_passthrough(
    tensors: list[Tensor],
    base: Tensor | None,
    base_index: int | None,
    model_params: list[dict[str, Any]],
    params: dict[str, Any],
    generator: torch.Generator | None,
) -> Tensor:
    """Registry entry: exactly one input ``x``; returns ``x``, or ``scale * x`` when its ``scale`` is set."""
    if len(tensors) != 1:
        raise ValueError(f"passthrough takes exactly one model per tensor; got {len(tensors)}")
    scale = model_params[0]["scale"]
    return tensors[0] if scale is None else tensors[0] * scale
