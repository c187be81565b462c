"""DAM modules: N frozen source weights stacked in one tensor, plus learnable per-source coefficients.

Every merged tensor is ``merge(sources, coefficients)``; its granularity is read from the coefficients' shape
(:data:`GRANULARITIES`, chosen by ``dam.granularity``):

- ``column`` (the paper's): linear ``W`` (out, in), coefficients (N, in): ``W = sum_i W_i diag(c_i)``;
  embedding ``E`` (vocab, hidden), coefficients (N, hidden): ``E = sum_i E_i diag(c_i)``; norm weight ``w``
  (hidden,), coefficients (N, hidden): elementwise;
- ``row_column``: a 2-D weight (out, in) gets coefficients (N, out + in), a row scale ``r_i`` (the first out
  values) and a column scale ``c_i`` (the last in values): ``W = sum_i diag(r_i) W_i diag(c_i)``; 1-D norm
  weights stay elementwise;
- ``tensor``: coefficients (N, 1), one scalar per source and tensor: ``W = sum_i c_i W_i`` (layer-wise
  AdaMerging's parameterisation);
- bias ``b`` (out,), coefficients (N, out) (per output) or (N, 1) (one scalar per source).

In the task-vector basis (``dam.basis: task_vectors``, :func:`basis_sources`) every source but the base enters
these sums as its task vector ``W_i - W_base``, taken in the coefficients' dtype one row chunk at a time inside
the same fold and gradient reductions; the base's own coefficients scale ``W_base``.

A tied ``lm_head`` is a :class:`DAMLinear` sharing the embedding's sources *and* coefficients, so it stays tied
(for ``row_column`` the embedding's rows are the vocabulary, the ``lm_head``'s outputs: the same layout).

The stored (raw) coefficients pass through a transform (:func:`apply_transform`: none, tanh, sigmoid, softmax
across sources, or ``task_vector``, AdaMerging's form :func:`task_vector_coefficients`, whose base source's
coefficient is derived from the others) before they multiply; :func:`inverse_transform` gives the raw init for wanted
coefficients. Row scales are not transformed (:func:`transform_coefficients`): they are free factors that start at 1.
Folds accumulate in the coefficients' dtype (float32) whatever the sources' dtype, and the result is cast to the
sources' dtype: exactly what an exported checkpoint of that dtype holds.

Memory and speed (see "The physics of a DAM step" in DAM_NOTES.md): :class:`DAMLinear` runs a custom autograd
function that keeps only the layer input for backward (as ``nn.Linear`` does). The merged weight is rebuilt in
backward for ``dL/dx``; coefficient gradients take the one weight-gradient GEMM ``G = dL/dW = g^T x`` plus one
reduction per source over row chunks of ``P_i = G * W_i`` (never a whole per-source product):
``dL/dc_i[j] = sum_k P_i[k, j] r_i[k]`` and ``dL/dr_i[k] = sum_j P_i[k, j] c_i[j]`` (``r_i = 1`` for
``column``; the sum of the column gradients for ``tensor``). :class:`DAMEmbedding` saves only the token ids.
Sources are ``nn.Parameter(requires_grad=False)`` (DDP ignores them in its all-reduce and FSDP can shard them)
and are left out of ``state_dict()``, which therefore holds the coefficients only.

Teacher mode: setting ``module.selected = k`` makes a module compute with source k's own weights, bit for bit
what the original layer computes (:meth:`dam.adaptive.model.DAMModel.select_source` sets it on every module).

This module imports only torch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

TRANSFORMS = ("none", "tanh", "sigmoid", "softmax", "task_vector")
GRANULARITIES = ("column", "row_column", "tensor")
BASES = ("weights", "task_vectors")
SOURCE_SUFFIXES = ("weight_sources", "bias_sources")
_CHUNK_ELEMENTS = 2**16
"""Elements per row chunk of the fold and the coefficient-gradient reduction inside the linear functions: 256 KiB
float32 temporaries, which stay in a core's cache and are allocated once per call (whole-layer temporaries cost
fresh pages on every call)."""


def task_vector_coefficients(raw: Tensor, base: int) -> Tensor:
    """AdaMerging's merge coefficients (N, ...) from raw values (N, ...): every source k but ``base`` gets
    ``lambda_k = clamp(raw_k, 0, 1)`` and the base (the pre-trained model) ``1 - sum_k lambda_k``, so that

        sum_i c_i W_i = W_base + sum_k lambda_k (W_k - W_base)    (tau_k = W_k - W_base, the task vectors)

    (Yang et al., ICLR 2024: the pre-trained weights keep weight 1, the lambdas are clamped to [0, 1]).
    ``raw[base]`` is never read, so it gets a zero gradient and its AdamW step is 0."""
    lambdas = raw.clamp(0, 1)
    others = torch.cat([lambdas[:base], lambdas[base + 1 :]])  # (N - 1, ...)
    return torch.cat([lambdas[:base], 1 - others.sum(0, keepdim=True), lambdas[base + 1 :]])


def _base_index(transform: str, base: int | None, n: int) -> int:
    if base is None or not 0 <= base < n:
        raise ValueError(f"transform {transform!r} needs the index of the base source among {n}, got {base}")
    return base


def apply_transform(raw: Tensor, transform: str, base: int | None = None) -> Tensor:
    """Raw coefficients (N, ...) -> merge coefficients (N, ...). ``softmax`` normalises across sources (dim 0);
    ``task_vector`` (:func:`task_vector_coefficients`) needs ``base``, the base source's index."""
    if transform == "none":
        return raw
    if transform == "tanh":
        return torch.tanh(raw)
    if transform == "sigmoid":
        return torch.sigmoid(raw)
    if transform == "softmax":
        return torch.softmax(raw, dim=0)
    if transform == "task_vector":
        return task_vector_coefficients(raw, _base_index(transform, base, raw.shape[0]))
    raise ValueError(f"unknown transform {transform!r}; valid: {', '.join(TRANSFORMS)}")


