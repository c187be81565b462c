"""Sparsification of task vectors: which entries of a delta survive, and the L1 rescale.

Every ``*_mask`` function takes a delta ``x`` (any shape) and returns a bool tensor of the same shape,
True where the entry is kept. :func:`apply_mask` zeroes the rest and can rescale the survivors so that the
delta keeps its L1 norm. :func:`sparsify` dispatches by method name, as the task-arithmetic family uses it.

All of them reproduce mergekit 0.1.5 (``mergekit/sparsify.py``) entry for entry. :func:`random_mask` (DARE) keeps an
entry where a uniform draw in ``[0, 1)`` is below ``density``: on CPU the very draws of mergekit's ``torch.bernoulli``
of a tensor filled with ``density`` from the same generator state (tested on torch 2.6 and 2.13), at about half its
cost. One documented difference is in :func:`magnitude_mask` (TIES): it finds the ``k``-th largest magnitude by a radix
select (:func:`kth_largest`, linear time) instead of sorting every magnitude, and among entries *equal* to that
threshold magnitude it keeps those of lowest flat index (the order of a stable sort). mergekit keeps the ones its
unstable sort happens to place first, an order that depends on the tensor's size (tested: for tensors of a few thousand
entries it is neither the stable order nor its reverse). Both keep exactly ``k`` entries, the same ones above the
threshold and the same number at it; only which of the equal-magnitude entries at the threshold survive can differ.
Float32 deltas of real fine-tunes rarely tie there; deltas of bf16 checkpoints take few distinct values, so they can.
Breadcrumbs finds its two bounds the same way (see :func:`breadcrumbs_mask`).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

Sparsification = Literal["magnitude", "random", "breadcrumbs", "della"]

RESCALE_EPS = 1e-7  # below this L1 norm (before or after masking) the rescale is skipped


def validate_sparsity(
    method: Sparsification, density: float, *, gamma: float = 0.0, epsilon: float = 0.0, where: str = ""
) -> None:
    """Raise ``ValueError`` unless the parameters are valid for ``method``.

    ``density`` must lie in (0, 1]. Breadcrumbs needs ``gamma`` in [0, 1). DELLA with ``density < 1`` needs
    ``0 < density - epsilon`` and ``density + epsilon < 1``, so that every keep probability is a probability.
    ``where`` prefixes the message (e.g. ``"models[1]: "``).
    """
    if not 0 < density <= 1:
        raise ValueError(f"{where}density={density} is outside (0, 1]")
    if method == "breadcrumbs" and not 0 <= gamma < 1:
        raise ValueError(f"{where}gamma={gamma} is outside [0, 1)")
    if method == "della" and density < 1 and not (0 < density - epsilon and density + epsilon < 1):
        raise ValueError(
            f"{where}density={density} and epsilon={epsilon} give keep probabilities "
            f"[{density - epsilon:g}, {density + epsilon:g}], which must lie inside (0, 1)"
        )


def _keep_all(x: Tensor) -> Tensor:
    return torch.ones_like(x, dtype=torch.bool)


RADIX_MIN = 1 << 16  # below this many entries torch.kthvalue is as fast as the two histograms


def kth_largest(magnitudes: Tensor, k: int) -> Tensor:
    """The ``k``-th largest entry (1-based) of a 1-D tensor of non-negative values, as a 0-D tensor: exactly
    ``torch.kthvalue(magnitudes, numel - k + 1).values``.

    For float32 it is a two-pass radix select, about four times faster than ``kthvalue`` on CPU (which copies and
    partially sorts the whole tensor): the bit patterns of non-negative floats, read as integers, are in the
    values' order, so a histogram of their top 16 bits finds the bucket that holds the ``k``-th largest, and a
    histogram of the low 16 bits of that bucket's entries finds the value itself. Other dtypes and small tensors
    use ``kthvalue``.
    """
    n = magnitudes.numel()
    if magnitudes.dtype != torch.float32 or n < RADIX_MIN:
        return torch.kthvalue(magnitudes, n - k + 1).values
    bits = magnitudes.view(torch.int32)
    high = bits >> 16  # in [0, 2^15): the sign bit is 0
    high_counts = torch.bincount(high, minlength=1 << 15)
    top, k = _bucket_of_kth_largest(high_counts, k)
    in_top = high == top
    if int(high_counts[top]) * BUCKET_GATHER_SHARE < n:
        low_counts = torch.bincount(bits[in_top] & 0xFFFF, minlength=1 << 16)
    else:
        # A bucket holding much of the tensor (bf16 deltas: runs of equal values, zeros above all): every other
        # entry goes to an extra bin instead of gathering the bucket, which builds an int64 index per entry.
        low = torch.bitwise_and(bits, 0xFFFF).masked_fill_(in_top.logical_not_(), 1 << 16)
        low_counts = torch.bincount(low, minlength=(1 << 16) + 1)[: 1 << 16]
    bottom, _ = _bucket_of_kth_largest(low_counts, k)
    return torch.tensor((top << 16) | bottom, dtype=torch.int32, device=magnitudes.device).view(torch.float32)


BUCKET_GATHER_SHARE = 8  # kth_largest gathers the bucket's entries when it holds under 1/8 of them


def _bucket_of_kth_largest(counts: Tensor, k: int) -> tuple[int, int]:
    """``(b, r)``: the bin ``b`` of the ``k``-th largest key, given ``counts`` (a histogram of integer keys by
    value), and that entry's rank ``r`` (1-based, from the largest) among the keys in bin ``b``."""
    at_least = counts.flip(0).cumsum(0).flip(0)  # at_least[b]: how many keys are >= b
    b = int((at_least >= k).nonzero()[-1])
    return b, k - int(at_least[b] - counts[b])


