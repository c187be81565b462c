"""AdaMerging's task-vector form (``dam.transform: task_vector``): ``W = W_base + sum_k lambda_k (W_k - W_base)``
with the base one of the sources at the derived coefficient ``1 - sum_k lambda_k`` and every lambda clamped to
[0, 1]; its weights, gradients, init and refusals on a tiny Qwen2 family (q/k/v biases)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from dam.adaptive.layers import task_vector_coefficients
from dam.adaptive.model import DAMModel
from dam.adaptive.options import DAMOptions
from dam.errors import DamError
from dam.testing import make_family

IDS = torch.tensor([[5, 17, 30, 2, 44, 9, 61, 8], [70, 3, 12, 99, 21, 1, 0, 0]])
MASK = torch.tensor([[1] * 8, [1] * 6 + [0] * 2])
BASE = 1  # the base's place among the sources: not first, so that no code may assume index 0


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """(base, sources): three fine-tunes of a tiny Qwen2 with the base itself inserted at index ``BASE``."""
    base, experts = make_family(tmp_path_factory.mktemp("family"), 3, arch="qwen2", seed=3)
    return base, [experts[0], base, *experts[1:]]


def _build(family: tuple[Path, list[Path]], dtype: torch.dtype = torch.float32, **options) -> DAMModel:
    base, sources = family
    opts = DAMOptions(transform="task_vector", **options)
    return DAMModel.from_pretrained(str(base), [str(s) for s in sources], opts, dtype=dtype)


def _set_raw(model: DAMModel, low: float, high: float, seed: int = 0) -> None:
    """Every raw coefficient (frozen ones too) uniform in [low, high); the base's row stays as it is."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module, attr, _ in model.merged_tensors.values():
            raw = getattr(module, f"{attr}_coefficients")
            values = low + (high - low) * torch.rand(raw.shape, generator=g, dtype=raw.dtype)
            values[BASE] = raw[BASE]
            raw.copy_(values)


def _loss(logits: torch.Tensor) -> torch.Tensor:
    """A scalar that depends on every logit differently: a fixed random projection of the log-probabilities."""
    g = torch.Generator().manual_seed(7)
    weights = torch.randn(logits.shape, generator=g, dtype=logits.dtype)
    return (logits.log_softmax(-1) * weights * MASK[..., None]).sum()


@pytest.mark.parametrize("granularity", ["tensor", "column"])
def test_merged_weights_are_the_base_plus_lambda_times_the_task_vectors(family, granularity) -> None:
    model = _build(family, granularity=granularity, coefficient_dtype="float64")
    _set_raw(model, 0.0, 1.0)
    states = [load_file(str(s / "model.safetensors")) for s in family[1]]
    experts = [k for k in range(len(states)) if k != BASE]
    for name, (module, attr, _) in model.merged_tensors.items():
        raw = getattr(module, f"{attr}_coefficients").detach()  # (N, C); the lambdas are raw: all in [0, 1]
        theta0 = states[BASE][name].double()
        expected = theta0 + sum(raw[k] * (states[k][name].double() - theta0) for k in experts)
        # both sides are float64 sums (over the sources vs over the task vectors) rounded once to float32: their
        # float64 values differ by ~1e-16 relative, so the roundings land at most one float32 ulp (2^-23
        # relative) apart; atol covers results that cancel to ~0
        torch.testing.assert_close(module.merged(attr), expected.float(), rtol=2**-23, atol=1e-12)


def test_base_coefficient_is_derived_and_gets_no_gradient(family) -> None:
    model = _build(family, granularity="tensor")
    _set_raw(model, 0.05, 0.4)
    params = model.trainable_coefficients()
    assert all(float(p.detach()[BASE].abs().max()) == 0 for p in params), "the base's raw row starts at 0"
    optimizer = torch.optim.AdamW(params, lr=0.05, weight_decay=0.1)
    for _ in range(2):
        optimizer.zero_grad()
        _loss(model(input_ids=IDS, attention_mask=MASK).logits).backward()
        assert all(p.grad is not None and torch.equal(p.grad[BASE], torch.zeros_like(p[BASE])) for p in params)
        assert any(float(p.grad.abs().max()) > 0 for p in params)
        optimizer.step()
    for name, c in model.coefficients().items():
        raw = model.merged_tensors[name][0].weight_coefficients if name.endswith(".weight") else None
        lambdas = torch.cat([c[:BASE], c[BASE + 1 :]])
        assert torch.equal(c[BASE], 1 - lambdas.sum(0)), name  # the same float32 expression: equal bit for bit
        if raw is not None:
            assert float(raw.detach()[BASE].abs().max()) == 0, name  # zero gradient, zero moments, decay of 0: still 0


