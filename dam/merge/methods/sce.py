"""SCE (arXiv 2408.07990): select by variance across models, weight by energy, erase minority signs.

Reproduces mergekit 0.1.5's ``merge_methods/sce.py``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from dam.merge.methods.task_arithmetic import sign_consensus


def sce_mask(task_vectors: Tensor, select_topk: float) -> Tensor:
    """Bool mask of ``task_vectors[0]``'s shape: the ``k = int(nonzero * select_topk)`` entries whose variance
    across models (population variance over dimension 0 of the (N, *shape) ``task_vectors``) is largest, where
    ``nonzero`` counts entries of nonzero variance. Picked by ``torch.topk``, as mergekit does, so ties resolve
    alike."""
    if select_topk <= 0:
        return torch.zeros_like(task_vectors[0], dtype=torch.bool)
    if select_topk >= 1:
        return torch.ones_like(task_vectors[0], dtype=torch.bool)
    var = torch.var(task_vectors, dim=0, unbiased=False)
    k = int(torch.count_nonzero(var) * select_topk)
    mask = torch.zeros_like(var, dtype=torch.bool)
    if k > 0:
        mask.view(-1)[torch.topk(var.abs().view(-1), k=k, largest=True).indices] = True
    return mask


def sce(base: Tensor, task_vectors: Tensor, select_topk: float = 1.0) -> Tensor:
    """``task_vectors``: (N, *shape). After the top-variance selection ``tau_i``, each model gets the energy
    weight ``e_i = mean(tau_i^2) / sum_j mean(tau_j^2)`` (``1/N`` when that sum is below 1e-6); with the TIES sign
    mask ``m_i`` (sign of ``sum_i tau_i``, zero entries dropped):

        out = base + sum_i e_i m_i tau_i / max(sum_i e_i m_i, 1e-6)
    """
    if select_topk < 1:
        task_vectors = task_vectors * sce_mask(task_vectors, select_topk).unsqueeze(0)
    erase = sign_consensus(task_vectors)  # (N, *shape)
    energy = task_vectors.square().reshape(task_vectors.shape[0], -1).mean(dim=1)  # (N,)
    total = torch.sum(energy).item()
    energy = torch.ones_like(energy) / energy.shape[0] if abs(total) < 1e-6 else energy / total
    weights = energy.view(-1, *[1] * (task_vectors.dim() - 1)) * erase  # (N, *shape)
    return base + (task_vectors * weights).sum(dim=0) / torch.sum(weights, dim=0).clamp(min=1e-6)


def merge_sce(
    tensors: list[Tensor],
    base: Tensor | None,
    base_index: int | None,
    model_params: list[dict[str, Any]],
    params: dict[str, Any],
    generator: torch.Generator | None,
) -> Tensor:
    """Registry entry: the task vectors of the non-base models (no per-model weights in SCE)."""
    if base is None:
        raise ValueError("sce needs base_model: it merges task vectors x_i - base")
    others = [x for i, x in enumerate(tensors) if i != base_index]
    if not others:
        return base
    return sce(base, torch.stack([x - base for x in others], dim=0), params["select_topk"])
