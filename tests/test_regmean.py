"""RegMean: the closed form on small tensors, the Gram recorder, and `dam regmean` on a tiny family."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_run import TINY, tiny_overrides

from dam.adaptive.regmean import GramRecorder, RegMeanAccumulator, regmean_merge, scale_off_diagonal
from dam.cli import main
from dam.testing import make_family

OUT, IN, N = 4, 6, 3


def _problem(seed: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    weights = [torch.randn(OUT, IN, generator=g, dtype=torch.float64) for _ in range(N)]
    inputs = [torch.randn(20 + 5 * i, IN, generator=g, dtype=torch.float64) for i in range(N)]
    return weights, inputs


def test_alpha_1_is_the_least_squares_solution():
    weights, inputs = _problem()
    merged = regmean_merge(weights, [x.t() @ x for x in inputs], alpha=1.0)
    # argmin_W sum_i ||X_i W^T - X_i W_i^T||^2 by a generic solver over the stacked system
    stacked_x = torch.cat(inputs)
    stacked_y = torch.cat([x @ w.t() for x, w in zip(inputs, weights, strict=True)])
    expected = torch.linalg.lstsq(stacked_x, stacked_y).solution.t()
    torch.testing.assert_close(merged, expected)  # both float64 solves of a well-conditioned 6x6 system


def test_off_diagonals_scale_with_alpha_and_alpha_0_with_equal_grams_is_the_average():
    weights, inputs = _problem(1)
    gram = inputs[0].t() @ inputs[0]
    scaled = scale_off_diagonal(gram, 0.25)
    torch.testing.assert_close(torch.diagonal(scaled), torch.diagonal(gram))
    off = ~torch.eye(IN, dtype=torch.bool)
    torch.testing.assert_close(scaled[off], 0.25 * gram[off])
    torch.testing.assert_close(regmean_merge(weights, [gram] * N, alpha=0.0), sum(weights) / N)
    # alpha 0, other Grams: per input feature j, the average weighted by each source's G_i[j, j]
    grams = [x.t() @ x for x in inputs]
    diag = torch.stack([torch.diagonal(g) for g in grams])  # (N, IN)
    expected = sum(w * d for w, d in zip(weights, diag, strict=True)) / diag.sum(0)
    torch.testing.assert_close(regmean_merge(weights, grams, alpha=0.0), expected)
    # alpha strictly between: the closed form with the scaled Grams
    a = 0.6
    s = [scale_off_diagonal(g, a) for g in grams]
    closed = torch.linalg.solve(sum(s), sum(g @ w.t() for g, w in zip(s, weights, strict=True))).t()
    torch.testing.assert_close(regmean_merge(weights, grams, alpha=a), closed)
    with pytest.raises(ValueError, match="alpha"):
        scale_off_diagonal(gram, 1.5)


def test_inactive_features_get_the_plain_average():
    weights, inputs = _problem(2)
    inputs = [x.clone() for x in inputs]
    for x in inputs:
        x[:, 2] = 0  # no source ever activates feature 2: the Gram sum is singular there
    merged = regmean_merge(weights, [x.t() @ x for x in inputs], alpha=0.9)
    torch.testing.assert_close(merged[:, 2], sum(w[:, 2] for w in weights) / N)
    assert torch.isfinite(merged).all()
    with pytest.raises(ValueError, match="does not fit"):
        RegMeanAccumulator(0.5).add(weights[0], torch.eye(IN + 1))


def test_gram_recorder_counts_the_masked_tokens_only():
    model = torch.nn.Sequential(torch.nn.Linear(IN, 5), torch.nn.ReLU(), torch.nn.Linear(5, 2))
    recorder = GramRecorder(model, ["0", "2"])
    x = torch.randn(2, 4, IN)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    with recorder.tokens(mask):
        model(x)
    kept = x[mask.bool()].double()  # (4, IN)
    torch.testing.assert_close(recorder.grams["0"], kept.t() @ kept)
    hidden = torch.relu(model[0](x))[mask.bool()].double()
    torch.testing.assert_close(recorder.grams["2"], hidden.t() @ hidden, rtol=1e-6, atol=1e-6)  # float32 forward
    recorder.close()
    model(x)
    assert recorder.grams["0"].shape == (IN, IN) and not model[0]._forward_hooks
    with pytest.raises(ValueError, match="not nn.Linear"):
        GramRecorder(model, ["1"])


def test_cli_regmean_writes_a_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from transformers import AutoModelForCausalLM

    base, sources = make_family(tmp_path / "family", 3)
    out = tmp_path / "regmean"
    overrides = tiny_overrides(base, sources, tmp_path / "unused")
    assert main(["regmean", str(TINY), str(out), *overrides, "--alpha", "0.5"]) == 0
    assert "linear weights by RegMean" in capsys.readouterr().out
    merged = load_file(out / "model.safetensors")
    states = [load_file(s / "model.safetensors") for s in sources]
    record = json.loads((out / "regmean.json").read_text())
    assert record["alpha"] == 0.5 and all(n > 0 for n in record["tokens"].values())
    assert "model.embed_tokens.weight" in record["averaged_tensors"]
    assert "model.layers.0.self_attn.q_proj.weight" in record["regmean_tensors"]
    for name in record["averaged_tensors"]:
        torch.testing.assert_close(merged[name], sum(s[name] for s in states) / 3)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(merged[q], sum(s[q] for s in states) / 3, atol=1e-4)  # the Grams weighed in
    AutoModelForCausalLM.from_pretrained(out)  # an ordinary checkpoint
    card = (out / "README.md").read_text()  # a model card, as every merge writes
    assert "base_model_relation: merge" in card and "RegMean" in card and "alpha 0.5" in card
    assert all(f"`{json.loads((out / 'regmean.json').read_text())['sources'][i]}`" in card for i in range(3))

    assert main(["regmean", str(TINY), str(out), *overrides]) == 1  # not empty, no --force
    assert "--force" in capsys.readouterr().err
    assert main(["regmean", str(TINY), str(tmp_path / "x"), *overrides, "--alpha", "2"]) == 1
    assert "alpha" in capsys.readouterr().err and not (tmp_path / "x").exists()