def inverse_transform(coefficients: Tensor, transform: str, base: int | None = None) -> Tensor:
    """Raw values whose :func:`apply_transform` is ``coefficients`` (N, ...).

    tanh needs |c| < 1 (``atanh``), sigmoid 0 < c < 1 (``logit``), softmax c > 0 with sum 1 over sources
    (``log c``), task_vector every non-base c in [0, 1] and the base's ``1 - sum`` of the others (raw: the
    lambdas as they are, 0 for the base). Raises ``ValueError`` for coefficients the transform cannot produce.
    """
    c = coefficients
    if transform == "none":
        return c.clone()
    if transform == "tanh":
        if (c.abs() >= 1).any():
            raise ValueError("tanh coefficients must lie strictly between -1 and 1")
        return torch.atanh(c)
    if transform == "sigmoid":
        if ((c <= 0) | (c >= 1)).any():
            raise ValueError("sigmoid coefficients must lie strictly between 0 and 1")
        return torch.logit(c)
    if transform == "softmax":
        if (c <= 0).any() or not torch.allclose(c.sum(0), torch.ones((), dtype=c.dtype), atol=1e-6):
            raise ValueError("softmax coefficients must be positive and sum to 1 over the sources")
        return torch.log(c)
    if transform == "task_vector":
        b = _base_index(transform, base, c.shape[0])
        others = torch.cat([c[:b], c[b + 1 :]])
        if ((others < 0) | (others > 1)).any():
            raise ValueError("task_vector coefficients of every source but the base (the lambdas) must lie in [0, 1]")
        # the same 1e-6 as softmax's sum: a float32 sum of a few values in [0, 1] is off by ~1e-7 at most
        if not torch.allclose(c[b], 1 - others.sum(0), atol=1e-6):
            raise ValueError("task_vector: the base's coefficient must be 1 minus the sum of the others (its lambdas)")
        raw = c.clone()
        raw[b] = 0
        return raw
    raise ValueError(f"unknown transform {transform!r}; valid: {', '.join(TRANSFORMS)}")


def fold(sources: Tensor | Iterable[Tensor], coefficients: Tensor) -> Tensor:
    """``sum_i sources[i] * coefficients[i]``, accumulated in ``coefficients.dtype``.

    ``sources``: (N, *S) or an iterable of N tensors of shape S (any float dtype). ``coefficients``: (N, *C)
    with C broadcastable to S: (in,) for linear/embedding columns, S for elementwise, (1,) for a scalar.
    Returns a tensor of shape S in ``coefficients.dtype``. Differentiable in ``coefficients``.
    """
    merged: Tensor | None = None
    count = 0
    for src, c in zip(sources, coefficients, strict=False):
        merged = torch.mul(src, c) if merged is None else merged.addcmul_(src, c)
        count += 1
    if merged is None or count != coefficients.shape[0]:
        raise ValueError(f"fold: {count} source tensors for {coefficients.shape[0]} coefficient rows")
    return merged


def row_count(source_shape: tuple[int, ...] | torch.Size, coefficient_shape: tuple[int, ...] | torch.Size) -> int:
    """How many leading coefficients per source are row scales: ``out`` for a ``row_column`` layout (sources
    (N, out, in), coefficients (N, out + in)), else 0."""
    if len(source_shape) == 3 and len(coefficient_shape) == 2:
        out, inp = source_shape[1:]
        if coefficient_shape[1] == out + inp:
            return out
    return 0


def coefficient_shape(tensor_shape: tuple[int, ...], kind: str, granularity: str) -> tuple[int, ...]:
    """Per-source coefficient shape of a merged weight of ``tensor_shape`` under ``dam.granularity``: column
    ``(in,)`` (a norm weight's own size), row_column ``(out + in,)`` for 2-D weights, tensor ``(1,)``."""
    if granularity == "tensor":
        return (1,)
    if granularity == "row_column" and kind != "norm" and len(tensor_shape) == 2:
        return (tensor_shape[0] + tensor_shape[1],)
    return tuple(tensor_shape[-1:])