def test_lambdas_outside_the_unit_interval_are_clamped_in_the_forward(family) -> None:
    outside, inside = _build(family), _build(family)
    with torch.no_grad():
        for (m_out, attr, _), (m_in, _, _) in zip(
            outside.merged_tensors.values(), inside.merged_tensors.values(), strict=True
        ):
            raw_out, raw_in = getattr(m_out, f"{attr}_coefficients"), getattr(m_in, f"{attr}_coefficients")
            raw_out[0], raw_in[0] = 1.7, 1.0  # above 1: clamped to 1
            raw_out[2], raw_in[2] = -0.4, 0.0  # below 0: clamped to 0
    coefficients = outside.coefficients(trainable_only=False)
    for name, c in inside.coefficients(trainable_only=False).items():
        assert torch.equal(coefficients[name], c), name
        assert torch.equal(c[BASE], 1 - (c[0] + c[2] + c[3])), name  # the base: 1 - (1 + 0 + 0.3) = -0.3
    logits = outside(input_ids=IDS, attention_mask=MASK).logits
    torch.testing.assert_close(logits, inside(input_ids=IDS, attention_mask=MASK).logits, rtol=0, atol=0)
    _loss(logits).backward()
    for p in outside.trainable_coefficients():
        assert float(p.grad[0].abs().max()) == 0 and float(p.grad[2].abs().max()) == 0  # clamped: no gradient
        assert float(p.grad[3].abs().max()) > 0


@pytest.mark.parametrize("granularity", ["tensor", "column"])
def test_coefficient_gradient_equals_autograd_on_a_dense_reference(family, granularity) -> None:
    """The wrapper (custom backward of DAMLinear/DAMEmbedding through the derived base coefficient) against plain
    autograd through ``theta_0 + sum_k clamp(lambda_k, 0, 1) tau_k`` put into the stock model, in float64."""
    model = _build(family, torch.float64, granularity=granularity, coefficient_dtype="float64")
    _set_raw(model, -0.2, 1.2, seed=1)  # some lambdas clamped at each end: their gradient is 0 on both sides
    _loss(model(input_ids=IDS, attention_mask=MASK).logits).backward()

    states = [load_file(str(s / "model.safetensors")) for s in family[1]]
    reference = AutoModelForCausalLM.from_pretrained(family[0], dtype=torch.float64).eval()
    lambdas = {
        name: getattr(m, f"{attr}_coefficients").detach().clone().requires_grad_()
        for name, (m, attr, _) in model.merged_tensors.items()
    }
    weights = {}
    for name, raw in lambdas.items():
        theta0 = states[BASE][name].double()
        shape = (-1, *raw.shape[1:]) if raw.shape[1] == theta0.shape[-1] else (-1,)  # per column or one scalar
        task_vectors = [
            raw[k].clamp(0, 1).reshape(shape) * (states[k][name].double() - theta0)
            for k in range(len(states))
            if k != BASE
        ]
        weights[name] = theta0 + sum(task_vectors)
    logits = torch.func.functional_call(reference, weights, (), {"input_ids": IDS, "attention_mask": MASK}).logits
    _loss(logits).backward()
    clamped = 0
    for name, (m, attr, _) in model.merged_tensors.items():
        got, want = getattr(m, f"{attr}_coefficients").grad, lambdas[name].grad
        # float64 on both sides, different summation orders: agreement to ~1e-13; 1e-9 leaves margin and is far
        # below any real error (a missing base term changes the gradients at O(1) relative)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
        clamped += int((want == 0).sum()) - want[BASE].numel()
    assert clamped > 0, "some lambdas outside [0, 1] have zero gradient"


def test_init_is_lambda_for_every_task_vector(family) -> None:
    assert _build(family).init_weights == pytest.approx([0.3, 0.1, 0.3, 0.3])  # the paper's 0.3 by default
    model = _build(family, init=0.2)
    assert model.init_weights == pytest.approx([0.2, 0.4, 0.2, 0.2])
    for name, c in model.coefficients(trainable_only=False).items():
        torch.testing.assert_close(c, model.initial_coefficients(trainable_only=False)[name])
    base, sources = family
    plain = DAMModel.from_pretrained(str(base), [str(s) for s in sources], DAMOptions(init=0.5))  # transform none
    assert plain.init_weights == pytest.approx([0.5, -0.5, 0.5, 0.5])  # task arithmetic, lambda 0.5


def test_task_vector_refusals_name_the_key(family) -> None:
    base, sources = family
    experts = [str(s) for s in sources if s != base]
    with pytest.raises(DamError, match=r"^dam.transform: task_vector: the base model .* is not one of the sources"):
        DAMModel.from_pretrained(str(base), experts, DAMOptions(transform="task_vector"))
    with pytest.raises(DamError, match=r"^dam.init: 0.3: the base model .* is not one of the sources"):
        DAMModel.from_pretrained(str(base), experts, DAMOptions(init=0.3))
    with pytest.raises(ValidationError, match="dam.transform: task_vector .*dam.granularity: row_column"):
        DAMOptions(transform="task_vector", granularity="row_column")
    with pytest.raises(DamError, match=r"dam.init.*task_vector.*\[0, 1\]"):
        _build(family, init=[1.5, -0.5, 0.0, 0.0])  # a lambda above 1
    with pytest.raises(DamError, match=r"dam.init.*task_vector.*1 minus the sum"):
        _build(family, init=[0.2, 0.5, 0.2, 0.2])  # the base's share would be 1 - 0.6 = 0.4, not 0.5
    assert _build(family, init="uniform").init_weights == [0.25] * 4  # 1/N each is a task-vector form too


def test_task_vector_coefficients_formula() -> None:
    raw = torch.tensor([[0.2, 1.5], [9.0, 9.0], [-0.1, 0.3]])  # (N=3, C=2), base at index 1: its raw unread
    expected = torch.tensor([[0.2, 1.0], [0.8, -0.3], [0.0, 0.3]])
    torch.testing.assert_close(task_vector_coefficients(raw, 1), expected, rtol=0, atol=1e-7)  # 1 - 0.2 in float32
