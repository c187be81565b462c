"""``loss.align``, the layer-wise alignment objective: its value against a hand computation, the teachers' layer
states against each source run alone, its coefficient gradients against autograd through a plain merged model, and
training with it (beside the KL and alone) together with its config refusals."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file
from tiny_run import tiny_config
from transformers import AutoConfig, AutoModelForCausalLM

from dam.adaptive.layers import fold
from dam.adaptive.losses import layer_alignment, token_weights
from dam.adaptive.model import DAMModel
from dam.cli import main
from dam.errors import DamError
from dam.evaluation.analysis import alignment_by_layer, load_metrics, plot_alignment
from dam.evaluation.check import check_config, refuse_training
from dam.testing import make_family
from dam.training.config import config_to_dict
from dam.training.loop import _Teachers, loss_mask, teacher_targets, train


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    return make_family(tmp_path_factory.mktemp("family"), 3)


def test_layer_alignment_is_the_weighted_mean_relative_distance() -> None:
    """Every token, layer and teacher slot by hand, in float64: per layer sum_t w_t mean_s |h - g|^2 / |g|^2 / W."""
    gen = torch.Generator().manual_seed(0)
    layers, batch, slots, length, width = 3, 2, 2, 4, 5
    student = [torch.randn(batch, length, width, generator=gen) for _ in range(layers)]
    teacher = torch.randn(layers, batch, slots, length, width, generator=gen) * 3
    weights = torch.tensor([1.0, 0.0, 2.0, 1.0, 0.0, 0.5, 1.0, 1.0])  # (B * T,): padding 0, a source weighted
    count = weights.sum()
    want = [0.0] * layers
    for b in range(batch):
        for t in range(length):
            w = float(weights[b * length + t])
            for layer, (h, g) in enumerate(zip(student, teacher, strict=True)):
                for s in range(slots):
                    a, ref = h[b, t].double(), g[b, s, t].double()
                    want[layer] += w * float((a - ref).square().sum() / ref.square().sum()) / slots
    got = layer_alignment(student, teacher, weights, count)
    assert got.dtype == torch.float32 and got.shape == (layers,)
    # float32 sums of ~10 terms of order 1 per layer
    assert got.tolist() == pytest.approx([v / float(count) for v in want], rel=1e-6)
    assert len(set(got.tolist())) == layers  # the layers apart, not one value repeated
    same = layer_alignment([g[:, 0] for g in teacher], teacher[:, :, :1], weights, count)
    assert same.tolist() == [0.0] * layers  # a student equal to its teacher is at 0 exactly
    with pytest.raises(ValueError, match="student states"):
        layer_alignment(student[:2], teacher, weights, count)


def _batch(pairing_rows: list[int], seed: int = 0) -> dict[str, torch.Tensor]:
    ids = torch.randint(4, 60, (len(pairing_rows), 9), generator=torch.Generator().manual_seed(seed))
    labels = ids.clone()
    labels[0, :4] = -100  # a prompt: those tokens carry no loss
    mask = torch.ones_like(ids)
    mask[-1, -2:] = 0  # right padding
    labels[-1, -2:] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "source": torch.tensor(pairing_rows)}


def test_teacher_layer_states_are_each_sources_own(family: tuple[Path, list[Path]]) -> None:
    """The ``layers`` targets of a row are its source's hidden states run alone as a plain transformers model."""
    base, sources = family
    model = DAMModel.from_pretrained(str(base), [str(s) for s in sources])
    batch = _batch([2, 0, 2])
    targets = teacher_targets(batch, _Teachers(model, model), model.num_sources, 1.0, None, layers=True)
    layers = targets["layers"]
    assert layers.shape == (model.config.num_hidden_layers, 3, 1, 9, model.config.hidden_size)
    assert set(targets) == {"hidden", "teacher", "layers"}
    for row, k in enumerate([2, 0, 2]):
        plain = AutoModelForCausalLM.from_pretrained(sources[k]).eval()
        with torch.no_grad():
            out = plain(
                input_ids=batch["input_ids"][row : row + 1],
                attention_mask=batch["attention_mask"][row : row + 1],
                output_hidden_states=True,
            )
        want = torch.stack(out.hidden_states[1:])[:, 0]
        # teacher mode computes with source k's own weights; the batch of 3 rows against a batch of 1 may differ
        # in the last bits of a GEMM (float32, values of order 1)
        torch.testing.assert_close(layers[:, row, 0], want, rtol=1e-5, atol=1e-5)
    alone = teacher_targets(batch, _Teachers(model, model), model.num_sources, 1.0, None, layers=True, kl=False)
    assert set(alone) == {"layers"} and torch.equal(alone["layers"], layers)


