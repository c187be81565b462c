"""Model Stock (arXiv 2403.19522): interpolate between the base and the average of the fine-tunes."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def model_stock(base: Tensor, tensors: list[Tensor], filter_wise: bool = False) -> Tensor:
    """Model Stock with ``w_0 = base`` and fine-tunes ``w_1..w_N`` (N >= 2).

    ``c`` is the mean over pairs ``i < j`` of ``cos(w_i - w_0, w_j - w_0)`` (each cosine uses a denominator
    clamped to >= 1e-6 and is clamped to [-1, 1]); then

        t = N c / (1 + (N - 1) c),    out = t * mean_i(w_i) + (1 - t) * w_0,

    with ``t = 0`` (the base) where ``|1 + (N - 1) c| < 1e-6``. The cosines are over the whole flattened tensor,
    or with ``filter_wise`` over the last dimension (one ``t`` per row; a 1-D tensor is one row).
    """
    shape = base.shape
    if filter_wise:
        w0 = base.unsqueeze(0) if base.dim() == 1 else base
        ws = [x.view(w0.shape) for x in tensors]
    else:
        w0 = base.reshape(-1)
        ws = [x.reshape(-1) for x in tensors]
    offsets = [x - w0 for x in ws]
    cosines = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1 :]:
            denom = (torch.linalg.vector_norm(a, dim=-1) * torch.linalg.vector_norm(b, dim=-1)).clamp(min=1e-6)
            cosines.append(((a * b).sum(dim=-1) / denom).clamp(-1, 1))
    n = len(ws)
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)  # (..., 1): one per row, or (1,) flattened
    denom = 1 + (n - 1) * cos
    singular = denom.abs() < 1e-6
    t = torch.where(singular, 0.0, n * cos / torch.where(singular, 1.0, denom))
    average = sum(ws) / n
    return (t * average + (1 - t) * w0).reshape(shape)


def merge_model_stock(
    tensors: list[Tensor],
    base: Tensor | None,
    base_index: int | None,
    model_params: list[dict[str, Any]],
    params: dict[str, Any],
    generator: torch.Generator | None,
) -> Tensor:
    """Registry entry: the base is ``w_0``; the listed models other than the base are the fine-tunes."""
    if base is None:
        raise ValueError("model_stock needs base_model (w_0)")
    others = [x for i, x in enumerate(tensors) if i != base_index]
    if len(others) < 2:
        raise ValueError(f"model_stock needs at least two models besides the base; got {len(others)}")
    return model_stock(base, others, params["filter_wise"])
