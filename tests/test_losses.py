"""DAM losses: distillation KL (full and top-K), coefficient similarity, L1/L2, weights of 0."""

from __future__ import annotations

import math

import pytest
import torch

from dam.adaptive.losses import (
    coefficient_losses,
    coefficient_similarity,
    distribution_kl,
    kl_divergence,
    l1_penalty,
    l2_penalty,
    prediction_entropy,
    teacher_distribution,
    teacher_mixture,
    teacher_spread,
    topk_kl_divergence,
)


def _logits(seed: int, shape=(2, 5, 11)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 3


def test_kl_of_identical_logits_is_zero():
    x = _logits(0)
    assert kl_divergence(x, x.clone(), temperature=2.0).abs() < 1e-6


def test_kl_matches_a_hand_computation_with_t_squared_scaling():
    s, t = torch.tensor([[1.0, 2.0, 0.5]]), torch.tensor([[0.2, 1.5, 1.0]])
    temperature = 2.0
    p = [math.exp(v / temperature) for v in t[0].tolist()]
    q = [math.exp(v / temperature) for v in s[0].tolist()]
    p = [v / sum(p) for v in p]
    q = [v / sum(q) for v in q]
    expected = temperature**2 * sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))
    assert kl_divergence(s, t, temperature=temperature).item() == pytest.approx(expected, rel=1e-5)
    # the T^2 factor: KL at T on logits x equals T^2 times the KL at T=1 on logits x/T
    assert kl_divergence(s, t, temperature=temperature).item() == pytest.approx(
        temperature**2 * kl_divergence(s / temperature, t / temperature, temperature=1.0).item(), rel=1e-6
    )


def test_kl_ignores_padding_tokens():
    s, t = _logits(1), _logits(2)
    mask = torch.ones(2, 5)
    mask[0, 3:] = 0
    mask[1, 4] = 0
    t_garbage = t.clone()
    t_garbage[mask == 0] = 1e3 * torch.randn_like(t_garbage[mask == 0])  # padding positions hold anything
    masked = kl_divergence(s, t_garbage, mask, temperature=2.0)
    per_token = torch.stack([kl_divergence(s[b, i], t[b, i], temperature=2.0) for b, i in mask.nonzero().tolist()])
    torch.testing.assert_close(masked, per_token.mean())