RANK_CHUNK = 1 << 20  # keep_ranks lists the True entries of one chunk of this many at a time


def keep_ranks(flags: Tensor, start: int, stop: int | None = None) -> Tensor:
    """``flags`` (1-D bool) with only its True entries of rank ``start`` to ``stop - 1`` (0-based, in index order;
    ``stop=None``: to the end) left True, in place; returns ``flags``.

    Chunk by chunk: only a chunk that a bound falls in lists its True entries' indices, so no int64 index of every
    True entry is built (bf16 deltas tie at the threshold by the million: zeros above all).
    """
    seen = 0  # True entries before the chunk
    for begin in range(0, flags.numel(), RANK_CHUNK):
        chunk = flags[begin : begin + RANK_CHUNK]
        if stop is not None and seen >= stop:
            chunk.zero_()
            continue
        here = int(chunk.sum())
        if seen < start or (stop is not None and seen + here > stop):
            true_at = chunk.nonzero().view(-1)
            chunk.zero_()
            chunk[true_at[max(start - seen, 0) : None if stop is None else max(stop - seen, 0)]] = True
        seen += here
    return flags


def magnitude_mask(x: Tensor, density: float) -> Tensor:
    """Top-k by magnitude over the whole tensor: keep the ``k = max(1, int(density * numel))`` largest ``|x|``.

    With ``v`` the ``k``-th largest magnitude, every entry with ``|x| > v`` is kept, then the entries with
    ``|x| == v`` of lowest flat index until ``k`` are kept (see the module docstring for how that tie rule
    relates to mergekit's sort).
    """
    n = x.numel()
    if density >= 1 or n == 0:
        return _keep_all(x)
    k = max(1, int(density * n))
    if k >= n:
        return _keep_all(x)
    return top_k_mask(x.abs().flatten(), k).view(x.shape)


def top_k_mask(magnitudes: Tensor, k: int) -> Tensor:
    """Bool mask of the ``k`` largest of ``magnitudes`` (1-D, non-negative, ``0 < k <= numel``): with ``v`` the
    ``k``-th largest, every entry above ``v``, then the entries equal to ``v`` of lowest index until ``k``."""
    threshold = kth_largest(magnitudes, k)
    mask = magnitudes > threshold
    tied = keep_ranks(magnitudes == threshold, 0, k - int(mask.sum()))  # the first `missing` in index order
    return mask.logical_or_(tied)


def breadcrumbs_mask(x: Tensor, density: float, gamma: float) -> Tensor:
    """Model Breadcrumbs: drop the largest outliers, then keep the next ``density`` fraction by magnitude.

    With ``n = numel``, ``keep = int(density * n)`` and ``top = int(gamma * n)``, sort ``|x|`` ascending and keep
    positions ``[start, start + keep)`` where ``start = max(0, n - keep - top)``: the top ``top`` entries go, and
    when ``keep + top > n`` fewer outliers are dropped so that exactly ``keep`` entries survive.
    At ``density >= 1`` everything is kept (no outlier removal either).

    No sort is made: the smallest and the largest kept magnitudes are found by :func:`kth_largest`, everything
    strictly between them is kept, and the entries equal to either are taken in the order of a *stable* ascending
    sort (index order among equal magnitudes). mergekit's unstable sort can order equal magnitudes otherwise on
    large tensors (the module docstring says the same of TIES): the same number of entries, the same ones strictly
    between the two bounds.
    """
    if density >= 1:
        return _keep_all(x)
    n = x.numel()
    keep = int(density * n)
    start = max(0, n - keep - int(gamma * n))
    if keep == 0:
        return torch.zeros_like(x, dtype=torch.bool)
    magnitudes = x.abs().flatten()
    low = kth_largest(magnitudes, n - start)  # ascending position `start`
    high = kth_largest(magnitudes, n - start - keep + 1)  # ascending position `start + keep - 1`
    mask = (magnitudes > low) & (magnitudes < high)
    at_low = magnitudes == low  # in index order, ascending positions below_low, below_low + 1, ...
    first = start - int((magnitudes < low).sum())
    if bool(low == high):
        mask |= keep_ranks(at_low, first, first + keep)
    else:
        mask |= keep_ranks(at_low, first)
        mask |= keep_ranks(magnitudes == high, 0, start + keep - int((magnitudes < high).sum()))
    return mask.view(x.shape)


