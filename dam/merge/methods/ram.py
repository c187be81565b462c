"""RAM and RAM+ (tensor-local), Reinforced Agent Merging (arXiv 2601.13572): average task vectors only where
several models change a parameter, keep a lone model's change whole.

Reproduces mergekit 0.1.5's ``merge_methods/ram.py``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def ram(base: Tensor, task_vectors: Tensor, epsilon: float = 1e-5, *, r: float = 0.0, alpha: float = 0.0) -> Tensor:
    """``task_vectors``: (N, *shape). An entry of ``tau_i`` contributes where ``|tau_i| > epsilon``; with ``c``
    the number of contributors per entry, entries with ``c > 1`` are averaged over them and entries with
    ``c = 1`` kept, times ``lambda_i``:

        out = base + sum_i (lambda_i [c = 1] + [c > 1] / c) tau_i [|tau_i| > epsilon]

    RAM has ``lambda_i = 1``. RAM+ (``r > 0``) boosts a model whose changes mostly overlap others':
    ``lambda_i = 1 + r * clamp(shared_i / max(unique_i, epsilon), 0, alpha)``, counting model ``i``'s
    contributing entries with ``c > 1`` (shared) and ``c = 1`` (unique).
    """
    n = task_vectors.shape[0]
    flat = task_vectors.view(n, -1)  # (N, D)
    contributes = flat.abs() > epsilon  # (N, D)
    counts = contributes.sum(dim=0, keepdim=True)  # (1, D)
    overlap, unique = counts > 1, counts == 1
    kept = flat * contributes
    if r:
        rho = (contributes & overlap).sum(dim=1) / (contributes & unique).sum(dim=1).clamp(min=epsilon)  # (N,)
        boost = (1 + r * rho.clamp(min=0, max=alpha)).unsqueeze(-1)  # (N, 1)
        merged = (kept * unique * boost + kept * overlap / counts.clamp(min=1)).sum(dim=0, keepdim=True)
    else:
        merged = (kept * unique + kept * overlap / counts.clamp(min=1)).sum(dim=0, keepdim=True)
    return base + merged.reshape_as(base)


def merge_ram(
    tensors: list[Tensor],
    base: Tensor | None,
    base_index: int | None,
    model_params: list[dict[str, Any]],
    params: dict[str, Any],
    generator: torch.Generator | None,
) -> Tensor:
    """Registry entry for ``ram`` (``epsilon``) and ``ramplus_tl`` (``epsilon``, ``r``, ``alpha``): the task
    vectors of the non-base models."""
    if base is None:
        raise ValueError("ram needs base_model: it merges task vectors x_i - base")
    others = [x for i, x in enumerate(tensors) if i != base_index]
    if not others:
        return base
    task_vectors = torch.stack([x - base for x in others], dim=0)
    return ram(base, task_vectors, params["epsilon"], r=params.get("r", 0.0), alpha=params.get("alpha", 0.0))