def test_topk_equals_full_kl_when_k_is_the_vocab():
    s, t = _logits(3), _logits(4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    values, indices = t.sort(dim=-1, descending=True)
    full = kl_divergence(s, t, mask, temperature=2.0)
    torch.testing.assert_close(topk_kl_divergence(s, values, indices, mask, temperature=2.0), full)
    # log-probabilities instead of logits give the same value (a per-token shift cancels)
    logp = torch.log_softmax(values, dim=-1)
    torch.testing.assert_close(topk_kl_divergence(s, logp, indices, mask, temperature=2.0), full)


def test_topk_is_the_kl_from_the_renormalised_teacher():
    s, t = _logits(5, (1, 1, 8)), _logits(6, (1, 1, 8))
    values, indices = t.topk(3, dim=-1)
    truncated = torch.full_like(t, -1e9).scatter(-1, indices, values)  # teacher with zero mass outside the top 3
    got = topk_kl_divergence(s, values, indices, temperature=1.5)
    torch.testing.assert_close(got, kl_divergence(s, truncated, temperature=1.5))
    assert got >= 0


def test_kl_gradient_flows_to_the_student_only():
    s = _logits(7).requires_grad_()
    t = _logits(8).requires_grad_()
    kl_divergence(s, t.detach(), temperature=2.0).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0


def test_similarity_is_the_mean_pairwise_cosine_averaged_over_modules():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    expected = (0.0 + 1 / math.sqrt(2) + 1 / math.sqrt(2)) / 3
    b = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    assert coefficient_similarity([a]).item() == pytest.approx(expected, rel=1e-6)
    assert coefficient_similarity([a, b]).item() == pytest.approx((expected + 1.0) / 2, rel=1e-6)


def test_similarity_gradient_is_zero_at_equal_coefficients():
    c = torch.full((3, 16), 1 / 3, requires_grad=True)
    coefficient_similarity([c]).backward()
    assert c.grad.abs().max() < 1e-6
    d = (torch.full((3, 16), 1 / 3) + 0.01 * torch.randn(3, 16)).requires_grad_()
    coefficient_similarity([d]).backward()
    assert d.grad.abs().max() > 1e-4  # once the symmetry is broken it pushes


def test_l1_l2_toward_zero_and_toward_init():
    c = [torch.tensor([[1.0, -2.0]]), torch.tensor([[3.0]])]
    init = [torch.tensor([[0.5, -1.0]]), torch.tensor([[3.0]])]
    assert l1_penalty(c).item() == pytest.approx(6.0 / 3)  # means over the 3 coefficients
    assert l2_penalty(c).item() == pytest.approx(14.0 / 3)
    assert l1_penalty(c, init).item() == pytest.approx(1.5 / 3)
    assert l2_penalty(c, init).item() == pytest.approx(1.25 / 3)


def _coefficients(widths: list[int], sources: int, seed: int) -> dict[str, torch.Tensor]:
    """Coefficients of a model with one module per width, each drawn around 1/N with the same spread."""
    gen = torch.Generator().manual_seed(seed)
    return {
        f"m{i}": 1 / sources + 0.05 * torch.randn(sources, w, generator=gen, dtype=torch.float64)
        for i, w in enumerate(widths)
    }


def test_the_same_weights_pull_a_small_and_a_larger_model_alike():
    """Coefficients spread alike on a 2-layer width-32 model and a 6-layer width-256 one (18x the coefficients):
    each regulariser, like the token-mean KL, takes the same value on both, so one weight gives the same pull
    relative to the KL. Tolerance 5%: the values are means of thousands of i.i.d. draws (spread about 1-2%)."""
    small = _coefficients([32] * (2 * 9 + 3), 3, seed=0)
    large = _coefficients([256] * (6 * 9 + 3), 3, seed=1)
    for name in ("similarity", "l1", "l2"):
        weights = {name: 1.0}
        a = coefficient_losses(small, **weights)[name].item()
        b = coefficient_losses(large, **weights)[name].item()
        assert b == pytest.approx(a, rel=0.05), name
    # the mean over more coefficients spreads the pull over them: the per-coefficient gradient is w / count
    c = {k: v.clone().requires_grad_() for k, v in small.items()}
    coefficient_losses(c, l1=1.0)["l1"].backward()
    count = sum(v.numel() for v in small.values())
    assert all(torch.allclose(v.grad.abs(), torch.full_like(v, 1 / count)) for v in c.values())


def test_coefficient_losses_weights_and_zero_disables():
    c = {"a": torch.tensor([[1.0, 2.0], [2.0, 1.0]], requires_grad=True)}
    init = {"a": torch.full((2, 2), 0.5)}
    assert coefficient_losses(c) == {}
    terms = coefficient_losses(c, similarity=0.1, l1=0.01, l2=0.001, init=init)
    assert set(terms) == {"similarity", "l1", "l2"}
    assert terms["similarity"].item() == pytest.approx(0.1 * 0.8, rel=1e-5)
    assert terms["l1"].item() == pytest.approx(0.01 * 4.0 / 4)
    assert terms["l2"].item() == pytest.approx(0.001 * 5.0 / 4)
    assert set(coefficient_losses(c, l2=1.0)) == {"l2"}
    sum(terms.values()).backward()
    assert c["a"].grad is not None
    with pytest.raises(ValueError, match="keys"):
        coefficient_losses(c, l1=1.0, init={"b": torch.zeros(2, 2)})


def test_prediction_entropy_bounds_mask_and_gradient() -> None:
    v = 7
    uniform = torch.zeros(2, 3, v)
    assert float(prediction_entropy(uniform)) == pytest.approx(math.log(v))  # the maximum, log V
    peaked = torch.full((2, 3, v), -1e4)
    peaked[..., 0] = 0
    assert float(prediction_entropy(peaked)) == pytest.approx(0.0, abs=1e-6)
    logits = torch.randn(2, 3, v, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    p = torch.softmax(logits, -1)
    per_token = -(p * p.log()).sum(-1)
    expected = (per_token * mask).sum() / mask.sum()
    # float32 arithmetic inside (as for every loss here) against a float64 reference: float32 rounding
    torch.testing.assert_close(prediction_entropy(logits, mask).double(), expected, rtol=1e-6, atol=1e-6)


def _student_grad(loss_fn, student: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    s = student.clone().requires_grad_()
    value = loss_fn(s)
    value.backward()
    return value.detach(), s.grad


def test_mean_of_teacher_kls_is_the_kl_to_the_mean_teacher_distribution():
    # pairing "all": mean_s KL(p_s || q) = KL(pbar || q) + mean_s KL(p_s || pbar); same value, same student gradient
    student, mask = _logits(10), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    teachers = [_logits(11 + k) for k in range(3)]
    per_teacher, g_per_teacher = _student_grad(
        lambda s: sum(kl_divergence(s, t, mask, temperature=2.0) for t in teachers) / 3, student
    )
    parts = [teacher_distribution(t, temperature=2.0) for t in teachers]
    log_mean = (sum(log_p.exp() for log_p, _ in parts) / 3).log()
    spread = teacher_spread(log_mean, sum(h for _, h in parts) / 3)
    assert spread.min() > 0  # the teachers differ: mean_s KL(p_s || pbar) > 0
    pooled, g_pooled = _student_grad(lambda s: distribution_kl(s, log_mean, spread, mask, temperature=2.0), student)
    # float32 sums over 11 classes in two different orders: a few ulps of values of order 1
    torch.testing.assert_close(pooled, per_teacher, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_pooled, g_per_teacher, rtol=1e-5, atol=1e-7)
    assert g_pooled.abs().max() > 1e-3  # a real gradient
    assert g_pooled[0, 3:].abs().max() == 0  # masked tokens get none


def test_topk_over_several_teachers_is_the_mean_of_their_kls_with_the_same_gradient():
    student, mask = _logits(20), torch.tensor([[1, 1, 0, 1, 1], [1, 1, 1, 1, 0]])
    tops = [_logits(21 + k).topk(4, dim=-1) for k in range(3)]
    per_teacher, g_per_teacher = _student_grad(
        lambda s: sum(topk_kl_divergence(s, t.values, t.indices, mask, temperature=2.0) for t in tops) / 3, student
    )
    values = torch.stack([t.values for t in tops], dim=-2)  # (B, T, S, K)
    indices = torch.stack([t.indices for t in tops], dim=-2)
    pooled, g_pooled = _student_grad(lambda s: topk_kl_divergence(s, values, indices, mask, temperature=2.0), student)
    # the same terms summed in another order (S*K at once instead of K per teacher): float32 rounding only
    torch.testing.assert_close(pooled, per_teacher, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_pooled, g_per_teacher, rtol=1e-5, atol=1e-7)
    assert g_pooled.abs().max() > 1e-3


def reference_distribution_kl(s, log_mean, spread, mask, temperature):
    """distribution_kl as plain autograd over the whole (..., V) tensors (the code before chunking)."""
    log_q = torch.log_softmax(s.float() / temperature, dim=-1)
    kl = torch.nn.functional.kl_div(log_q, log_mean, reduction="none", log_target=True).sum(-1)
    return temperature**2 * ((spread + kl) * mask).sum() / mask.sum()


def reference_topk_kl(s, values, indices, mask, temperature):
    """topk_kl_divergence as plain autograd over the whole tensors (the code before chunking)."""
    lead, slots = s.shape[:-1], values.shape[-2]
    log_p = torch.log_softmax(values.float() / temperature, dim=-1).reshape(*lead, -1)
    scaled = s.float() / temperature
    log_q = scaled.gather(-1, indices.reshape(*lead, -1)) - torch.logsumexp(scaled, dim=-1, keepdim=True)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1) / slots
    return temperature**2 * (kl * mask).sum() / mask.sum()


def reference_entropy(s, mask):
    """prediction_entropy as plain autograd over the whole (..., V) tensor (the code before chunking)."""
    log_p = torch.log_softmax(s.float(), dim=-1)
    return (-(log_p.exp() * log_p).sum(-1) * mask).sum() / mask.sum()


@pytest.mark.parametrize("rows", [3, 4, 100])  # 3 and 4 split 10 tokens unevenly and evenly; 100: one chunk
def test_chunked_kl_equals_autograd_over_whole_tensors(monkeypatch: pytest.MonkeyPatch, rows: int) -> None:
    import dam.adaptive.losses as losses

    monkeypatch.setattr(losses, "CHUNK_ELEMENTS", rows * 11)  # rows tokens of the vocabulary of 11 per chunk
    monkeypatch.setattr(losses, "MIN_CHUNK_ROWS", 1)
    student, mask = _logits(30), torch.tensor([[1, 1, 0, 1, 1], [1, 1, 1, 1, 0]])
    parts = [teacher_distribution(_logits(31 + k), temperature=2.0) for k in range(3)]
    log_mean = (sum(log_p.exp() for log_p, _ in parts) / 3).log()
    spread = teacher_spread(log_mean, sum(h for _, h in parts) / 3)
    tops = [_logits(41 + k).topk(4, dim=-1) for k in range(3)]
    values, indices = torch.stack([t.values for t in tops], dim=-2), torch.stack([t.indices for t in tops], dim=-2)
    cases = [
        (
            lambda s: distribution_kl(s, log_mean, spread, mask, 2.0),
            lambda s: reference_distribution_kl(s, log_mean, spread, mask, 2.0),
        ),
        (
            lambda s: topk_kl_divergence(s, values, indices, mask, 2.0),
            lambda s: reference_topk_kl(s, values, indices, mask, 2.0),
        ),
    ]
    cases.append((lambda s: prediction_entropy(s, mask), lambda s: reference_entropy(s, mask)))
    overwriting = [  # the gradient written into the logits' storage: logits of a forward (here s * 1), not a leaf
        (lambda s: distribution_kl(s * 1, log_mean, spread, mask, 2.0, overwrite_logits=True), cases[0][1]),
        (lambda s: topk_kl_divergence(s * 1, values, indices, mask, 2.0, overwrite_logits=True), cases[1][1]),
    ]
    for chunked, reference in cases + overwriting:
        got, g_got = _student_grad(chunked, student)
        want, g_want = _student_grad(reference, student)
        # the value: the same float32 terms summed per chunk, then over chunks (a few ulps of a value of order 1);
        # the gradient: the same per-token operations as autograd over the whole tensors, so bit for bit
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        assert torch.equal(g_got, g_want)
        assert g_got.abs().max() > 1e-3 and g_got[0, 2].abs().max() == 0  # a real gradient; none on masked tokens


def test_teacher_mixture_is_the_mean_distribution_and_its_spread() -> None:
    teachers = [_logits(51 + k) for k in range(3)]
    log_mean, spread = teacher_mixture(teachers, temperature=2.0)
    probs = [torch.softmax(t.double() / 2.0, dim=-1) for t in teachers]
    mean = sum(probs) / 3
    spreads = sum((p * (p.log() - mean.log())).sum(-1) for p in probs) / 3  # mean_s KL(p_s || pbar)
    # float32 against float64 sums of 11 terms of order 1: a few ulps of float32
    torch.testing.assert_close(log_mean.double(), mean.log(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(spread.double(), spreads, rtol=1e-4, atol=1e-6)
    one, none = teacher_mixture([teachers[0]], temperature=2.0)
    assert torch.equal(one, teacher_distribution(teachers[0], 2.0)[0]) and not none.any()
