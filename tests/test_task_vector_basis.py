"""``dam.basis: task_vectors`` (the base's coefficients scale its own weight, every other source's its task vector
``W_k - W_base``) and ``dam.train_base: false``: the layer math, gradients, init, export, analysis, refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from test_dam_layers import IN, OUT, WIDTHS, N, _explicit_weight  # the layer tests' shapes and reference fold
from torch import nn
from transformers import AutoModelForCausalLM

from dam.adaptive.layers import (
    DAMEmbedding,
    DAMLinear,
    _DAMEmbeddingFunction,
    _DAMLinearFunction,
    _DAMLinearLossFunction,
    _merged_weight,
    merge,
    row_count,
)
from dam.adaptive.model import DAMModel
from dam.adaptive.options import DAMOptions
from dam.errors import DamError
from dam.evaluation.analysis import load_coefficient_table, merge_shift
from dam.testing import make_family
from dam.training.config import load_config

BASE = 1  # the base's place among the sources: not first, so that no code may assume index 0
IDS = torch.tensor([[5, 17, 30, 2, 44, 9, 61, 8], [70, 3, 12, 99, 21, 1, 0, 0]])
MASK = torch.tensor([[1] * 8, [1] * 6 + [0] * 2])


def _basis(ws: torch.Tensor, base: int = BASE) -> torch.Tensor:
    """The sources as the coefficients see them: the base as it is, every other source minus the base."""
    out = ws.clone()
    for i in range(ws.shape[0]):
        if i != base:
            out[i] = ws[i] - ws[base]
    return out


@pytest.mark.parametrize("granularity", list(WIDTHS))
def test_linear_in_the_task_vector_basis_is_the_base_plus_weighted_task_vectors_and_passes_gradcheck(granularity):
    ws = torch.randn(N, OUT, IN, dtype=torch.float64)
    x = torch.randn(2, 3, IN, dtype=torch.float64, requires_grad=True)
    c = torch.randn(N, WIDTHS[granularity], dtype=torch.float64, requires_grad=True)
    b = torch.randn(OUT, dtype=torch.float64, requires_grad=True)
    expected = _explicit_weight(_basis(ws), c)
    assert not torch.allclose(expected, _explicit_weight(ws, c))  # the basis changes the merge
    torch.testing.assert_close(merge(ws, c, row_count(ws.shape, c.shape), BASE), expected)
    torch.testing.assert_close(_DAMLinearFunction.apply(x, ws, c, b, BASE), F.linear(x, expected, b))
    assert torch.autograd.gradcheck(lambda x, c, b: _DAMLinearFunction.apply(x, ws, c, b, BASE), (x, c, b))


@pytest.mark.parametrize("granularity", list(WIDTHS))
def test_fused_head_in_the_task_vector_basis_passes_gradcheck(granularity):
    ws = torch.randn(N, OUT, IN, dtype=torch.float64)
    x = torch.randn(7, IN, dtype=torch.float64, requires_grad=True)
    c = torch.randn(N, WIDTHS[granularity], dtype=torch.float64, requires_grad=True)
    target = torch.log_softmax(torch.randn(7, OUT, dtype=torch.float64), dim=-1)

    def chunk_loss(out: torch.Tensor, rows: slice) -> torch.Tensor:
        return F.kl_div(torch.log_softmax(out, dim=-1), target[rows], reduction="sum", log_target=True)

    whole = chunk_loss(F.linear(x, _explicit_weight(_basis(ws), c)), slice(None))
    torch.testing.assert_close(_DAMLinearLossFunction.apply(x, ws, c, None, chunk_loss, 2, BASE), whole)
    assert torch.autograd.gradcheck(
        lambda x, c: _DAMLinearLossFunction.apply(x, ws, c, None, chunk_loss, 2, BASE), (x, c)
    )


@pytest.mark.parametrize("granularity", list(WIDTHS))
def test_coefficient_gradients_in_the_task_vector_basis_are_exact_over_row_chunks(granularity, monkeypatch):
    """Gradients by the chunked reduction (2 rows a chunk) equal autograd's through the explicit weight: the
    base's coefficients see ``G * W_base``, every other source's ``G * (W_k - W_base)``."""
    monkeypatch.setattr("dam.adaptive.layers._CHUNK_ELEMENTS", 2 * IN)
    ws = torch.randn(N, OUT, IN, dtype=torch.float64)
    c = torch.randn(N, WIDTHS[granularity], dtype=torch.float64, requires_grad=True)
    x, gy = torch.randn(4, IN, dtype=torch.float64), torch.randn(4, OUT, dtype=torch.float64)
    (_DAMLinearFunction.apply(x, ws, c, None, BASE) * gy).sum().backward()
    c2 = c.detach().clone().requires_grad_()
    (F.linear(x, _explicit_weight(_basis(ws), c2)) * gy).sum().backward()
    torch.testing.assert_close(c.grad, c2.grad)


@pytest.mark.parametrize("source_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("granularity", list(WIDTHS))
def test_chunked_fold_in_the_task_vector_basis_has_the_bits_of_the_whole_merge(granularity, source_dtype, monkeypatch):
    """What the layer computes with (3 rows a chunk) is ``merge`` of the whole tensor bit for bit: what the
    export writes. bf16 sources: the differences are taken in float32, exactly."""
    monkeypatch.setattr("dam.adaptive.layers._CHUNK_ELEMENTS", 3 * IN)
    ws = torch.randn(N, OUT + 1, IN, dtype=torch.float32).to(source_dtype)
    c = torch.randn(N, WIDTHS[granularity] + (1 if granularity == "row_column" else 0), dtype=torch.float32)
    whole = merge(ws, c, row_count(ws.shape, c.shape), BASE).to(source_dtype)
    assert not torch.equal(whole, merge(ws, c, row_count(ws.shape, c.shape)).to(source_dtype))
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(_merged_weight(ws, c, dtype, BASE), whole.to(dtype))


@pytest.mark.parametrize("granularity", list(WIDTHS))
def test_embedding_in_the_task_vector_basis_matches_the_merged_table_and_passes_gradcheck(granularity):
    vocab, hidden = 11, 4
    width = {"column": hidden, "row_column": vocab + hidden, "tensor": 1}[granularity]
    ws = torch.randn(N, vocab, hidden, dtype=torch.float64)
    c = torch.rand(N, width, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([[0, 3, 3, 10, 5], [5, 5, 1, 0, 3]])
    emb = DAMEmbedding(ws, nn.Parameter(c.detach().clone()), base=BASE, basis="task_vectors")
    table = _explicit_weight(_basis(ws), c.detach())
    torch.testing.assert_close(emb(ids), F.embedding(ids, table))
    torch.testing.assert_close(emb.merged("weight"), table)
    assert torch.autograd.gradcheck(lambda c: _DAMEmbeddingFunction.apply(ids, ws, c, BASE), (c,))


def test_linear_module_bias_and_teacher_mode_in_the_task_vector_basis():
    ws, bs = torch.randn(N, OUT, IN, dtype=torch.float64), torch.randn(N, OUT, dtype=torch.float64)
    wc, bc = torch.rand(N, IN, dtype=torch.float64), torch.rand(N, OUT, dtype=torch.float64)
    lin = DAMLinear(ws, nn.Parameter(wc), bs, nn.Parameter(bc), base=BASE, basis="task_vectors")
    x = torch.randn(3, IN, dtype=torch.float64)
    bias = (_basis(bs) * bc).sum(0)
    torch.testing.assert_close(lin(x), F.linear(x, _explicit_weight(_basis(ws), wc), bias))
    torch.testing.assert_close(lin.merged("bias"), bias)
    lin.selected = 2  # a teacher is its own weights, whatever the basis
    assert torch.equal(lin(x), F.linear(x, ws[2], bs[2]))
    with pytest.raises(ValueError, match="index of the base"):
        DAMLinear(ws, nn.Parameter(wc), basis="task_vectors")


def test_frozen_base_row_gets_a_zero_gradient_and_the_others_train():
    ws = torch.randn(N, OUT, IN)
    lin = DAMLinear(ws, nn.Parameter(torch.rand(N, OUT + IN)), base=BASE, basis="task_vectors", freeze_base=True)
    lin(torch.randn(4, IN)).square().sum().backward()
    grad = lin.weight_coefficients.grad
    assert torch.equal(grad[BASE], torch.zeros_like(grad[BASE]))
    assert all(grad[i].abs().sum() > 0 for i in range(N) if i != BASE)


# -- the wrapper ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """(base, sources): a tiny tied Llama's three fine-tunes with the base inserted at index ``BASE``."""
    base, experts = make_family(tmp_path_factory.mktemp("family"), 3, arch="llama", tied=True, seed=5)
    return base, [experts[0], base, *experts[1:]]