def test_alignment_gradient_equals_autograd_through_a_plain_merged_model(family: tuple[Path, list[Path]]) -> None:
    """The student's path (DAM layers' custom backward, ``model(..., layer_loss=...)``) against a reference that
    folds the sources with plain torch ops and runs the base architecture with those weights
    (``torch.func.functional_call``): the same value and the same coefficient gradients."""
    base, sources = family
    model = DAMModel.from_pretrained(str(base), [str(s) for s in sources])
    with torch.no_grad():  # away from the uniform init, so that the sources weigh differently
        for p in model.trainable_coefficients():
            p.mul_(1 + 0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    batch = _batch([1, 0, 2], seed=1)
    targets = teacher_targets(batch, _Teachers(model, model), model.num_sources, 1.0, None, layers=True, kl=False)
    weights, count = token_weights(loss_mask(batch["labels"]).float(), batch["labels"].shape, torch.device("cpu"))
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    params = model.trainable_coefficients()
    loss_fn = functools.partial(layer_alignment, teacher=targets["layers"], weights=weights, count=count)

    zero, got = model(**inputs, layer_loss=lambda states: loss_fn(states).mean())  # the objective
    assert float(zero) == 0.0  # no chunk loss given
    g_got = torch.autograd.grad(got, params, allow_unused=True)  # the untied lm_head: not in any layer state

    plain = AutoModelForCausalLM.from_pretrained(base).eval()
    merged = {}
    for name, (module, attr, _) in model.merged_tensors.items():
        merged[name] = fold(getattr(module, f"{attr}_sources"), module.coefficients(attr))
    out = torch.func.functional_call(plain, merged, args=(), kwargs={**inputs, "output_hidden_states": True})
    want = loss_fn(out.hidden_states[1:]).mean()
    g_want = torch.autograd.grad(want, params, allow_unused=True)
    # float32: the custom backward rebuilds the merged weight and reduces per source in row chunks, the reference
    # differentiates the fold directly; values of order 1 agree to ~1e-7, gradients (up to ~1) to ~1e-6
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-5)
    assert float(got.detach()) > 1e-3  # the merge is not any one source
    assert [g is None for g in g_got] == [g is None for g in g_want]
    assert sum(g is None for g in g_got) <= 1  # the lm_head's coefficients at most
    for a, b in zip(g_got, g_want, strict=True):
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert max(float(g.abs().max()) for g in g_got if g is not None) > 1e-4  # a real gradient


