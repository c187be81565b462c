"""DAM training losses: pure functions of tensors (torch only).

- :func:`kl_divergence`: ``T^2 * KL(softmax(t/T) || softmax(s/T))`` per token, averaged over non-padding tokens.
- :func:`teacher_distribution`, :func:`teacher_spread` and :func:`distribution_kl`: the same from a teacher
  distribution kept as one ``(..., V)`` tensor of log-probabilities, which may be the mean of several teachers'
  (``pairing: all``).
- :func:`topk_kl_divergence`: the same from cached top-K teacher logits and their vocabulary indices, for one
  teacher or the mean over S teachers.
- :func:`prediction_entropy`: the entropy of the model's own predictive distribution per token, averaged over
  non-padding tokens (AdaMerging's label-free, teacher-free objective).
- :func:`layer_alignment`: the merged model's hidden state after every decoder layer against its teachers' at the
  same layer, a normalised squared distance per token, averaged over layers and teachers (``loss.align``).
- :func:`coefficient_similarity`: mean pairwise cosine of the per-source coefficient vectors, averaged over modules.
- :func:`l1_penalty`, :func:`l2_penalty`: mean over every coefficient of ``|c - target|`` / ``(c - target)^2``,
  toward zero or toward given targets (the init).
- :func:`coefficient_losses`: the weighted regularisers as a dict; a term whose weight is 0 is absent (and not
  computed).

Several teachers at once: with ``pbar = mean_s p_s``, the mean over teachers s of ``KL(p_s || q)`` is
``sum_v pbar_v log(1/q_v) - mean_s H(p_s)``, a cross-entropy to the mean teacher distribution minus a constant of
the student, or equally ``KL(pbar || q) + mean_s KL(p_s || pbar)``. So the student's log-softmax is taken once
whatever the number of teachers, and full-vocabulary targets are one ``(..., V)`` tensor, not one per teacher.

The losses over the vocabulary (the KLs, the entropy) never hold a float32 ``(..., V)`` tensor whole: each is a
:data:`ChunkLoss`, a sum over tokens taken :func:`chunk_rows` tokens at a time and recomputed chunk by chunk in
backward. :func:`chunked_loss` runs one over logits given whole; the training loop instead fuses it with the
``lm_head`` (:meth:`dam.adaptive.layers.DAMLinear.chunked_loss`), so that the student's logits exist one chunk at
a time too, and on-the-fly full-vocabulary targets come from the teachers' final hidden states through their own
``lm_head``, chunk by chunk (:func:`teacher_mixture`): a sequence then adds its activations to the peak memory and
no ``(T, V)`` tensor.

The training loop combines them as ``loss = kl_weight * kl + align_weight * layer_alignment +
sum(coefficient_losses(...).values())``. All arithmetic is in float32 whatever the logits' dtype.

The regularisers are means, not sums: the KL is a token mean, so a regulariser summed over modules and elements
would weigh more against it the deeper and wider the model. As means, one weight gives the same pull on a small
and a large model. A weight ``w`` of the former sums equals ``w * modules`` (similarity) and ``w * coefficients``
(L1, L2; every coefficient of every source counted) here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def kl_divergence(
    student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None, temperature: float = 1.0
) -> Tensor:
    """``T^2 * mean_tokens KL(p_t || p_s)`` with ``p = softmax(logits / T)``.

    student_logits, teacher_logits: (..., V), e.g. (B, L, V); mask: (...) with 1 for tokens that count and 0 for
    padding, or None for all. Returns a scalar. The ``T^2`` factor keeps gradient magnitudes comparable across
    temperatures (Hinton et al. 2015).
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} vs teacher {tuple(teacher_logits.shape)}")
    log_p, _ = teacher_distribution(teacher_logits, temperature)
    return distribution_kl(student_logits, log_p, torch.zeros_like(log_p[..., 0]), mask, temperature)