def transform_coefficients(raw: Tensor, transform: str, rows: int = 0, base: int | None = None) -> Tensor:
    """Raw coefficients (N, C) -> merge coefficients: :func:`apply_transform` (``base``: the base source's index,
    for ``task_vector``) on all but the first ``rows`` values per source, which are row scales and pass
    unchanged. ``task_vector`` takes no row scales: ``diag(r_i)`` on the base's weight would leave the form
    ``W_base + sum_k lambda_k tau_k`` (ValueError)."""
    if rows and transform == "task_vector":
        raise ValueError("transform 'task_vector' cannot be combined with row scales (granularity row_column)")
    if not rows:
        return apply_transform(raw, transform, base)
    return torch.cat([raw[:, :rows], apply_transform(raw[:, rows:], transform, base)], dim=1)


def inverse_transform_coefficients(
    coefficients: Tensor, transform: str, rows: int = 0, base: int | None = None
) -> Tensor:
    """Raw values whose :func:`transform_coefficients` is ``coefficients`` (N, C): the row scales as they are, the
    rest through :func:`inverse_transform`."""
    if not rows:
        return inverse_transform(coefficients, transform, base)
    return torch.cat([coefficients[:, :rows], inverse_transform(coefficients[:, rows:], transform, base)], dim=1)


def basis_sources(
    sources: Tensor | Sequence[Tensor], relative_to: int | None, dtype: torch.dtype
) -> Tensor | Iterable[Tensor]:
    """The tensors the coefficients multiply: ``sources`` as they are (``relative_to`` None, the weights basis), or
    in the task-vector basis (``dam.basis: task_vectors``) source ``relative_to`` (the base) as it is and every
    other source's difference from it, ``W_i - W_base`` in ``dtype`` (the coefficients'), made one at a time."""
    if relative_to is None:
        return sources
    anchor = sources[relative_to].to(dtype)
    return (s if i == relative_to else s.to(dtype) - anchor for i, s in enumerate(sources))


def merge(
    sources: Tensor | Sequence[Tensor] | Iterable[Tensor],
    coefficients: Tensor,
    rows: int = 0,
    relative_to: int | None = None,
) -> Tensor:
    """The merged tensor in ``coefficients.dtype``: :func:`fold` when ``rows`` is 0 (column, elementwise or scalar
    coefficients), else ``sum_i diag(r_i) W_i diag(c_i)`` with ``r_i = coefficients[i, :rows]`` (out,) and
    ``c_i = coefficients[i, rows:]`` (in,) for sources (N, out, in). Differentiable in ``coefficients``.
    ``relative_to``: the base source's index in the task-vector basis (:func:`basis_sources`: every ``W_i`` but
    the base's is then ``W_i - W_base``); ``sources`` must then be a tensor or a sequence."""
    if relative_to is not None:
        assert isinstance(sources, Tensor | Sequence), "the task-vector basis indexes the sources"
        sources = basis_sources(sources, relative_to, coefficients.dtype)
    if not rows:
        return fold(sources, coefficients)
    scaled = (src * c[rows:] for src, c in zip(sources, coefficients, strict=False))  # (out, in) each, one at a time
    return fold(scaled, coefficients[:, :rows, None])  # the row scales r_i (out, 1) broadcast over the columns


