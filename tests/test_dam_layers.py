"""DAM modules: folding, transforms, custom autograd, granularities, memory, teacher mode, dtypes, state dicts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from dam.adaptive.layers import (
    TRANSFORMS,
    DAMEmbedding,
    DAMLinear,
    DAMNorm,
    _DAMEmbeddingFunction,
    _DAMLinearFunction,
    _DAMLinearLossFunction,
    _merged_weight,
    apply_transform,
    fold,
    inverse_transform,
    merge,
    row_count,
    transform_coefficients,
)

N, OUT, IN = 3, 6, 5


def _linear(dtype=torch.float32, coef_dtype=torch.float32, bias=True, seed=0, trainable=True) -> DAMLinear:
    g = torch.Generator().manual_seed(seed)
    ws = torch.randn(N, OUT, IN, generator=g).to(dtype)
    wc = torch.rand(N, IN, generator=g, dtype=coef_dtype) + 0.1
    bs = torch.randn(N, OUT, generator=g).to(dtype) if bias else None
    bc = torch.rand(N, OUT, generator=g, dtype=coef_dtype) if bias else None
    lin = DAMLinear(ws, nn.Parameter(wc, requires_grad=trainable), bs, bc)
    return lin


def test_fold_is_the_weighted_sum_with_broadcasting():
    s = torch.randn(N, 4, 7)
    cols = torch.randn(N, 7)
    expected = sum(s[i] * cols[i][None, :] for i in range(N))
    torch.testing.assert_close(fold(s, cols), expected)
    scal = torch.randn(N, 1)
    torch.testing.assert_close(fold(s, scal), sum(s[i] * scal[i] for i in range(N)))
    assert fold(s.to(torch.bfloat16), cols).dtype == torch.float32  # accumulates in the coefficients' dtype
    with pytest.raises(ValueError, match="2 source tensors for 3"):
        fold(iter([s[0], s[1]]), cols)


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_inverse_transform_round_trips(transform):
    # columns sum to 1 (softmax), and each is a base (row 0) at 1 - the lambdas of the others, in [0, 1] (task_vector)
    c = torch.tensor([[0.2, 0.5], [0.3, 0.1], [0.5, 0.4]], dtype=torch.float64)
    base = 0 if transform == "task_vector" else None
    torch.testing.assert_close(apply_transform(inverse_transform(c, transform, base), transform, base), c)


@pytest.mark.parametrize(
    ("transform", "bad"), [("tanh", [[1.0], [0.5]]), ("sigmoid", [[0.0], [0.5]]), ("softmax", [[0.7], [0.7]])]
)
def test_inverse_transform_rejects_unreachable_coefficients(transform, bad):
    with pytest.raises(ValueError, match=transform):
        inverse_transform(torch.tensor(bad), transform)


def test_uniform_linear_is_the_average_layer():
    ws, bs = torch.randn(N, OUT, IN), torch.randn(N, OUT)
    lin = DAMLinear(ws, torch.full((N, IN), 1 / N), bs, torch.full((N, OUT), 1 / N))
    x = torch.randn(2, 4, IN)
    torch.testing.assert_close(lin(x), F.linear(x, ws.mean(0), bs.mean(0)))


def test_linear_custom_autograd_passes_gradcheck_float64():
    ws = torch.randn(N, OUT, IN, dtype=torch.float64)
    x = torch.randn(2, 3, IN, dtype=torch.float64, requires_grad=True)
    c = torch.randn(N, IN, dtype=torch.float64, requires_grad=True)
    b = torch.randn(OUT, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, c, b: _DAMLinearFunction.apply(x, ws, c, b), (x, c, b))


def test_linear_gradients_equal_autograd_through_the_materialised_weight():
    lin = _linear(dtype=torch.float64, coef_dtype=torch.float64)
    x = torch.randn(4, IN, dtype=torch.float64, requires_grad=True)
    gy = torch.randn(4, OUT, dtype=torch.float64)
    (lin(x) * gy).sum().backward()
    got = (x.grad, lin.weight_coefficients.grad, lin.bias_coefficients.grad)

    x2 = x.detach().clone().requires_grad_()
    wc = lin.weight_coefficients.detach().clone().requires_grad_()
    bc = lin.bias_coefficients.detach().clone().requires_grad_()
    w = (lin.weight_sources * wc[:, None, :]).sum(0)  # explicit merged weight (out, in)
    b = (lin.bias_sources * bc).sum(0)
    (F.linear(x2, w, b) * gy).sum().backward()
    for a, e in zip(got, (x2.grad, wc.grad, bc.grad), strict=True):
        torch.testing.assert_close(a, e)


def test_only_coefficients_get_gradients():
    lin = _linear()
    lin(torch.randn(3, IN)).sum().backward()
    assert lin.weight_sources.grad is None and lin.bias_sources.grad is None
    assert not lin.weight_sources.requires_grad
    assert lin.weight_coefficients.grad is not None and lin.bias_coefficients.grad is not None
    assert {n for n, p in lin.named_parameters() if p.requires_grad} == {"weight_coefficients", "bias_coefficients"}


def test_frozen_coefficients_skip_the_weight_gradient():
    lin = _linear(trainable=False, bias=False)
    x = torch.randn(3, IN, requires_grad=True)
    lin(x).sum().backward()
    assert x.grad is not None and lin.weight_coefficients.grad is None


def test_bf16_sources_keep_fp32_coefficients_and_grads():
    lin = _linear(dtype=torch.bfloat16)
    x = torch.randn(2, 3, IN, dtype=torch.bfloat16)
    y = lin(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    for p in (lin.weight_coefficients, lin.bias_coefficients):
        assert p.dtype == torch.float32 and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
    ref = _linear(dtype=torch.float32)  # same seed: the fp32 version of the same layer
    ref(x.float()).sum().backward()
    torch.testing.assert_close(lin.weight_coefficients.grad, ref.weight_coefficients.grad, rtol=0.05, atol=0.05)


def test_autocast_bf16_computes_in_bf16_with_fp32_coefficient_grads():
    lin = _linear()
    x = torch.randn(2, 3, IN)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lin(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert lin.weight_coefficients.grad.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.linear(x, lin.merged("weight"), lin.merged("bias"))
    torch.testing.assert_close(y.detach(), ref)


def test_merged_weight_is_not_saved_for_backward():
    out, inp, n = 64, 48, 3
    lin = DAMLinear(
        torch.randn(n, out, inp), torch.full((n, inp), 1 / n), torch.randn(n, out), torch.full((n, out), 1 / n)
    )
    x = torch.randn(2, 8, inp)
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lin(x).sum().backward()
    sources = {lin.weight_sources.untyped_storage().data_ptr(), lin.bias_sources.untyped_storage().data_ptr()}
    extra = [t for t in saved if t.untyped_storage().data_ptr() not in sources]
    extra_bytes = sum(t.numel() * t.element_size() for t in extra)
    layer_bytes = out * inp * 4
    assert all(t.numel() < out * inp for t in extra), [tuple(t.shape) for t in extra]
    assert extra_bytes <= x.numel() * 4 + 4 * n * (inp + out), extra_bytes  # the input and the coefficients only
    assert extra_bytes < layer_bytes


def test_selected_source_is_exactly_that_layer():
    lin = _linear()
    x = torch.randn(2, IN)
    for k in range(N):
        lin.selected = k
        assert torch.equal(lin(x), F.linear(x, lin.weight_sources[k], lin.bias_sources[k]))
    lin.selected = None


def test_embedding_gathers_the_merged_table_and_passes_gradcheck():
    vocab, hidden = 11, 4
    ws = torch.randn(N, vocab, hidden, dtype=torch.float64)
    c = torch.rand(N, hidden, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, vocab, (2, 5))
    emb = DAMEmbedding(ws, nn.Parameter(c.detach().clone()))
    torch.testing.assert_close(emb(ids), F.embedding(ids, (ws * c[:, None, :]).sum(0)))
    assert torch.autograd.gradcheck(lambda c: _DAMEmbeddingFunction.apply(ids, ws, c), (c,))
    emb.selected = 1
    assert torch.equal(emb(ids), F.embedding(ids, ws[1]))


@pytest.mark.parametrize("kind", ["rms", "layernorm"])
def test_norm_runs_the_original_forward_with_the_merged_weight(kind):
    hidden = 8
    ref = LlamaRMSNorm(hidden, eps=1e-5) if kind == "rms" else nn.LayerNorm(hidden)
    norm = LlamaRMSNorm(hidden, eps=1e-5) if kind == "rms" else nn.LayerNorm(hidden)
    for name in [n for n, _ in norm.named_parameters()]:
        delattr(norm, name)
    ws = 1 + 0.1 * torch.randn(N, hidden)
    c = torch.rand(N, hidden)
    bias = kind == "layernorm"
    bs, bc = (torch.randn(N, hidden), torch.rand(N, hidden)) if bias else (None, None)
    dam = DAMNorm(norm, ws, nn.Parameter(c.clone()), bs, None if bc is None else nn.Parameter(bc.clone()))
    with torch.no_grad():
        ref.weight.copy_((ws * c).sum(0))
        if bias:
            ref.bias.copy_((bs * bc).sum(0))
    x = torch.randn(2, 3, hidden)
    torch.testing.assert_close(dam(x), ref(x))
    dam(x).pow(2).sum().backward()
    assert dam.weight_coefficients.grad is not None and dam.weight_coefficients.grad.abs().sum() > 0
    dam.selected = 2
    with torch.no_grad():
        ref.weight.copy_(ws[2])
        if bias:
            ref.bias.copy_(bs[2])
    assert torch.equal(dam(x), ref(x))


def test_state_dict_holds_coefficients_only_and_loads_strictly():
    lin = _linear()
    sd = lin.state_dict()
    assert set(sd) == {"weight_coefficients", "bias_coefficients"}
    other = _linear(seed=1)
    other.load_state_dict(sd)  # strict: the sources are not required
    assert torch.equal(other.weight_coefficients, lin.weight_coefficients)
    assert not torch.equal(other.weight_sources, lin.weight_sources)  # sources untouched


def test_constructor_rejects_bad_shapes_and_low_precision_coefficients():
    with pytest.raises(ValueError, match="coefficients"):
        DAMLinear(torch.randn(N, OUT, IN), torch.zeros(N, OUT))
    with pytest.raises(ValueError, match="float32 or float64"):
        DAMLinear(torch.randn(N, OUT, IN), torch.zeros(N, IN, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="same"):
        DAMLinear(torch.randn(N, OUT, IN), torch.zeros(N + 1, IN))


# ----------------------------------------------------------------------------------- granularity (dam.granularity)

# coefficient width per granularity for a (OUT, IN) weight: column (IN), row_column (OUT + IN), tensor (1)
WIDTHS = {"column": IN, "row_column": OUT + IN, "tensor": 1}


def _explicit_weight(ws: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``sum_i diag(r_i) W_i diag(c_i)`` written out with broadcasting, for sources (N, out, in)."""
    out = ws.shape[1]
    if c.shape[1] == out + ws.shape[2]:
        return (c[:, :out, None] * ws * c[:, None, out:]).sum(0)
    return (ws * c[:, None, :]).sum(0)


