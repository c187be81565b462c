"""RAM and RAM+ (tensor-local), Reinforced Agent Merging (arXiv 2601.13572): average task vectors only where
several models change a parameter, keep a lone model's change whole.

Reproduces mergekit 0.1.5's ``merge_methods/ram.py``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from dam.merge.methods.task_arithmetic import stacked_task_vectors


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
    # Row by row, so that beyond the task vectors only (N, D) booleans and a few (D,) tensors are held at once.
    contributes = torch.empty(flat.shape, dtype=torch.bool, device=flat.device)  # (N, D)
    counts = torch.zeros(flat.shape[1], dtype=torch.int16, device=flat.device)  # (D,)
    for i in range(n):
        torch.gt(flat[i].abs(), epsilon, out=contributes[i])
        counts += contributes[i]
    overlap = counts > 1  # (D,)
    boost = [1.0] * n
    if r:
        unique = counts == 1
        shared = [int((contributes[i] & overlap).sum()) for i in range(n)]
        alone = [int((contributes[i] & unique).sum()) for i in range(n)]
        rho = torch.tensor(shared, dtype=flat.dtype) / torch.tensor(alone, dtype=flat.dtype).clamp(min=epsilon)
        boost = (1 + r * rho.clamp(min=0, max=alpha)).tolist()
    merged = torch.zeros_like(flat[0])  # (D,)
    for i in range(n):
        # tau_i / c where several contribute, tau_i * lambda_i where model i alone does, 0 where it does not
        alone_term = flat[i] * boost[i] if boost[i] != 1 else flat[i]
        term = torch.where(overlap, flat[i] / counts, alone_term)
        merged += term.masked_fill_(~contributes[i], 0.0)
    return base + merged.view_as(base)


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
    return ram(
        base,
        stacked_task_vectors(others, base),
        params["epsilon"],
        r=params.get("r", 0.0),
        alpha=params.get("alpha", 0.0),
    )
