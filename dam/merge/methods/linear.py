"""Linear merge (model soup): a weighted average of every input tensor."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def linear(tensors: list[Tensor], weights: list[float], normalize: bool = True) -> Tensor:
    """``sum_i w_i x_i``, divided by ``sum_i w_i`` when ``normalize``.

    Accumulates in float32 (float64 for float64 inputs) in input order, like mergekit 0.1.5. A zero weight sum
    with ``normalize`` is an error here (mergekit writes inf/NaN).
    """
    dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    if normalize:
        total = torch.tensor(weights, dtype=dtype).sum()
        if total == 0:
            raise ValueError(f"weight: the weights {weights} sum to 0, so normalize: true would divide by zero")
    out = torch.zeros_like(tensors[0], dtype=dtype)
    for x, w in zip(tensors, weights, strict=True):
        out.add_(x, alpha=w)
    if normalize:
        out.div_(total.to(out.device))
    return out.to(tensors[0].dtype)


def merge_linear(
    tensors: list[Tensor],
    base: Tensor | None,
    base_index: int | None,
    model_params: list[dict[str, Any]],
    params: dict[str, Any],
    generator: torch.Generator | None,
) -> Tensor:
    """Registry entry: every tensor in ``tensors`` takes part, the base too when it is listed.

    An unlisted base is refused: mergekit 0.1.5 would average it in with the top-level ``weight``, which needs
    the engine to pass it as one more tensor with its parameters.
    """
    if base is not None and base_index is None:
        raise ValueError(
            "linear: base_model is not listed in models, and mergekit 0.1.5 would average it in with the "
            "top-level weight; list it in models with its weight, or drop base_model"
        )
    return linear(tensors, [p["weight"] for p in model_params], params["normalize"])