def _coefficient_grads(grad_w: Tensor, sources: Tensor, coefficients: Tensor, relative_to: int | None) -> Tensor:
    """``dL/dcoefficients`` (N, C) in ``coefficients.dtype`` from ``grad_w = dL/dW`` (K, J) for sources (N, K, J).

    With ``P_i = grad_w * W_i`` (``W_i - W_base`` for every source but ``relative_to`` in the task-vector basis):
    column layout (C = J) ``sum_k P_i[k, j]``; scalar (C = 1) ``sum_{k,j} P_i``; row_column (C = K + J)
    ``[sum_j P_i[k, j] c_i[j] | sum_k P_i[k, j] r_i[k]]``. Accumulates over row chunks of ``_CHUNK_ELEMENTS``
    into reused temporaries; no per-source product is kept whole.
    """
    n, k, j = sources.shape
    dtype = coefficients.dtype
    rows = row_count(sources.shape, coefficients.shape)
    out = torch.zeros(n, j, dtype=dtype, device=grad_w.device)  # the column part
    row_grads = torch.zeros(n, rows, dtype=dtype, device=grad_w.device)
    step = max(1, _CHUNK_ELEMENTS // max(j, 1))
    buffer = torch.empty(min(step, k), j, dtype=dtype, device=grad_w.device)
    difference = None if relative_to is None else torch.empty_like(buffer)
    for start in range(0, k, step):
        end = min(start + step, k)
        block = grad_w[start:end].to(dtype)  # (k', J)
        product = buffer[: end - start]
        for i in range(n):
            torch.mul(block, _basis_chunk(sources, i, start, end, relative_to, difference), out=product)  # (k', J)
            if rows:
                torch.mv(product, coefficients[i, rows:], out=row_grads[i, start:end])
                out[i].addmv_(product.t(), coefficients[i, start:end])
            else:
                out[i] += product.sum(0)
    if rows:
        return torch.cat([row_grads, out], dim=1)
    if coefficients.shape[1] == 1 and j != 1:
        return out.sum(1, keepdim=True)
    return out


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype ``nn.Linear`` would compute in: the autocast dtype when autocast is on, else the input's."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


class _DAMLinearFunction(torch.autograd.Function):
    """``y = x W^T + b`` with ``W = merge(weight_sources, coefficients)``, saving x but never W.

    Shapes: x (..., in), weight_sources (N, out, in), coefficients (N, in), (N, out + in) or (N, 1), bias (out,)
    or None -> y (..., out). ``relative_to``: the base's index in the task-vector basis (:func:`basis_sources`).
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight_sources: Tensor,
        coefficients: Tensor,
        bias: Tensor | None,
        relative_to: int | None = None,
    ) -> Tensor:
        dtype = _compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            xc = x.to(dtype)
            weight = _merged_weight(weight_sources, coefficients, dtype, relative_to)  # (out, in)
            out = F.linear(xc, weight, None if bias is None else bias.to(dtype))
        ctx.save_for_backward(xc, weight_sources, coefficients)
        ctx.relative_to = relative_to
        ctx.x_dtype = x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, None, Tensor | None, Tensor | None, None]:
        x, weight_sources, coefficients = ctx.saved_tensors
        g = grad_out.to(x.dtype)  # (..., out)
        grad_x = grad_c = grad_b = None
        if ctx.needs_input_grad[0]:
            weight = _merged_weight(weight_sources, coefficients, x.dtype, ctx.relative_to)  # (out, in)
            grad_x = (g @ weight).to(ctx.x_dtype)  # (..., in)
            del weight
        if ctx.needs_input_grad[2]:
            g2 = g.reshape(-1, g.shape[-1])  # (T, out)
            grad_w = g2.t() @ x.reshape(-1, x.shape[-1])  # (out, in): the weight-gradient GEMM
            grad_c = _coefficient_grads(grad_w, weight_sources, coefficients, ctx.relative_to)  # (N, C)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[3]:
            acc = torch.promote_types(g.dtype, torch.float32)
            grad_b = g.reshape(-1, g.shape[-1]).sum(0, dtype=acc).to(ctx.bias_dtype)  # (out,)
        return grad_x, None, grad_c, grad_b, None


class _DAMLinearLossFunction(torch.autograd.Function):
    """``sum over row chunks of chunk_loss(x[rows] W^T + b, rows)`` with ``W = merge(weight_sources,
    coefficients)``: a linear layer fused with a loss that adds up over rows (the ``lm_head`` and a distillation
    loss), whose output exists one chunk of ``rows`` rows at a time. Saves x, never W nor the output.

    Shapes: x (M, in), weight_sources (N, out, in), coefficients as in :class:`_DAMLinearFunction`, bias (out,) or
    None; ``chunk_loss`` maps a chunk's output (r, out) and its row slice to a scalar. Backward recomputes each
    chunk's output, takes the loss's gradient ``g`` (r, out) by autograd, and accumulates ``dL/dx = g W`` per chunk
    and ``dL/dW = sum_chunks g^T x`` (float32, one (out, in) tensor) before the coefficient reduction, as
    :class:`_DAMLinearFunction` does with the whole ``g``.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight_sources: Tensor,
        coefficients: Tensor,
        bias: Tensor | None,
        chunk_loss: Callable[[Tensor, slice], Tensor],
        rows: int,
        relative_to: int | None = None,
    ) -> Tensor:
        device = x.device.type
        dtype = _compute_dtype(x)
        # the loss runs under the caller's autocast (in backward too), the layer in ``dtype`` as _DAMLinearFunction
        ctx.autocast = (device, torch.get_autocast_dtype(device), torch.is_autocast_enabled(device))
        with torch.autocast(device, enabled=False):
            xc = x.to(dtype)
            weight = _merged_weight(weight_sources, coefficients, dtype, relative_to)  # (out, in)
            b = None if bias is None else bias.to(dtype)
        total = torch.zeros((), dtype=torch.promote_types(dtype, torch.float32), device=x.device)
        for start in range(0, xc.shape[0], rows):
            chunk = slice(start, start + rows)
            with torch.autocast(device, enabled=False):
                out = F.linear(xc[chunk], weight, b)
            total += chunk_loss(out, chunk)
        ctx.save_for_backward(xc, weight_sources, coefficients, bias)
        ctx.chunk_loss, ctx.rows, ctx.x_dtype, ctx.relative_to = chunk_loss, rows, x.dtype, relative_to
        return total

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        x, weight_sources, coefficients, bias = ctx.saved_tensors
        with torch.autocast(x.device.type, enabled=False):
            weight = _merged_weight(weight_sources, coefficients, x.dtype, ctx.relative_to)  # (out, in)
            b = None if bias is None else bias.to(x.dtype)
            grad_x = torch.empty_like(x) if ctx.needs_input_grad[0] else None
            acc = torch.promote_types(x.dtype, torch.float32)  # accumulators over the chunks
            grad_w = torch.zeros(weight.shape, dtype=acc, device=x.device) if ctx.needs_input_grad[2] else None
            grad_b = None
            if bias is not None and ctx.needs_input_grad[3]:
                grad_b = torch.zeros(bias.shape, dtype=acc, device=x.device)
            device, autocast_dtype, autocast = ctx.autocast
            for start in range(0, x.shape[0], ctx.rows):
                chunk = slice(start, start + ctx.rows)
                out = F.linear(x[chunk], weight, b).detach().requires_grad_()
                with torch.enable_grad(), torch.autocast(device, dtype=autocast_dtype, enabled=autocast):
                    (g,) = torch.autograd.grad(ctx.chunk_loss(out, chunk), out, grad_output)  # (r, out)
                if grad_x is not None:
                    grad_x[chunk] = g @ weight
                if grad_w is not None:
                    grad_w += g.t() @ x[chunk]  # (out, in)
                if grad_b is not None:
                    grad_b += g.sum(0, dtype=acc)
            del weight
        grad_c = None if grad_w is None else _coefficient_grads(grad_w, weight_sources, coefficients, ctx.relative_to)
        grad_x = None if grad_x is None else grad_x.to(ctx.x_dtype)
        grad_b = None if grad_b is None else grad_b.to(bias.dtype)
        return grad_x, None, grad_c, grad_b, None, None, None