@pytest.mark.parametrize("granularity", list(WIDTHS))
def test_linear_granularity_passes_gradcheck_float64(granularity):
    ws = torch.randn(N, OUT, IN, dtype=torch.float64)
    x = torch.randn(2, 3, IN, dtype=torch.float64, requires_grad=True)
    c = torch.randn(N, WIDTHS[granularity], dtype=torch.float64, requires_grad=True)
    b = torch.randn(OUT, dtype=torch.float64, requires_grad=True)
    assert row_count(ws.shape, c.shape) == (OUT if granularity == "row_column" else 0)
    torch.testing.assert_close(_DAMLinearFunction.apply(x, ws, c, b), F.linear(x, _explicit_weight(ws, c), b))
    assert torch.autograd.gradcheck(lambda x, c, b: _DAMLinearFunction.apply(x, ws, c, b), (x, c, b))


@pytest.mark.parametrize("granularity", list(WIDTHS))
def test_linear_fused_with_a_chunked_loss_passes_gradcheck_float64(granularity):
    """``_DAMLinearLossFunction`` (the lm_head fused with the loss, 2 rows a chunk over 7 rows: uneven chunks)
    equals the loss of the whole output and passes gradcheck for x, the coefficients and the bias."""
    ws = torch.randn(N, OUT, IN, dtype=torch.float64)
    x = torch.randn(7, IN, dtype=torch.float64, requires_grad=True)
    c = torch.randn(N, WIDTHS[granularity], dtype=torch.float64, requires_grad=True)
    b = torch.randn(OUT, dtype=torch.float64, requires_grad=True)
    target = torch.log_softmax(torch.randn(7, OUT, dtype=torch.float64), dim=-1)
    weights = torch.rand(7, dtype=torch.float64)

    def chunk_loss(out: torch.Tensor, rows: slice) -> torch.Tensor:  # a KL per row, weighted: not linear in out
        kl = F.kl_div(torch.log_softmax(out, dim=-1), target[rows], reduction="none", log_target=True).sum(-1)
        return (kl * weights[rows]).sum()

    whole = chunk_loss(F.linear(x, _explicit_weight(ws, c), b), slice(None))
    torch.testing.assert_close(_DAMLinearLossFunction.apply(x, ws, c, b, chunk_loss, 2), whole)
    assert torch.autograd.gradcheck(
        lambda x, c, b: _DAMLinearLossFunction.apply(x, ws, c, b, chunk_loss, 2), (x, c, b)
    )