def teacher_distribution(teacher_logits: Tensor, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """``log p = log_softmax(t / T)`` (..., V) float32 and the negative entropy ``sum_v p_v log p_v`` (...).

    ``teacher_logits`` (..., V) may be log-probabilities (a per-token shift cancels).
    """
    log_p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)  # (..., V)
    return log_p, (log_p.exp() * log_p).sum(-1)


def teacher_spread(mean_logprobs: Tensor, mean_neg_entropy: Tensor) -> Tensor:
    """``mean_s KL(p_s || pbar) = mean_s sum_v p_s log p_s - sum_v pbar log pbar`` (...) for S teachers, from the
    log of their mean distribution ``pbar`` (..., V) and the mean of their negative entropies
    (:func:`teacher_distribution`)."""
    return mean_neg_entropy - (mean_logprobs.exp() * mean_logprobs).sum(-1)


def distribution_kl(
    student_logits: Tensor,
    teacher_logprobs: Tensor,
    teacher_spread: Tensor,
    mask: Tensor | None = None,
    temperature: float = 1.0,
    overwrite_logits: bool = False,
) -> Tensor:
    """``T^2 * mean_tokens (spread + KL(pbar || q))`` with ``q = softmax(s / T)``.

    student_logits (..., V); teacher_logprobs ``log pbar`` (..., V), the log of the mean of S teachers'
    distributions at temperature T; teacher_spread (...), their :func:`teacher_spread` (0 for one teacher). Both
    are constants: no gradient flows to them. Since ``mean_s KL(p_s || q) = mean_s KL(p_s || pbar) + KL(pbar || q)``,
    this is the mean over the S teachers of ``KL(p_s || q)``, with one student log-softmax and one (..., V) target
    whatever S. The KL is summed term by term, ``pbar (log pbar - log q)``, which keeps its float32 precision when
    it is small. Computed a chunk of tokens at a time (:func:`chunked_loss`); ``overwrite_logits``: backward
    writes the gradient into the student logits' storage, which then no longer holds the logits (for a training
    step, whose logits nothing reads after backward: one (..., V) tensor instead of two at the peak; a second
    backward through the same graph, ``retain_graph``, then raises autograd's error on a tensor modified in place).
    """
    if student_logits.shape != teacher_logprobs.shape or teacher_spread.shape != student_logits.shape[:-1]:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} vs teacher log-probabilities "
            f"{tuple(teacher_logprobs.shape)} and spread {tuple(teacher_spread.shape)}"
        )
    weights, count = token_weights(mask, student_logits.shape[:-1], student_logits.device)
    loss = distribution_kl_loss(flat_target(teacher_logprobs, teacher_spread), weights, count, temperature)
    return chunked_loss(student_logits.reshape(-1, student_logits.shape[-1]), loss, overwrite_logits)


def flat_target(teacher_logprobs: Tensor, teacher_spread: Tensor) -> Callable[[slice], tuple[Tensor, Tensor]]:
    """``target(rows)`` for :func:`distribution_kl_loss` from whole targets: ``log pbar`` (..., V) and the spread
    (...), read at the flattened tokens ``rows``."""
    target, spread = teacher_logprobs.reshape(-1, teacher_logprobs.shape[-1]), teacher_spread.reshape(-1)
    return lambda rows: (target[rows], spread[rows])


def distribution_kl_loss(
    target: Callable[[slice], tuple[Tensor, Tensor]], weights: Tensor, count: Tensor, temperature: float
) -> ChunkLoss:
    """:func:`distribution_kl` as a :data:`ChunkLoss`: ``target(rows)`` gives the chunk's ``log pbar`` (r, V) and
    spread (r,); ``weights`` (tokens,) and ``count`` from :func:`token_weights`."""

    def loss(logits: Tensor, rows: slice) -> Tensor:  # logits (r, V) of the tokens ``rows``
        log_pbar, spread = target(rows)
        log_q = F.log_softmax(logits.float() / temperature, dim=-1)  # (r, V)
        kl = F.kl_div(log_q, log_pbar.float(), reduction="none", log_target=True).sum(-1)  # (r,)
        return temperature**2 * ((spread.float() + kl) * weights[rows]).sum() / count

    return loss