def _basis_chunk(
    sources: Tensor, i: int, start: int, end: int, relative_to: int | None, difference: Tensor | None
) -> Tensor:
    """Rows ``start:end`` of what source i's coefficients multiply: ``W_i`` (the sources' dtype), or in the
    task-vector basis, for every source but ``relative_to``, ``W_i - W_base`` written into ``difference``
    (the coefficients' dtype: the same bits as :func:`basis_sources`)."""
    if relative_to is None or i == relative_to:
        return sources[i, start:end]
    assert difference is not None
    out = difference[: end - start]
    if sources.dtype == out.dtype:  # one pass; the same correctly rounded difference as below
        return torch.sub(sources[i, start:end], sources[relative_to, start:end], out=out)
    out.copy_(sources[i, start:end])  # exact in the wider dtype, then one rounding: as basis_sources does
    return out.sub_(sources[relative_to, start:end])


def _merged_weight(
    weight_sources: Tensor, coefficients: Tensor, dtype: torch.dtype, relative_to: int | None = None
) -> Tensor:
    """The merged weight (out, in) that the linear functions compute with: :func:`merge` (folded in the
    coefficients' dtype, rounded to the sources' dtype: what an exported checkpoint holds), then in ``dtype``.

    The same arithmetic in the same order, so the same bits, as ``merge(...).to(weight_sources.dtype).to(dtype)``,
    but folded ``_CHUNK_ELEMENTS`` at a time into the result (through one reused temporary when the dtypes
    differ): every source is read once and no whole-layer temporary is made. Not differentiable (the linear
    functions give the coefficients' gradients themselves)."""
    n, k, j = weight_sources.shape
    rows = row_count(weight_sources.shape, coefficients.shape)
    acc = coefficients.dtype
    merged = torch.empty(k, j, dtype=dtype, device=weight_sources.device)
    step = max(1, _CHUNK_ELEMENTS // max(j, 1))
    direct = dtype == acc == weight_sources.dtype
    folded = None if direct else torch.empty(min(step, k), j, dtype=acc, device=merged.device)
    scaled = torch.empty(min(step, k), j, dtype=acc, device=merged.device) if rows else None
    difference = None if relative_to is None else torch.empty(min(step, k), j, dtype=acc, device=merged.device)
    for start in range(0, k, step):
        end = min(start + step, k)
        block = merged[start:end] if direct else folded[: end - start]
        for i in range(n):
            source, c = _basis_chunk(weight_sources, i, start, end, relative_to, difference), coefficients[i]
            if rows:  # (W_i[rows] * c_i) * r_i[rows], as merge does
                factor, scale = scaled[: end - start], c[start:end, None]
                torch.mul(source, c[rows:], out=factor)
            else:
                factor, scale = source, c
            if i == 0:
                torch.mul(factor, scale, out=block)
            else:
                block.addcmul_(factor, scale)
        if not direct:
            merged[start:end] = block.to(weight_sources.dtype)
    return merged


class _DAMEmbeddingFunction(torch.autograd.Function):
    """Rows of ``E = merge(weight_sources, coefficients)`` for ``ids``, gathering per source; saves the ids only.

    Shapes: ids (...,) integer, weight_sources (N, vocab, hidden), coefficients (N, hidden), (N, vocab + hidden)
    or (N, 1) -> (..., hidden) in the sources' dtype. ``relative_to``: as :class:`_DAMLinearFunction`'s.
    """

    @staticmethod
    def forward(
        ctx: Any, ids: Tensor, weight_sources: Tensor, coefficients: Tensor, relative_to: int | None = None
    ) -> Tensor:
        ctx.save_for_backward(ids, weight_sources, coefficients)
        ctx.relative_to = relative_to
        rows = row_count(weight_sources.shape, coefficients.shape)
        rows_of = [F.embedding(ids, w) for w in weight_sources]  # (..., hidden) per source
        looked_up = basis_sources(rows_of, relative_to, coefficients.dtype)
        if not rows:
            return fold(looked_up, coefficients).to(weight_sources.dtype)
        # the same arithmetic as ``merge`` on the whole table, on the looked-up rows only: (E_i[ids] c_i) r_i[ids]
        scaled = (e * c[rows:] for e, c in zip(looked_up, coefficients, strict=False))
        return fold(scaled, coefficients[:, :rows][:, ids].unsqueeze(-1)).to(weight_sources.dtype)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[None, None, Tensor | None, None]:
        ids, weight_sources, coefficients = ctx.saved_tensors
        if not ctx.needs_input_grad[2]:
            return None, None, None, None
        rows = row_count(weight_sources.shape, coefficients.shape)
        flat = ids.reshape(-1)
        g = grad_out.reshape(flat.numel(), -1).to(coefficients.dtype)  # (T, hidden)
        grads = []
        looked_up = basis_sources([F.embedding(flat, w) for w in weight_sources], ctx.relative_to, coefficients.dtype)
        for e, c in zip(looked_up, coefficients, strict=True):
            product = g * e.to(coefficients.dtype)  # (T, hidden): dL/dc_i per token, row scale 1
            if not rows:
                grads.append(product.sum(0))  # (hidden,)
                continue
            row_grad = torch.zeros(rows, dtype=coefficients.dtype, device=g.device)
            row_grad.index_add_(0, flat, product @ c[rows:])  # (vocab,): sum over the tokens of each id
            grads.append(torch.cat([row_grad, (product * c[:rows][flat, None]).sum(0)]))  # r_i[ids] (T, 1)
        grad_c = torch.stack(grads)  # (N, hidden) or (N, vocab + hidden)
        if coefficients.shape[1] == 1 and grad_c.shape[1] != 1:
            grad_c = grad_c.sum(1, keepdim=True)  # one scalar per source
        return None, None, grad_c, None


def _frozen(t: Tensor) -> nn.Parameter:
    return t if isinstance(t, nn.Parameter) and not t.requires_grad else nn.Parameter(t, requires_grad=False)


def _drop_sources_from_state_dict(module: nn.Module, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
    for suffix in SOURCE_SUFFIXES:
        state_dict.pop(prefix + suffix, None)


def _ignore_missing_sources(module: nn.Module, incompatible_keys: Any) -> None:
    missing = incompatible_keys.missing_keys
    missing[:] = [k for k in missing if k.rsplit(".", 1)[-1] not in SOURCE_SUFFIXES]


class DAMModule(nn.Module):
    """Base of the DAM modules: a weight (and optional bias) as frozen stacked sources plus raw coefficients.

    Attributes: ``weight_sources`` (N, *S) and ``weight_coefficients`` (N, *C); ``bias_sources`` (N, out) and
    ``bias_coefficients`` (N, out) or (N, 1), or None. Sources are frozen parameters and are dropped from
    ``state_dict()`` (and not required by ``load_state_dict``); coefficients are parameters whose
    ``requires_grad`` says whether they train. ``transform`` maps raw to merge coefficients (``base``: the base
    source's index, which ``task_vector`` and the task-vector basis need). ``basis``: ``weights`` (every
    coefficient multiplies its source's weight) or ``task_vectors`` (every source's but the base's multiplies
    ``W_i - W_base``: :func:`basis_sources`); ``relative_to`` is then the base's index, else None.
    ``freeze_base``: the base source's raw coefficients get no gradient (they stay at the init). ``selected``:
    None (merge) or a source index (teacher mode: the source's own weights, whatever the basis).
    """

    def __init__(
        self,
        weight_sources: Tensor,
        weight_coefficients: Tensor,
        bias_sources: Tensor | None = None,
        bias_coefficients: Tensor | None = None,
        transform: str = "none",
        base: int | None = None,
        basis: str = "weights",
        freeze_base: bool = False,
    ):
        super().__init__()
        if transform not in TRANSFORMS:
            raise ValueError(f"unknown transform {transform!r}; valid: {', '.join(TRANSFORMS)}")
        if basis not in BASES:
            raise ValueError(f"unknown basis {basis!r}; valid: {', '.join(BASES)}")
        if transform == "task_vector" or basis == "task_vectors" or freeze_base:
            _base_index(transform if transform == "task_vector" else basis, base, weight_sources.shape[0])
        if (bias_sources is None) != (bias_coefficients is None):
            raise ValueError("bias_sources and bias_coefficients go together")
        _check_pair("weight", weight_sources, weight_coefficients)
        # sources first: Hugging Face's ``model.dtype`` is the dtype of the first floating-point parameter
        self.weight_sources = _frozen(weight_sources)
        self.weight_coefficients = _as_parameter(weight_coefficients)
        if bias_sources is not None and bias_coefficients is not None:
            _check_pair("bias", bias_sources, bias_coefficients)
            if bias_sources.shape[0] != weight_sources.shape[0]:
                raise ValueError("bias and weight have different numbers of sources")
            self.bias_sources = _frozen(bias_sources)
            self.bias_coefficients = _as_parameter(bias_coefficients)
        else:
            self.register_parameter("bias_sources", None)
            self.register_parameter("bias_coefficients", None)
        self.transform = transform
        self.base = base
        self.relative_to = base if basis == "task_vectors" else None
        self.freeze_base = freeze_base
        if transform == "task_vector" and self.rows():
            raise ValueError("transform 'task_vector' cannot be combined with row scales (granularity row_column)")
        self.selected: int | None = None
        self.register_state_dict_post_hook(_drop_sources_from_state_dict)
        self.register_load_state_dict_post_hook(_ignore_missing_sources)

    @property
    def num_sources(self) -> int:
        return self.weight_sources.shape[0]

    def rows(self, name: str = "weight") -> int:
        """Leading row scales per source in ``name``'s coefficients (:func:`row_count`): out for row_column."""
        sources = getattr(self, f"{name}_sources")
        return 0 if sources is None else row_count(sources.shape, getattr(self, f"{name}_coefficients").shape)

    def coefficients(self, name: str = "weight") -> Tensor:
        """Merge coefficients of ``name`` ("weight" or "bias") after the transform (differentiable)."""
        raw = getattr(self, f"{name}_coefficients")
        if self.freeze_base and raw.requires_grad:  # the base's row as a constant: its gradient is 0
            b = self.base
            raw = torch.cat([raw[:b], raw[b : b + 1].detach(), raw[b + 1 :]])
        return transform_coefficients(raw, self.transform, self.rows(name), self.base)

    def merged(self, name: str = "weight") -> Tensor | None:
        """The merged ``name`` tensor in the sources' dtype (no grad): what an exported checkpoint holds."""
        sources = getattr(self, f"{name}_sources")
        if sources is None:
            return None
        with torch.no_grad():
            return merge(sources, self.coefficients(name), self.rows(name), self.relative_to).to(sources.dtype)

    def _merged_bias(self) -> Tensor | None:
        if self.bias_sources is None:
            return None
        if self.selected is not None:
            return self.bias_sources[self.selected]
        sources = basis_sources(self.bias_sources, self.relative_to, self.bias_coefficients.dtype)
        return fold(sources, self.coefficients("bias")).to(self.bias_sources.dtype)

    def extra_repr(self) -> str:
        shape, bias = tuple(self.weight_sources.shape[1:]), self.bias_sources is not None
        basis = "" if self.relative_to is None else f", task vectors relative to source {self.relative_to}"
        return f"sources={self.num_sources}, weight={shape}, bias={bias}, transform={self.transform}{basis}"


def _as_parameter(t: Tensor) -> nn.Parameter:
    return t if isinstance(t, nn.Parameter) else nn.Parameter(t)


def _matrix_layout(sources: Tensor, coefficients: Tensor) -> bool:
    """Coefficients (N, in), (N, out + in) or (N, 1) for 2-D sources (N, out, in): column, row_column, tensor."""
    out, inp = sources.shape[1:]
    return coefficients.dim() == 2 and coefficients.shape[1] in (inp, out + inp, 1)


def _check_pair(name: str, sources: Tensor, coefficients: Tensor) -> None:
    if sources.dim() < 2 or coefficients.dim() < 2 or coefficients.shape[0] != sources.shape[0]:
        raise ValueError(
            f"{name}: sources {tuple(sources.shape)} and coefficients {tuple(coefficients.shape)} need the same "
            "leading number of sources"
        )
    try:
        if not row_count(sources.shape, coefficients.shape):
            torch.broadcast_shapes(sources.shape[1:], coefficients.shape[1:])
    except RuntimeError as e:
        raise ValueError(
            f"{name}: coefficients {tuple(coefficients.shape)} do not broadcast to sources {tuple(sources.shape)}"
        ) from e
    if not coefficients.is_floating_point() or coefficients.element_size() < 4:
        raise ValueError(f"{name}: coefficients must be float32 or float64, got {coefficients.dtype}")


class DAMLinear(DAMModule):
    """Replaces ``nn.Linear``: ``y = x (sum_i diag(r_i) W_i diag(c_i))^T + sum_i b_i * beta_i``.

    weight_sources (N, out, in), weight_coefficients (N, in) (``r_i = 1``), (N, out + in) (``[r_i | c_i]``) or
    (N, 1) (a scalar ``c_i``, ``r_i = 1``); optional bias_sources (N, out) with bias_coefficients (N, out) or
    (N, 1).
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if self.weight_sources.dim() != 3 or not _matrix_layout(self.weight_sources, self.weight_coefficients):
            raise ValueError(
                f"linear: expected sources (N, out, in) and coefficients (N, in), (N, out + in) or (N, 1), got "
                f"{tuple(self.weight_sources.shape)} and {tuple(self.weight_coefficients.shape)}"
            )
        self.out_features, self.in_features = self.weight_sources.shape[1:]

    def forward(self, x: Tensor) -> Tensor:
        bias = self._merged_bias()
        if self.selected is not None:
            return F.linear(x, self.weight_sources[self.selected], bias)
        return _DAMLinearFunction.apply(x, self.weight_sources, self.coefficients("weight"), bias, self.relative_to)

    def chunked_loss(self, x: Tensor, chunk_loss: Callable[[Tensor, slice], Tensor], rows: int) -> Tensor:
        """``sum over chunks of chunk_loss(self(x)[rows], rows)`` for x (M, in), ``rows`` rows at a time: the
        merged layer's output (M, out) never exists whole (:class:`_DAMLinearLossFunction`). Merged mode only."""
        if self.selected is not None:
            raise RuntimeError("chunked_loss runs the merged layer, not a selected source")
        bias = self._merged_bias()
        return _DAMLinearLossFunction.apply(
            x, self.weight_sources, self.coefficients("weight"), bias, chunk_loss, rows, self.relative_to
        )

    def source_forward(self, x: Tensor, k: int) -> Tensor:
        """Source ``k``'s own layer on x (..., in) -> (..., out): what ``selected = k`` computes, without grad."""
        with torch.no_grad():
            bias = None if self.bias_sources is None else self.bias_sources[k]
            return F.linear(x, self.weight_sources[k], bias)


class DAMEmbedding(DAMModule):
    """Replaces ``nn.Embedding``: rows of ``E = sum_i E_i diag(c_i)``.

    weight_sources (N, vocab, hidden), weight_coefficients (N, hidden). ``padding_idx`` is kept for reference
    (it only affects the gradient of the frozen table).

    ``embedding``: for an ``nn.Embedding`` subclass with its own forward (Gemma's scaled embedding), the original
    module with its weight removed; its forward then runs with the merged table substituted. That path
    materialises the merged (vocab, hidden) table and its dense gradient (plain autograd), so it costs about two
    tables of transient memory where the gather path of a plain embedding costs only the looked-up rows.
    """

    def __init__(self, *args: Any, padding_idx: int | None = None, embedding: nn.Module | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if self.weight_sources.dim() != 3 or not _matrix_layout(self.weight_sources, self.weight_coefficients):
            raise ValueError(
                f"embedding: expected sources (N, vocab, hidden) and coefficients (N, hidden), (N, vocab + hidden) "
                "or (N, 1), got "
                f"{tuple(self.weight_sources.shape)} and {tuple(self.weight_coefficients.shape)}"
            )
        if self.bias_sources is not None:
            raise ValueError("embedding: no bias expected")
        if embedding is not None and any(True for _ in embedding.parameters()):
            raise ValueError(f"embedding: remove the parameters of {type(embedding).__name__} before wrapping it")
        self.num_embeddings, self.embedding_dim = self.weight_sources.shape[1:]
        self.padding_idx = padding_idx
        self.embedding = embedding

    def forward(self, ids: Tensor) -> Tensor:
        if self.embedding is not None:
            if self.selected is not None:
                weight = self.weight_sources[self.selected]
            else:
                weight = merge(self.weight_sources, self.coefficients("weight"), self.rows(), self.relative_to)
                weight = weight.to(self.weight_sources.dtype)
            return torch.func.functional_call(self.embedding, {"weight": weight}, (ids,), strict=False)
        if self.selected is not None:
            return F.embedding(ids, self.weight_sources[self.selected], self.padding_idx)
        return _DAMEmbeddingFunction.apply(ids, self.weight_sources, self.coefficients("weight"), self.relative_to)


class DAMNorm(DAMModule):
    """Replaces a norm layer (RMSNorm, LayerNorm, any variant): runs the original module's own forward with the
    merged weight ``sum_i w_i * c_i`` (elementwise) and merged bias substituted for its parameters.

    ``norm`` is the original module with its ``weight``/``bias`` parameters removed; weight_sources (N, hidden),
    weight_coefficients (N, hidden). The merged vectors are small, so plain autograd differentiates them.
    """

    def __init__(self, norm: nn.Module, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if any(True for _ in norm.parameters()):
            raise ValueError(f"norm: remove the parameters of {type(norm).__name__} before wrapping it")
        self.norm = norm

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.selected is not None:
            weight = self.weight_sources[self.selected]
        else:
            coefficients = self.coefficients("weight")
            weight = merge(self.weight_sources, coefficients, 0, self.relative_to).to(self.weight_sources.dtype)
        tensors = {"weight": weight}
        if self.bias_sources is not None:
            tensors["bias"] = self._merged_bias()
        return torch.func.functional_call(self.norm, tensors, args, kwargs, strict=False)
