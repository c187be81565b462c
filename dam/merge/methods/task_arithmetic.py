"""The generalised task-arithmetic family: task_arithmetic, ties, dare_*, breadcrumbs*, della*.

All eight methods are one computation over task vectors ``delta_i = x_i - base`` of the non-base models:

1. sparsify each delta (none, top-k magnitude, DARE Bernoulli, breadcrumbs, DELLA), optionally L1-rescaled;
2. weight it: ``d_i = w_i * sparsify(delta_i)``;
3. with sign consensus (TIES), elect ``s = sign(sum_i d_i)`` per entry (a zero sum elects +) and keep ``d_i``
   only where ``sign(d_i) == s``, giving masks ``m_i``; without consensus ``m_i = 1``;
4. ``mixed = sum_i m_i d_i``; with ``normalize``, divide by ``sum_i m_i w_i`` per entry (TIES; a zero divisor
   becomes 1) or by ``sum_i w_i`` (no consensus; a divisor below 1e-8 in magnitude becomes 1);
5. ``out = base + lambda * mixed``.

The methods differ only in the sparsification, the consensus and two defaults (see :data:`VARIANTS`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from dam.merge.methods.sparsify import Sparsification, sparsify, validate_sparsity


@dataclass(frozen=True)
class Variant:
    """One member of the family: how it sparsifies, whether it elects signs, and its defaults."""

    sparsification: Sparsification | None
    consensus: bool
    normalize: bool  # default of the `normalize` parameter
    rescale: bool  # default of the `rescale` parameter


VARIANTS: dict[str, Variant] = {
    "task_arithmetic": Variant(None, consensus=False, normalize=False, rescale=False),
    "ties": Variant("magnitude", consensus=True, normalize=True, rescale=False),
    "dare_linear": Variant("random", consensus=False, normalize=False, rescale=True),
    "dare_ties": Variant("random", consensus=True, normalize=False, rescale=True),
    "breadcrumbs": Variant("breadcrumbs", consensus=False, normalize=False, rescale=False),
    "breadcrumbs_ties": Variant("breadcrumbs", consensus=True, normalize=False, rescale=False),
    "della": Variant("della", consensus=True, normalize=True, rescale=True),
    "della_linear": Variant("della", consensus=False, normalize=False, rescale=True),
}


def stacked_task_vectors(models: list[Tensor], base: Tensor) -> Tensor:
    """``x_i - base`` for each of ``models``, written straight into one (N, *base.shape) buffer (no per-model
    temporaries and no ``torch.stack`` copy)."""
    out = base.new_empty((len(models), *base.shape))
    for row, x in enumerate(models):
        torch.sub(x, base, out=out[row])
    return out


def elected_sign(weighted_deltas: Tensor) -> Tensor:
    """TIES sign election on ``weighted_deltas`` (N, *shape), the ``w_i * delta_i``: +1 where ``sum_i`` is >= 0,
    else -1, as a (*shape) tensor of their dtype."""
    return (weighted_deltas.sum(dim=0) >= 0).to(weighted_deltas.dtype).mul_(2).sub_(1)


def sign_consensus(weighted_deltas: Tensor) -> Tensor:
    """TIES sign agreement: a bool (N, *shape) mask, True where ``sign(w_i delta_i)`` is the elected sign
    (:func:`elected_sign`); zero entries never agree. Built row by row: no (N, *shape) float temporary."""
    elected = elected_sign(weighted_deltas)
    mask = torch.empty(weighted_deltas.shape, dtype=torch.bool, device=weighted_deltas.device)
    for i in range(weighted_deltas.shape[0]):
        torch.gt(weighted_deltas[i] * elected, 0, out=mask[i])  # same sign as the elected one, and not zero
    return mask


def combine_task_vectors(
    base: Tensor,
    deltas: Tensor,
    weights: list[float],
    *,
    consensus: bool,
    normalize: bool,
    lambda_: float = 1.0,
) -> Tensor:
    """Steps 2-5 of the module docstring on already sparsified ``deltas``: (N, *base.shape), one per model,
    overwritten (scaled by the weights in place)."""
    if len(weights) == 0:
        return base.clone()
    w = torch.tensor(weights, dtype=deltas.dtype, device=deltas.device).view(-1, *[1] * base.dim())  # (N, 1, ...)
    weighted = deltas.mul_(w)  # (N, *shape)
    if consensus:
        # With s the elected sign, m_i d_i = s * max(s d_i, 0): row by row, in place, and exact (s is +-1, and a
        # sum of terms of one sign is its magnitudes' sum with that sign), so no mask is multiplied in.
        elected = elected_sign(weighted)
        mixed = torch.zeros_like(base)
        divisor = torch.zeros_like(base) if normalize else None
        for i in range(len(weights)):
            agreeing = weighted[i].mul_(elected).clamp_(min=0)  # |d_i| where m_i, else 0
            mixed += agreeing
            if divisor is not None:
                divisor.add_(agreeing.sign(), alpha=float(w[i]))  # sum_i w_i m_i (sign: 1 where m_i, else 0)
        mixed.mul_(elected)
        if divisor is not None:
            mixed.div_(divisor.masked_fill_(divisor == 0, 1))
    else:
        mixed = weighted.sum(dim=0)
        if normalize:
            divisor = w.sum(dim=0)
            divisor[divisor.abs() < 1e-8] = 1
            mixed = mixed / divisor
    if lambda_ != 1:
        mixed.mul_(lambda_)
    return base + mixed


def merge_task_arithmetic(
    tensors: list[Tensor],
    base: Tensor | None,
    base_index: int | None,
    model_params: list[dict[str, Any]],
    params: dict[str, Any],
    generator: torch.Generator | None,
    *,
    variant: Variant,
) -> Tensor:
    """Registry entry for every variant: task vectors of all listed models except the base (at ``base_index``).

    Per-model parameters (``weight``, ``density``, ``gamma``, ``epsilon``) are read for non-base models only, and
    all are validated before any tensor work. Random variants draw from ``generator`` in model order.
    """
    if base is None:
        raise ValueError("this method needs base_model: it merges task vectors x_i - base")
    entries = [(i, x, p) for i, (x, p) in enumerate(zip(tensors, model_params, strict=True)) if i != base_index]
    method = variant.sparsification
    if method is not None:
        for i, _, p in entries:
            validate_sparsity(
                method, p["density"], gamma=p.get("gamma", 0.0), epsilon=p.get("epsilon", 0.0), where=f"models[{i}]: "
            )
    deltas = stacked_task_vectors([x for _, x, _ in entries], base)  # (N, *shape)
    if method is not None:
        for row, (_, _, p) in enumerate(entries):
            sparsify(
                deltas[row],
                method,
                p["density"],
                gamma=p.get("gamma", 0.0),
                epsilon=p.get("epsilon", 0.0),
                rescale=params["rescale"],
                generator=generator,
                in_place=True,
            )
    return combine_task_vectors(
        base,
        deltas,
        [p["weight"] for _, _, p in entries],
        consensus=variant.consensus,
        normalize=params["normalize"],
        lambda_=params["lambda"],
    )