def teacher_mixture(teacher_logits: Iterable[Tensor], temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """``log pbar`` (..., V) float32 and the spread (...) (:func:`teacher_spread`, 0 for one teacher) of S
    teachers given by their logits (..., V) each, taken one at a time: what :func:`distribution_kl_loss` takes."""
    log_mean = neg_entropy = None
    count = 0
    for logits in teacher_logits:
        log_p, h = teacher_distribution(logits, temperature)
        log_mean = log_p if log_mean is None else torch.logaddexp(log_mean, log_p)
        neg_entropy = h if neg_entropy is None else neg_entropy + h
        count += 1
    if log_mean is None or neg_entropy is None:
        raise ValueError("no teacher logits given")
    if count == 1:
        return log_mean, torch.zeros_like(neg_entropy)
    log_mean -= math.log(count)
    return log_mean, teacher_spread(log_mean, neg_entropy / count)


def topk_kl_divergence(
    student_logits: Tensor,
    teacher_topk_logits: Tensor,
    teacher_topk_indices: Tensor,
    mask: Tensor | None = None,
    temperature: float = 1.0,
    overwrite_logits: bool = False,
) -> Tensor:
    """KL from cached top-K teacher logits: ``T^2 * mean_tokens KL(p~_t || p_s)``.

    student_logits: (..., V); teacher_topk_logits: (..., K) (any float dtype; top-K log-probabilities work as
    well, since a per-token shift cancels in the softmax over K) or (..., S, K) for S teachers, whose KLs are
    averaged with one student log-softmax; teacher_topk_indices: vocabulary ids, same shape; mask as in
    :func:`kl_divergence`. Computed a chunk of tokens at a time (:func:`chunked_loss`); ``overwrite_logits`` as in
    :func:`distribution_kl`.

    Approximation: the teacher distribution is replaced by ``p~_t``, its softmax over the K cached logits
    (renormalised top-K, zero elsewhere). The student keeps its full softmax over V, so this is an exact KL
    between ``p~_t`` and ``p_s``: ``sum_k p~_k (log p~_k - log p_s[idx_k])``. It is >= 0, equals the full KL
    when K = V, and still penalises student mass outside the teacher's top K (it lowers ``log p_s[idx_k]``).
    The error against the full KL shrinks with the teacher's tail mass ``1 - sum_k p_t[idx_k]``. No full-vocab
    teacher logits are ever needed.
    """
    if teacher_topk_logits.shape != teacher_topk_indices.shape:
        raise ValueError(
            f"top-k logits {tuple(teacher_topk_logits.shape)} vs indices {tuple(teacher_topk_indices.shape)}"
        )
    lead = student_logits.shape[:-1]
    several = teacher_topk_logits.dim() == student_logits.dim() + 1
    if teacher_topk_logits.shape[: len(lead)] != lead or teacher_topk_logits.dim() not in (
        len(lead) + 1,
        len(lead) + 2,
    ):
        raise ValueError(f"student logits {tuple(student_logits.shape)} vs top-k {tuple(teacher_topk_logits.shape)}")
    slots = teacher_topk_logits.shape[-2] if several else 1
    shape = (-1, slots, teacher_topk_logits.shape[-1])
    weights, count = token_weights(mask, lead, student_logits.device)
    loss = topk_kl_loss(
        teacher_topk_logits.reshape(shape), teacher_topk_indices.reshape(shape), weights, count, temperature
    )
    return chunked_loss(student_logits.reshape(-1, student_logits.shape[-1]), loss, overwrite_logits)


def topk_kl_loss(
    teacher_topk_logits: Tensor, teacher_topk_indices: Tensor, weights: Tensor, count: Tensor, temperature: float
) -> ChunkLoss:
    """:func:`topk_kl_divergence` as a :data:`ChunkLoss`: ``teacher_topk_logits`` and ``teacher_topk_indices``
    (tokens, S, K) for S teachers per token; ``weights`` and ``count`` from :func:`token_weights`."""
    tokens, slots, k = teacher_topk_logits.shape
    log_p = F.log_softmax(teacher_topk_logits.float() / temperature, dim=-1)
    log_p = log_p.reshape(tokens, slots * k)  # (tokens, S*K)
    indices = teacher_topk_indices.reshape(tokens, slots * k).long()  # (tokens, S*K)

    def loss(logits: Tensor, rows: slice) -> Tensor:  # logits (r, V) of the tokens ``rows``
        s = logits.float() / temperature  # (r, V)
        log_q = s.gather(-1, indices[rows]) - torch.logsumexp(s, dim=-1, keepdim=True)  # (r, S*K)
        kl = (log_p[rows].exp() * (log_p[rows] - log_q)).sum(-1) / slots  # (r,): the mean of the S teachers' KLs
        return temperature**2 * (kl * weights[rows]).sum() / count

    return loss


ChunkLoss = Callable[[Tensor, slice], Tensor]
"""A loss that adds up over tokens, given one chunk of them: the student's logits (r, V) of the flattened tokens
``rows`` -> a scalar. The whole loss is the sum over chunks (:func:`chunked_loss`, or fused with the ``lm_head``:
:meth:`dam.adaptive.layers.DAMLinear.chunked_loss`)."""

CHUNK_ELEMENTS = 2**22
"""Logits are taken ``chunk_rows(V) = max(MIN_CHUNK_ROWS, CHUNK_ELEMENTS // V)`` tokens at a time: each float32
temporary of a chunk is 16 MiB for 512 tokens of an 8k vocabulary, whatever the batch."""
MIN_CHUNK_ROWS = 256
"""At least this many tokens per chunk: with a 128k vocabulary, 256 tokens (128 MiB per float32 temporary) rather
than 32, so that the ``lm_head`` GEMM of a chunk is not dominated by reading the weight once per chunk."""


def chunk_rows(vocab: int) -> int:
    """Tokens per chunk for a vocabulary of ``vocab`` (:data:`CHUNK_ELEMENTS`, :data:`MIN_CHUNK_ROWS`)."""
    return max(1, MIN_CHUNK_ROWS, CHUNK_ELEMENTS // vocab)


def token_weights(mask: Tensor | None, lead: torch.Size, device: torch.device) -> tuple[Tensor, Tensor]:
    """The mask flattened to (tokens,) float32 (all ones when None) and its sum (at least 1): each token's weight
    in a masked mean and the mean's denominator."""
    mask = torch.ones(lead, device=device) if mask is None else mask
    mask = mask.reshape(-1).to(device=device, dtype=torch.float32)
    return mask, mask.sum().clamp_min(1.0)


def chunked_loss(logits: Tensor, loss: ChunkLoss, overwrite: bool = False) -> Tensor:
    """``sum over chunks of loss(logits[rows], rows)``, chunk by chunk.

    logits (M, V), any float dtype. Each chunk is :func:`chunk_rows` tokens. Its float32 temporaries (log-softmax,
    KL terms, their gradients) exist one chunk at a time: forward runs without autograd and keeps only the logits;
    backward runs each chunk again under autograd, as ``torch.utils.checkpoint`` would, and writes its gradient
    into an (M, V) tensor, the logits' own storage with ``overwrite`` (then nothing may read the logits after
    backward, and a second backward through the graph raises autograd's error on a tensor modified in place).
    Every operation of the losses is per token but the final sum, so the gradient is bit for bit autograd's over
    the whole tensor.
    """
    return _ChunkedLoss.apply(logits, loss, chunk_rows(logits.shape[-1]), overwrite)


class _ChunkedLoss(torch.autograd.Function):
    """:func:`chunked_loss` (the gradient to the logits only: everything else in the loss is a constant)."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        logits: Tensor,
        chunk_loss: Callable[[Tensor, slice], Tensor],
        rows: int,
        overwrite: bool,
    ) -> Tensor:
        ctx.save_for_backward(logits)
        ctx.chunk_loss, ctx.rows, ctx.overwrite = chunk_loss, rows, overwrite
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        for start in range(0, logits.shape[0], rows):
            chunk = slice(start, start + rows)
            total += chunk_loss(logits[chunk], chunk)
        return total

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        (logits,) = ctx.saved_tensors
        grad = logits if ctx.overwrite else torch.empty_like(logits)  # chunk by chunk: each is read, then written
        for start in range(0, logits.shape[0], ctx.rows):
            chunk = slice(start, start + ctx.rows)
            with torch.enable_grad():
                piece = logits[chunk].detach().requires_grad_()
                (grad[chunk],) = torch.autograd.grad(ctx.chunk_loss(piece, chunk), piece, grad_output)
        return grad, None, None, None


def prediction_entropy(logits: Tensor, mask: Tensor | None = None) -> Tensor:
    """``mean_tokens H(softmax(logits)) = -sum_v p_v log p_v`` in nats, a chunk of tokens at a time
    (:func:`chunked_loss`).

    logits: (..., V); mask as in :func:`kl_divergence`. Returns a scalar. Minimising it over merge coefficients on
    unlabeled inputs is AdaMerging (Yang et al., 2024): confident predictions correlate with low loss.
    """
    weights, count = token_weights(mask, logits.shape[:-1], logits.device)
    return chunked_loss(logits.reshape(-1, logits.shape[-1]), entropy_loss(weights, count))


def entropy_loss(weights: Tensor, count: Tensor) -> ChunkLoss:
    """:func:`prediction_entropy` as a :data:`ChunkLoss` (``weights`` and ``count`` from :func:`token_weights`)."""

    def loss(logits: Tensor, rows: slice) -> Tensor:  # logits (r, V) of the tokens ``rows``
        log_p = F.log_softmax(logits.float(), dim=-1)  # (r, V)
        return (-(log_p.exp() * log_p).sum(-1) * weights[rows]).sum() / count

    return loss


def layer_alignment(student: Sequence[Tensor], teacher: Tensor, weights: Tensor, count: Tensor) -> Tensor:
    """Layer-wise alignment of hidden states, per layer a token mean like the KL:
    ``a_l = (1 / count) sum_t w_t mean_s ||h_l[t] - g_{l,s}[t]||^2 / ||g_{l,s}[t]||^2``; the objective
    (``loss.align``) is their mean over the layers, ``mean_l a_l``.

    ``student``: L tensors (B, T, H), the merged model's hidden state after each decoder layer (the last one after
    the final norm, as Hugging Face's ``hidden_states[1:]``); ``teacher``: (L, B, S, T, H), the same states of the
    S teachers of each row (the row's own source for ``pairing: own``); ``weights`` (B * T,) and ``count`` from
    :func:`token_weights`. Each token's distance is relative to the teacher state's own squared norm, so layers
    and tokens of very different scales (the residual stream grows with depth; attention-sink tokens carry norms
    far above the others) weigh alike: a value of 0.01 is a 10% relative error at every layer. Only tokens of
    nonzero weight are computed. Returns the float32 vector ``a`` (L,), which the training loop logs per layer.
    """
    layers, batch, slots, length, width = teacher.shape
    if len(student) != layers or student[0].shape != (batch, length, width):
        shapes = [tuple(h.shape) for h in student[:1]]
        raise ValueError(f"{len(student)} student states {shapes} for teacher states {tuple(teacher.shape)}")
    picked = weights.nonzero().flatten()  # flattened (B * T) indices of the tokens that count
    w = weights[picked]
    per_layer = []
    for h, g in zip(student, teacher, strict=True):
        h = h.reshape(batch * length, width)[picked].float()  # (M, H)
        g = g.transpose(0, 1).reshape(slots, batch * length, width)[:, picked].float()  # (S, M, H)
        relative = (h - g).square().sum(-1) / g.square().sum(-1).clamp_min(torch.finfo(torch.float32).tiny)
        per_layer.append((relative.mean(0) * w).sum())
    return torch.stack(per_layer) / count


def coefficient_similarity(coefficients: Iterable[Tensor]) -> Tensor:
    """Mean over modules of the mean over source pairs i < j of ``cos(c_i, c_j)``.

    Each tensor is (N, ...) with one coefficient vector per source (flattened). Minimising it pushes the sources'
    coefficients apart. Its gradient is exactly zero while all ``c_i`` are equal (e.g. at the uniform init):
    ``d cos(a, b)/da = b/(|a||b|) - cos(a, b) a/|a|^2`` vanishes at ``a = b``.
    """
    total: Tensor | None = None
    modules = 0
    for c in coefficients:
        n = c.shape[0]
        if n < 2:
            raise ValueError("coefficient similarity needs at least two sources")
        unit = F.normalize(c.reshape(n, -1).float(), dim=1)  # (N, D)
        cos = unit @ unit.t()  # (N, N)
        i, j = torch.triu_indices(n, n, offset=1, device=c.device)
        term = cos[i, j].mean()
        total = term if total is None else total + term
        modules += 1
    if total is None:
        raise ValueError("no coefficients given")
    return total / modules


def _penalty(coefficients: Iterable[Tensor], targets: Iterable[Tensor] | None, power: int) -> Tensor:
    targets_iter = iter(targets) if targets is not None else None
    total: Tensor | None = None
    count = 0
    for c in coefficients:
        d = c.float() if targets_iter is None else c.float() - next(targets_iter).to(c.device).float()
        term = d.abs().sum() if power == 1 else d.square().sum()
        total = term if total is None else total + term
        count += c.numel()
    if total is None:
        raise ValueError("no coefficients given")
    return total / count


def l1_penalty(coefficients: Iterable[Tensor], targets: Iterable[Tensor] | None = None) -> Tensor:
    """``mean |c - target|`` over every coefficient of every module (target 0 when ``targets`` is None; else one
    tensor per coefficient tensor)."""
    return _penalty(coefficients, targets, 1)


def l2_penalty(coefficients: Iterable[Tensor], targets: Iterable[Tensor] | None = None) -> Tensor:
    """``mean (c - target)^2`` over every coefficient of every module (target 0 when ``targets`` is None; else one
    tensor per coefficient tensor)."""
    return _penalty(coefficients, targets, 2)


def coefficient_losses(
    coefficients: Mapping[str, Tensor],
    *,
    similarity: float = 0.0,
    l1: float = 0.0,
    l2: float = 0.0,
    init: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """Weighted coefficient regularisers: ``{"similarity": ..., "l1": ..., "l2": ...}``, only terms with weight > 0.

    ``coefficients``: module name -> merge coefficients (N, ...) (after the transform, as they enter the merge).
    ``init``: same keys -> the starting coefficients, to regularise toward them instead of toward zero.
    """
    if init is not None and set(init) != set(coefficients):
        raise ValueError("init must have exactly the coefficient names as keys")
    names = list(coefficients)
    values = [coefficients[k] for k in names]
    targets = None if init is None else [init[k] for k in names]
    out: dict[str, Tensor] = {}
    if similarity:
        out["similarity"] = similarity * coefficient_similarity(values)
    if l1:
        out["l1"] = l1 * l1_penalty(values, targets)
    if l2:
        out["l2"] = l2 * l2_penalty(values, targets)
    return out
