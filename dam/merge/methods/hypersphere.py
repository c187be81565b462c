"""Means of many models on the hypersphere: ``multislerp`` (tangent-space barycentre) and ``karcher`` (Karcher
mean). Both reproduce mergekit 0.1.5 (``merge_methods/multislerp.py``, ``merge_methods/karcher.py``) operation for
operation, so float32 results agree to rounding."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor


def multislerp(
    tensors: list[Tensor], weights: list[float], *, normalize_weights: bool = True, eps: float = 1e-8
) -> Tensor:
    """Weighted barycentre of ``N`` flattened tensors on the hypersphere (one tensor is returned as is).

    With ``n_i = |x_i|``, ``u_i = x_i / (n_i + eps)`` and weights ``w`` (divided by their sum when
    ``normalize_weights``): ``m = sum_i w_i u_i / |sum_i w_i u_i|``; tangent vectors ``v_i = u_i - <u_i, m> m``;
    ``v = sum_i w_i v_i``, ``|v|' = |v| + eps``; and

        out = (m cos|v|' + v sin|v|' / |v|') * sum_i w_i n_i.

    When ``|sum_i w_i u_i| < eps`` two tensors fall back to ``w_0 x_0 + w_1 x_1``; more raise ``ValueError``,
    unless every input is zero (with a base model: every source equals the base on this tensor, as a frozen
    embedding does), whose barycentre is zero: mergekit raises there too.
    """
    if len(tensors) == 1:
        return tensors[0]
    stacked = torch.stack(tensors, dim=0)  # (N, *shape)
    flat = stacked.view(stacked.shape[0], -1)  # (N, D)
    w = torch.tensor(weights, dtype=stacked.dtype, device=stacked.device)
    if normalize_weights:
        w = w / w.sum()
    norms = torch.norm(flat, dim=-1, keepdim=True)  # (N, 1)
    if not bool(norms.any()):  # all zero: no direction to average
        return torch.zeros_like(stacked[0])
    units = flat / (norms + eps)
    mean = (units * w.view(-1, 1)).sum(0)  # (D,)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if len(tensors) == 2:
            return (stacked[0] * w[0] + stacked[1] * w[1]).view(stacked.shape[1:])
        raise ValueError(
            "multislerp: the weighted sum of the unit inputs is zero (antipodal inputs whose weights balance out); "
            "change the weights"
        )
    mean = mean / mean_norm
    dots = (units * mean).sum(-1, keepdim=True)  # (N, 1)
    tangent = ((units - dots * mean) * w.view(-1, 1)).sum(0)  # (D,)
    tangent_norm = torch.norm(tangent) + eps
    out = mean * torch.cos(tangent_norm) + tangent * (torch.sin(tangent_norm) / tangent_norm)
    return (out * (norms.squeeze(-1) * w).sum()).view(stacked.shape[1:])


def karcher(tensors: list[Tensor], alphas: list[float], *, max_iter: int = 10, tol: float = 1e-5) -> Tensor:
    """Weighted Karcher (Riemannian) mean of the directions, scaled by the weighted mean norm.

    Directions ``u_i = x_i / |x_i|`` of the inputs with ``|x_i| > tol`` (weights renormalised over them) start
    from their normalised weighted mean (``u_0`` when that is shorter than ``tol``). Each of at most ``max_iter``
    steps moves along the exponential map of the tangent ``g = sum_i a_i theta_i / sin(theta_i) (u_i - cos(theta_i)
    m)``, ``theta_i = acos(<m, u_i>)`` (inputs with ``theta_i < tol`` skipped), stopping once ``|g| < tol``. The
    result is ``(sum_i alpha_i |x_i|) m`` over every input; all-zero inputs give zeros.
    """
    if len(tensors) == 1:
        return tensors[0]
    dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    norms = [torch.linalg.vector_norm(x.to(dtype)) for x in tensors]
    units = [
        torch.zeros_like(x) if n.item() == 0.0 else (x / n).to(x.dtype) for x, n in zip(tensors, norms, strict=True)
    ]
    valid = [i for i, n in enumerate(norms) if n.item() > tol]
    if not valid:
        return torch.zeros_like(tensors[0])
    alpha_sum = sum(alphas[i] for i in valid)
    valid_alphas = [alphas[i] / alpha_sum for i in valid]
    valid_units = [units[i] for i in valid]
    mean = torch.zeros_like(valid_units[0])
    for a, u in zip(valid_alphas, valid_units, strict=True):
        mean += a * u
    mean_norm = torch.linalg.vector_norm(mean.to(dtype))
    mean = valid_units[0].clone() if mean_norm.item() < tol else (mean / mean_norm).to(mean.dtype)
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for a, u in zip(valid_alphas, valid_units, strict=True):
            dot = torch.clamp(torch.dot(mean.flatten(), u.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            tangent += a * (theta / torch.sin(theta)) * (u - dot * mean)
        tangent_norm = torch.linalg.vector_norm(tangent.to(dtype))
        if tangent_norm.item() < tol:
            break
        mean = (torch.cos(tangent_norm) * mean + torch.sin(tangent_norm) * (tangent / tangent_norm)).to(mean.dtype)
        unit_norm = torch.linalg.vector_norm(mean.to(dtype))
        if unit_norm.item() > tol:
            mean = (mean / unit_norm).to(mean.dtype)
    scale = sum(a * n for a, n in zip(alphas, norms, strict=True))
    return scale * mean


def merge_multislerp(
    tensors: list[Tensor],
    base: Tensor | None,
    base_index: int | None,
    model_params: list[dict[str, Any]],
    params: dict[str, Any],
    generator: torch.Generator | None,
) -> Tensor:
    """Registry entry: the non-base models with their ``weight``; with a base, their task vectors
    ``x_i - base`` are interpolated and the base added back."""
    entries = [(x, p["weight"]) for i, (x, p) in enumerate(zip(tensors, model_params, strict=True)) if i != base_index]
    if not entries:
        raise ValueError("multislerp needs at least one model besides the base")
    xs = [x if base is None or len(entries) == 1 else x - base for x, _ in entries]
    out = multislerp(xs, [w for _, w in entries], normalize_weights=params["normalize_weights"], eps=params["eps"])
    return out if base is None or len(entries) == 1 else out + base


def merge_karcher(
    tensors: list[Tensor],
    base: Tensor | None,
    base_index: int | None,
    model_params: list[dict[str, Any]],
    params: dict[str, Any],
    generator: torch.Generator | None,
) -> Tensor:
    """Registry entry: every input with equal weight ``1/N``, the base too (mergekit ignores its role here)."""
    max_iter = params["max_iter"]
    if not float(max_iter).is_integer() or max_iter < 0:
        raise ValueError(f"karcher: max_iter must be a non-negative integer, got {max_iter}")
    if not math.isfinite(params["tol"]) or params["tol"] < 0:
        raise ValueError(f"karcher: tol must be a non-negative number, got {params['tol']}")
    return karcher(tensors, [1.0 / len(tensors)] * len(tensors), max_iter=int(max_iter), tol=params["tol"])