def _build(family: tuple[Path, list[Path]], **options) -> DAMModel:
    base, sources = family
    return DAMModel.from_pretrained(str(base), [str(s) for s in sources], DAMOptions(**options))


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS, attention_mask=MASK).logits


@pytest.mark.parametrize("granularity", list(WIDTHS))
def test_init_names_the_merge_in_the_weights_terms(family, granularity) -> None:
    """Task arithmetic at lambda 0.5 (base 1 - 3 * 0.5, each expert 0.5) in either basis is the same model: the
    task-vector basis starts the base's coefficients at the sum of all (1) and each task vector's at 0.5."""
    weights = _build(family, granularity=granularity, init=0.5)
    vectors = _build(family, granularity=granularity, init=0.5, basis="task_vectors")
    q = "model.layers.0.self_attn.q_proj.weight"
    raw = vectors.merged_tensors[q][0].weight_coefficients.detach()
    rows = vectors.merged_tensors[q][0].rows()
    torch.testing.assert_close(raw[BASE, rows:], torch.ones_like(raw[BASE, rows:]))
    torch.testing.assert_close(raw[0, rows:], torch.full_like(raw[0, rows:], 0.5))
    # the two merges are the same sum in another order: float32 rounding apart (~1e-7 relative per weight)
    torch.testing.assert_close(_logits(vectors), _logits(weights), rtol=1e-5, atol=1e-5)
    initial = vectors.initial_coefficients()[q]
    torch.testing.assert_close(initial.to(raw.dtype), raw)