@pytest.mark.parametrize("kl", [1.0, 0.0])
def test_training_with_alignment_lowers_it(family: tuple[Path, list[Path]], tmp_path: Path, kl: float) -> None:
    """Beside the KL and alone: the run logs ``loss/align`` (and ``loss/kl`` only when it is computed) and each
    decoder layer's alignment (their mean is ``loss/align``), the total is the weighted sum of its terms, and the
    alignment falls over training; :func:`dam.evaluation.analysis.alignment_by_layer` reads it per layer."""
    config = tiny_config(
        *family, tmp_path / "run", "loss.align=0.5", f"loss.kl={kl}", "loss.similarity=0", "train.max_steps=12"
    )
    records = [json.loads(line) for line in (train(config) / "metrics.jsonl").read_text().splitlines()]
    assert ("loss/kl" in records[0]) == (kl > 0)
    for r in records:
        assert r["loss"] == pytest.approx(kl * r.get("loss/kl", 0.0) + 0.5 * r["loss/align"], rel=1e-9)
    assert records[-1]["loss/align"] < records[0]["loss/align"]
    layers = AutoConfig.from_pretrained(family[0]).num_hidden_layers
    for r in records:
        per_layer = [r[f"align/layer_{i}"] for i in range(layers)]
        assert f"align/layer_{layers}" not in r and min(per_layer) >= 0
        assert sum(per_layer) / layers == pytest.approx(r["loss/align"], rel=1e-12)  # float64 sums
    table = alignment_by_layer(load_metrics(tmp_path / "run"))
    assert list(table.columns) == list(range(layers)) and list(table.index) == [r["step"] for r in records]
    assert table.iloc[-1].mean() == pytest.approx(records[-1]["loss/align"], rel=1e-12)
    png = tmp_path / "align.png"
    plot_alignment(load_metrics(tmp_path / "run"), path=png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["analyze", str(tmp_path / "run"), "--plots", str(tmp_path / "plots")]) == 0  # and its plot
    assert (tmp_path / "plots" / "alignment.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_alignment_config_refusals(family: tuple[Path, list[Path]], tmp_path: Path) -> None:
    base, sources = family
    cases = {
        "entropy has none": ["loss.align=1", "loss.objective=entropy"],
        "does not hold": ["loss.align=1", "loss.top_k=4", "data.teacher_logits=cached", f"data.cache_dir={tmp_path}"],
        "both 0": ["loss.kl=0"],
    }
    for message, extra in cases.items():
        with pytest.raises(DamError, match=message):
            tiny_config(base, sources, tmp_path / "run", *extra)


def test_alignment_alone_refuses_a_trained_tied_head(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """With ``loss.kl: 0`` nothing sees the output, so a tied ``lm_head`` must not train with the embedding: refused
    by ``dam train`` before the run folder, by ``dam check`` and by :func:`train` itself (the API path), each naming
    the fix; without the embedding, with the KL, or with an untied head, the same run is accepted."""
    base, sources = make_family(tmp_path / "tied", 3, tied=True)
    run = tmp_path / "run"
    blind = tiny_config(base, sources, run, "loss.align=1", "loss.kl=0")
    path = tmp_path / "dam.yaml"
    path.write_text(yaml.safe_dump(config_to_dict(blind), sort_keys=False))
    assert main(["train", str(path)]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "tied to its embedding" in errors[0] and "dam.targets: [linear, norm]" in errors[0]
    assert "dam.targets [linear, embedding, norm]:" in errors[0]  # in the config's own notation, not a Python list
    assert not run.exists()
    assert check_config(path).verdict == "refuse"
    with pytest.raises(DamError, match="lm_head of base .* is tied to its embedding"):
        train(blind)
    for extra in (["dam.targets=[linear,norm]"], ["loss.kl=0.5"]):
        refuse_training(tiny_config(base, sources, run, "loss.align=1", "loss.kl=0", *extra))
    untied = make_family(tmp_path / "untied", 3)
    refuse_training(tiny_config(*untied, run, "loss.align=1", "loss.kl=0"))


@pytest.mark.parametrize("kl", [0.0, 0.5])
def test_alignment_alone_keeps_an_untied_head_at_its_init(
    family: tuple[Path, list[Path]], tmp_path: Path, kl: float
) -> None:
    """With ``loss.kl: 0`` no gradient of the objective reaches an untied ``lm_head``; a regulariser (here the L2
    toward 0) would move it with nothing to hold it, so it is frozen: after training its coefficients are the
    init's bit for bit while a decoder layer's moved. With the KL it trains."""
    config = tiny_config(
        *family, tmp_path / "run", "loss.align=1", f"loss.kl={kl}", "loss.l2=0.5", "train.max_steps=4"
    )
    trained = load_file(train(config) / "dam_coefficients.safetensors")
    init = DAMModel.from_pretrained(config.base_model, [m.model for m in config.models], config.dam)
    start = init.raw_coefficients()
    assert trained["lm_head.weight"].equal(start["lm_head.weight"]) == (kl == 0)
    layer = "model.layers.0.mlp.up_proj.weight"
    assert not trained[layer].equal(start[layer])


def test_alignment_by_layer_needs_a_run_trained_with_it() -> None:
    metrics = pd.DataFrame({"step": [10, 20], "loss": [1.0, 0.5], "loss/kl": [1.0, 0.5]})
    with pytest.raises(DamError, match="no per-layer alignment .*loss.align: 0"):
        alignment_by_layer(metrics)
    metrics["align/layer_1"], metrics["align/layer_0"] = [0.2, 0.1], [0.4, 0.0]
    table = alignment_by_layer(metrics)  # layers in order whatever the columns' order; a zero is plotted too
    assert list(table.columns) == [0, 1] and table.loc[20].tolist() == [0.0, 0.1]
    plot_alignment(metrics)
