"""RegMean (Jin et al., 2023): the closed-form merge of linear layers from their inputs' Gram matrices.

For a linear layer ``y = x W^T`` with sources ``W_i`` (out, in), RegMean picks the weight that best reproduces
every source on that source's own inputs ``X_i`` (tokens x in):

    W* = argmin_W sum_i ||X_i W^T - X_i W_i^T||^2   =>   W*^T = (sum_i G_i)^-1 sum_i G_i W_i^T,   G_i = X_i^T X_i

and, to regularise toward the plain average, every ``G_i``'s off-diagonal entries are scaled by ``alpha``
(``alpha = 0``: ``G_i`` diagonal, a per-input-feature weighted average; ``alpha = 0`` with equal Grams: the plain
average; ``alpha = 1``: the exact least-squares solution). The sums are accumulated one source at a time
(:class:`RegMeanAccumulator`), so memory holds two (in, in)/(in, out) float64 accumulators per layer, never the
N Grams. :class:`GramRecorder` adds ``X^T X`` over the non-padding tokens of a model's forward passes with
forward hooks on its ``nn.Linear`` modules.

This module imports only torch and the standard library.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn


def scale_off_diagonal(gram: Tensor, alpha: float) -> Tensor:
    """``alpha * G + (1 - alpha) * diag(G)``: the Gram with its off-diagonal entries scaled by ``alpha``."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"RegMean alpha must lie in [0, 1], got {alpha}")
    return alpha * gram + (1.0 - alpha) * torch.diag(torch.diagonal(gram))


def regmean_solve(gram_sum: Tensor, weighted_sum: Tensor) -> Tensor:
    """``W* = ((sum_i G_i)^-1 sum_i G_i W_i^T)^T`` (out, in) from ``gram_sum`` (in, in) and ``weighted_sum``
    (in, out), solved in float64.

    An input feature that no source ever activated has a zero row and column in every Gram, which would make the
    system singular: it is solved on the active features only, and an inactive feature's column is left 0 here
    (:meth:`RegMeanAccumulator.result` gives it the plain average).
    """
    active = torch.diagonal(gram_sum) > 0
    out = torch.zeros(weighted_sum.shape[1], gram_sum.shape[0], dtype=torch.float64, device=gram_sum.device)
    if active.any():
        a = gram_sum[active][:, active].double()
        b = weighted_sum[active].double()
        out[:, active] = torch.linalg.solve(a, b).t()
    return out


def regmean_merge(weights: Iterable[Tensor], grams: Iterable[Tensor], alpha: float) -> Tensor:
    """RegMean of sources ``weights`` (each (out, in)) with Grams ``grams`` (each (in, in)) of their own inputs,
    in float64; the inputs' dtype is not kept. Features that no source activated get the plain average."""
    accumulator = RegMeanAccumulator(alpha)
    for w, g in zip(weights, grams, strict=True):
        accumulator.add(w, g)
    return accumulator.result()


class RegMeanAccumulator:
    """``sum_i G_i'`` and ``sum_i G_i' W_i^T`` (``G_i'`` the Gram with off-diagonals scaled by ``alpha``), one source
    at a time, and the sum of the weights for features no source activated."""

    def __init__(self, alpha: float):
        scale_off_diagonal(torch.zeros(1, 1), alpha)  # checks alpha
        self.alpha = alpha
        self.gram_sum: Tensor | None = None
        self.weighted_sum: Tensor | None = None
        self.weight_sum: Tensor | None = None
        self.count = 0

    def add(self, weight: Tensor, gram: Tensor) -> None:
        """Add one source: ``weight`` (out, in), ``gram`` (in, in) of that source's inputs on its own data."""
        if gram.shape != (weight.shape[1], weight.shape[1]):
            raise ValueError(f"Gram {tuple(gram.shape)} does not fit weight {tuple(weight.shape)}")
        g = scale_off_diagonal(gram.double(), self.alpha)
        w = weight.double()
        gw = g @ w.t()  # (in, out)
        if self.gram_sum is None:
            self.gram_sum, self.weighted_sum, self.weight_sum = g, gw, w.clone()
        else:
            self.gram_sum += g
            self.weighted_sum += gw
            self.weight_sum += w
        self.count += 1

    def result(self) -> Tensor:
        """The merged weight (out, in) in float64."""
        if self.gram_sum is None or self.weighted_sum is None or self.weight_sum is None:
            raise ValueError("RegMean needs at least one source")
        merged = regmean_solve(self.gram_sum, self.weighted_sum)
        inactive = torch.diagonal(self.gram_sum) <= 0
        merged[:, inactive] = self.weight_sum[:, inactive] / self.count
        return merged


class GramRecorder:
    """Adds ``X^T X`` (float64) of every hooked ``nn.Linear``'s input over the tokens where ``mask`` is set.

    Use: ``recorder = GramRecorder(model, names)``; per batch ``with recorder.tokens(mask): model(...)``; then
    ``recorder.grams`` (module name -> (in, in)) and ``recorder.close()``.
    """

    def __init__(self, model: nn.Module, names: Iterable[str]):
        self.grams: dict[str, Tensor] = {}
        self._mask: Tensor | None = None
        self._handles = []
        for name in names:
            module = model.get_submodule(name)
            if not isinstance(module, nn.Linear):
                raise ValueError(f"{name} is a {type(module).__name__}, not nn.Linear")
            self._handles.append(module.register_forward_hook(self._hook(name)))

    def _hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
            x = args[0]  # (B, T, in)
            if self._mask is not None:
                x = x[self._mask.bool()]  # (tokens, in): padding left out
            x = x.reshape(-1, x.shape[-1]).double()
            gram = x.t() @ x  # (in, in)
            self.grams[name] = gram if name not in self.grams else self.grams[name] + gram

        return hook

    @contextlib.contextmanager
    def tokens(self, mask: Tensor | None) -> Iterator[None]:
        """Within the block, hooks count only the (B, T) positions where ``mask`` is non-zero."""
        self._mask = mask
        try:
            yield
        finally:
            self._mask = None

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