@pytest.mark.parametrize("granularity", ["column", "row_column"])
def test_export_of_the_task_vector_basis_reproduces_the_wrapper(family, granularity, tmp_path) -> None:
    model = _build(family, granularity=granularity, init=0.5, basis="task_vectors")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.trainable_coefficients():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    out = model.export(tmp_path / "out")
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    exported, wrapper = _logits(plain), _logits(model)
    # the same merge bits (the chunked fold equals merge(), tested above); only the two forwards' kernels differ
    assert ((exported - wrapper).norm() / wrapper.norm()).item() <= 1e-5
    state = load_file(str(out / "model.safetensors"))
    sources = [load_file(str(s / "model.safetensors")) for s in family[1]]
    name = "model.layers.1.mlp.down_proj.weight"
    c = model.merged_tensors[name][0].coefficients().detach().double()
    ws = torch.stack([s[name].double() for s in sources])
    expected = _explicit_weight(_basis(ws), c)
    torch.testing.assert_close(state[name].double(), expected, rtol=1e-6, atol=1e-7)  # float32 rounding


def test_frozen_base_stays_at_its_init_through_a_training_step(family) -> None:
    model = _build(family, granularity="row_column", init=0.5, basis="task_vectors", train_base=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1, weight_decay=0.0)
    logits = model(input_ids=IDS, attention_mask=MASK).logits
    (logits.log_softmax(-1)[..., 3] * MASK).sum().backward()
    optimizer.step()
    moved = 0
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p[BASE], before[name][BASE]), name
            moved += int(not torch.equal(p, before[name]))
    assert moved > 0


def test_merge_shift_in_the_task_vector_basis_splits_base_scale_and_task_vectors(family, tmp_path) -> None:
    model = _build(family, granularity="column", init=0.5, basis="task_vectors")
    name = "model.layers.0.mlp.up_proj.weight"
    module = model.merged_tensors[name][0]
    with torch.no_grad():
        module.weight_coefficients[BASE].fill_(1.25)  # the base scaled by 1.25, the task vectors at 0.5
    table = merge_shift(model.save_coefficients(tmp_path / "c.safetensors")).set_index("tensor")
    sources = [load_file(str(s / "model.safetensors"))[name].double() for s in family[1]]
    w_base = sources[BASE]
    taus = sum(s - w_base for i, s in enumerate(sources) if i != BASE)
    assert table.loc[name, "rescale"] == pytest.approx(0.25, rel=1e-5)  # ||0.25 W|| / ||W||
    assert table.loc[name, "task"] == pytest.approx(float((0.5 * taus).norm() / w_base.norm()), rel=1e-4)
    assert table.drop(index=name)["rescale"].max() < 1e-6  # the rest start at base 1: no rescaling


def test_refusals_name_the_key(family, tmp_path) -> None:
    base, sources = family
    with pytest.raises(ValueError, match="transform none"):
        DAMOptions(basis="task_vectors", transform="sigmoid")
    experts = [str(s) for i, s in enumerate(sources) if i != BASE]
    for options in ({"basis": "task_vectors"}, {"train_base": False}):
        with pytest.raises(DamError, match=f"dam.{next(iter(options))}.*is not one of the sources"):
            DAMModel.from_pretrained(str(base), experts, DAMOptions(**options))
    config = tmp_path / "dam.yaml"
    config.write_text(
        f"base_model: {base}\noutput_dir: {tmp_path / 'run'}\nmodels:\n"
        + "".join(f"  - {{name: m{i}, model: {s}, dataset: d.jsonl}}\n" for i, s in enumerate(sources))
        + "dam: {train_base: false}\ntrain: {weight_decay: 0.01}\n"
    )
    with pytest.raises(DamError, match="train_base: false.*weight_decay"):
        load_config(config)
    vectors = _build(family, basis="task_vectors")
    path = _build(family).save_coefficients(tmp_path / "weights.safetensors")
    with pytest.raises(DamError, match="dam.basis is 'weights' there but 'task_vectors' here"):
        vectors.load_coefficients(path)


def test_coefficient_table_and_model_card_read_the_basis(family, tmp_path) -> None:
    model = _build(family, granularity="row_column", init=0.5, basis="task_vectors", train_base=False)
    table = load_coefficient_table(model.save_coefficients(tmp_path / "c.safetensors"))
    columns = table[table["part"] == "column"].groupby("source", observed=True)["init"].unique()
    # in the basis: the base's own scale starts at 1 - 3 * 0.5 + 3 * 0.5 = 1, each task vector's at 0.5
    assert [list(v) for v in columns] == [[0.5], [1.0], [0.5], [0.5]]
    assert table["abs_drift"].max() == 0.0
    card = (model.export(tmp_path / "out") / "README.md").read_text()
    assert "Task-vector basis" in card and "were not trained" in card