def random_mask(x: Tensor, density: float, generator: torch.Generator | None = None) -> Tensor:
    """DARE: keep each entry independently with probability ``density``: ``u < density``, ``u ~ U[0, 1)`` drawn
    from ``generator`` (the draws of ``torch.bernoulli(torch.full_like(x, density))``, see the module docstring)."""
    if density >= 1:
        return _keep_all(x)
    return torch.rand(x.shape, generator=generator, device=x.device) < density


def della_mask(x: Tensor, density: float, epsilon: float, generator: torch.Generator | None = None) -> Tensor:
    """DELLA MagPrune: a keep probability that ramps with magnitude rank within each row.

    Rows are dimension 1 of ``x`` (a 0-D or 1-D tensor is one row). In a row of ``m`` entries the entry of
    ascending magnitude rank ``r`` (0-based) is kept with probability

        p = (density - epsilon) + 2 * epsilon * r / (m - 1)

    so the smallest entry gets ``density - epsilon``, the largest ``density + epsilon``, and the mean is
    ``density``. A row of one entry (``m = 1``) gets ``p = density``; mergekit 0.1.5 fails there (0/0).
    """
    if density >= 1:
        return _keep_all(x)
    rows = x.reshape(1, -1) if x.dim() < 2 else x
    m = rows.shape[1]
    if m == 1:
        probs = torch.full_like(rows, density)
    else:
        order = torch.sort(rows.abs(), dim=1).indices
        positions = torch.arange(m, dtype=rows.dtype, device=rows.device).view(1, m, *[1] * (rows.dim() - 2))
        rank = torch.empty_like(rows).scatter_(1, order, positions.expand_as(rows))
        probs = (density - epsilon) + rank / (m - 1) * 2 * epsilon
    return torch.bernoulli(probs, generator=generator).bool().view(x.shape)


def apply_mask(x: Tensor, mask: Tensor, rescale: bool, *, in_place: bool = False) -> Tensor:
    """Zero the entries of ``x`` outside ``mask``; with ``rescale``, restore the L1 norm:

        out = (x * mask) * sum|x| / sum|x * mask|

    The rescale is skipped when either sum is below ``RESCALE_EPS`` (nothing meaningful to match). ``in_place``
    writes ``out`` into ``x`` (the same values) instead of a new tensor.
    """
    before = x.abs().sum() if rescale else None
    masked = torch.where(mask, x, x.new_zeros(()), out=x) if in_place else torch.where(mask, x, 0.0)
    if before is None:
        return masked
    after = masked.abs().sum()
    if before < RESCALE_EPS or after < RESCALE_EPS:
        return masked
    return masked.mul_(before / after)


def sparsify(
    x: Tensor,
    method: Sparsification,
    density: float,
    *,
    gamma: float = 0.0,
    epsilon: float = 0.0,
    rescale: bool = False,
    generator: torch.Generator | None = None,
    in_place: bool = False,
) -> Tensor:
    """Sparsify a delta with ``method``; ``density >= 1`` returns ``x`` itself (no mask, no rescale).
    ``in_place`` overwrites ``x`` with the result (:func:`apply_mask`)."""
    if density >= 1:
        return x
    if method == "magnitude":
        mask = magnitude_mask(x, density)
    elif method == "random":
        mask = random_mask(x, density, generator)
    elif method == "breadcrumbs":
        mask = breadcrumbs_mask(x, density, gamma)
    elif method == "della":
        mask = della_mask(x, density, epsilon, generator)
    else:
        raise ValueError(f"unknown sparsification method {method!r}")
    return apply_mask(x, mask, rescale, in_place=in_place)