@pytest.mark.parametrize("granularity", list(WIDTHS))
def test_coefficient_gradients_are_exact_over_row_chunks(granularity, monkeypatch):
    """The chunked reduction (here 2 rows a chunk, 3 chunks) gives autograd's gradients through the explicit
    weight."""
    monkeypatch.setattr("dam.adaptive.layers._CHUNK_ELEMENTS", 2 * IN)
    ws = torch.randn(N, OUT, IN, dtype=torch.float64)
    c = torch.randn(N, WIDTHS[granularity], dtype=torch.float64, requires_grad=True)
    x, gy = torch.randn(4, IN, dtype=torch.float64), torch.randn(4, OUT, dtype=torch.float64)
    (_DAMLinearFunction.apply(x, ws, c, None) * gy).sum().backward()
    c2 = c.detach().clone().requires_grad_()
    (F.linear(x, _explicit_weight(ws, c2)) * gy).sum().backward()
    torch.testing.assert_close(c.grad, c2.grad)


@pytest.mark.parametrize("source_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("granularity", list(WIDTHS))
def test_chunked_fold_has_the_bits_of_the_whole_merge(granularity, source_dtype, monkeypatch):
    """The linear functions' weight, folded a few rows at a time (here 3 rows a chunk, the last one short), is
    ``merge`` of the whole tensor rounded to the sources' dtype, bit for bit, in every compute dtype."""
    monkeypatch.setattr("dam.adaptive.layers._CHUNK_ELEMENTS", 3 * IN)
    ws = torch.randn(N, OUT + 1, IN, dtype=torch.float32).to(source_dtype)  # 7 rows: chunks of 3, 3, 1
    c = torch.randn(N, WIDTHS[granularity] + (1 if granularity == "row_column" else 0), dtype=torch.float32)
    whole = merge(ws, c, row_count(ws.shape, c.shape)).to(source_dtype)
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(_merged_weight(ws, c, dtype), whole.to(dtype))


@pytest.mark.parametrize("granularity", list(WIDTHS))
def test_embedding_granularity_passes_gradcheck_and_matches_the_merged_table(granularity):
    vocab, hidden = 11, 4
    width = {"column": hidden, "row_column": vocab + hidden, "tensor": 1}[granularity]
    ws = torch.randn(N, vocab, hidden, dtype=torch.float64)
    c = torch.rand(N, width, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([[0, 3, 3, 10, 5], [5, 5, 1, 0, 3]])  # repeated ids: the row gradients sum over them
    emb = DAMEmbedding(ws, nn.Parameter(c.detach().clone()))
    table = _explicit_weight(ws, c.detach())
    torch.testing.assert_close(emb(ids), F.embedding(ids, table))
    torch.testing.assert_close(emb.merged("weight"), table)
    assert torch.autograd.gradcheck(lambda c: _DAMEmbeddingFunction.apply(ids, ws, c), (c,))


@pytest.mark.parametrize("granularity", list(WIDTHS))
def test_granularity_transforms_spare_the_row_scales(granularity):
    lin = DAMLinear(torch.randn(N, OUT, IN), nn.Parameter(torch.rand(N, WIDTHS[granularity])), transform="sigmoid")
    rows = lin.rows()
    raw = lin.weight_coefficients.detach()
    expected = torch.cat([raw[:, :rows], torch.sigmoid(raw[:, rows:])], dim=1)
    torch.testing.assert_close(lin.coefficients(), expected)
    torch.testing.assert_close(lin.merged("weight"), _explicit_weight(lin.weight_sources, expected))
    x = torch.randn(3, IN)
    torch.testing.assert_close(lin(x), F.linear(x, lin.merged("weight")))
    assert transform_coefficients(raw, "sigmoid", rows).shape == raw.shape


def test_tensor_granularity_norm_scales_the_whole_vector():
    hidden = 8
    norm = LlamaRMSNorm(hidden, eps=1e-5)
    ref = LlamaRMSNorm(hidden, eps=1e-5)
    del norm.weight
    ws, c = 1 + 0.1 * torch.randn(N, hidden), torch.rand(N, 1)
    dam = DAMNorm(norm, ws, nn.Parameter(c.clone()))
    with torch.no_grad():
        ref.weight.copy_((ws * c).sum(0))
    x = torch.randn(2, 3, hidden)
    torch.testing.assert_close(dam(x), ref(x))
    dam(x).pow(2).sum().backward()
    assert dam.weight_coefficients.grad.shape == (N, 1)
