"""Spherical interpolation: ``slerp`` (base to one other model) and ``nuslerp`` (two models, optional base)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

DOT_THRESHOLD = 0.9995  # slerp: |cos| above this falls back to linear interpolation
NORM_EPS = 1e-8  # slerp: vectors with a smaller norm are used unnormalised for the angle


def slerp(t: float, v0: Tensor, v1: Tensor) -> Tensor:
    """Spherical interpolation between two whole tensors, treated as flat vectors.

    With ``u_k = v_k / |v_k|`` (``v_k`` itself when ``|v_k| <= 1e-8``) and ``c = clamp(<u_0, u_1>, -1, 1)``:
    if ``|c| > 0.9995`` the result is the lerp ``(1 - t) v0 + t v1``; otherwise, with ``theta = acos(c)``,

        slerp = sin((1 - t) theta) / sin(theta) * v0 + sin(t theta) / sin(theta) * v1

    applied to the original (unnormalised) tensors, so ``t = 0`` gives ``v0`` and ``t = 1`` gives ``v1``.
    Computed in float32 (float64 for float64 inputs); the result has that dtype.
    """
    dtype = torch.float64 if v0.dtype == torch.float64 else torch.float32
    a = v0.reshape(-1).to(dtype)
    b = v1.reshape(-1).to(dtype)
    norm_a = torch.linalg.vector_norm(a)
    norm_b = torch.linalg.vector_norm(b)
    norm_a = torch.where(norm_a > NORM_EPS, norm_a, 1)
    norm_b = torch.where(norm_b > NORM_EPS, norm_b, 1)
    cos = torch.dot(a / norm_a, b / norm_b).clamp(-1, 1)
    t_ = torch.tensor(t, dtype=dtype, device=a.device)
    if cos.abs() > DOT_THRESHOLD:
        coef_a, coef_b = 1 - t_, t_
    else:
        theta = torch.acos(cos)
        coef_a = torch.sin((1 - t_) * theta) / torch.sin(theta)
        coef_b = torch.sin(t_ * theta) / torch.sin(theta)
    return (coef_a * a + coef_b * b).reshape(v0.shape)


def nuslerp(t: float, v0: Tensor, v1: Tensor, *, row_wise: bool = False, flatten: bool = True) -> Tensor:
    """mergekit's NuSLERP interpolation, per vector.

    The vectors are the whole flattened tensor (``flatten``), else the columns (``row_wise``: mergekit's name;
    it interpolates along dimension 0, one vector per column), else the rows (the last dimension). For each
    pair, ``u_k = v_k / max(|v_k|, 1e-7)``, ``c = clamp(<u_0, u_1>, -1, 1)``, ``theta = acos(c)`` and

        out = (sin((1 - t) theta) v0 + sin(t theta) v1) / sin(theta),

    falling back to ``(1 - t) v0 + t v1`` where ``1 - c^2 <= 1e-16`` (collinear in float precision).
    """
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    u0 = v0 / torch.linalg.vector_norm(v0, dim=-1, keepdim=True).clamp(min=1e-7)
    u1 = v1 / torch.linalg.vector_norm(v1, dim=-1, keepdim=True).clamp(min=1e-7)
    cos = (u0 * u1).sum(dim=-1, keepdim=True).clamp(-1, 1)
    collinear = (1 - cos.square()) <= NORM_EPS**2
    theta = torch.acos(torch.where(collinear, 0, cos))
    spherical = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    out = torch.where(collinear, (1 - t) * v0 + t * v1, spherical)
    if row_wise and not flatten:
        out = out.transpose(0, -1)
    return out.reshape(shape)


def merge_slerp(
    tensors: list[Tensor],
    base: Tensor | None,
    base_index: int | None,
    model_params: list[dict[str, Any]],
    params: dict[str, Any],
    generator: torch.Generator | None,
) -> Tensor:
    """Registry entry: interpolate from the base (``t = 0``) to the one other model (``t = 1``).

    Exactly two inputs counting the base: ``models`` lists the base and one other model, or lists one model and
    ``base_model`` names another.
    """
    if base is None:
        raise ValueError("slerp needs base_model: t = 0 is the base, t = 1 the other model")
    others = [x for i, x in enumerate(tensors) if i != base_index]
    if len(others) != 1:
        raise ValueError(
            f"slerp interpolates between exactly two models (the base and one other); got the base and {len(others)}"
        )
    return slerp(params["t"], base, others[0])


def merge_nuslerp(
    tensors: list[Tensor],
    base: Tensor | None,
    base_index: int | None,
    model_params: list[dict[str, Any]],
    params: dict[str, Any],
    generator: torch.Generator | None,
) -> Tensor:
    """Registry entry: two non-base models with weights ``w_0, w_1`` give ``t = w_1 / (w_0 + w_1)``
    (0.5 when ``|w_0 + w_1| < 1e-6``). With a base the task vectors are interpolated:
    ``base + nuslerp(t, x_0 - base, x_1 - base)``; without one, the models themselves.
    """
    entries = [(x, p["weight"]) for i, (x, p) in enumerate(zip(tensors, model_params, strict=True)) if i != base_index]
    if len(entries) != 2:
        raise ValueError(f"nuslerp needs exactly two models besides the base; got {len(entries)}")
    (x0, w0), (x1, w1) = entries
    total = w0 + w1
    t = 0.5 if abs(total) < 1e-6 else w1 / total
    row_wise, flatten = params["nuslerp_row_wise"], params["nuslerp_flatten"]
    if base is None:
        return nuslerp(t, x0, x1, row_wise=row_wise, flatten=flatten)
    return base + nuslerp(t, x0 - base, x1 - base, row_wise=row_wise, flatten=flatten)
