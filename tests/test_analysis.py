"""dam.evaluation.analysis on a tiny finished run: the coefficient table, its summary, the metrics, the plots, and the
notebook executed end to end against the run."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.figure import Figure
from safetensors.torch import load_file
from tiny_run import ROOT, tiny_config

from dam.adaptive.model import DAMModel
from dam.adaptive.options import DAMOptions
from dam.cli import main
from dam.errors import DamError
from dam.evaluation.analysis import (
    COLUMNS,
    SHIFT_COLUMNS,
    layer_means,
    load_coefficient_table,
    load_metrics,
    merge_shift,
    plot_coefficient_distributions,
    plot_coefficient_heatmap,
    plot_loss_curves,
    source_names,
    summarise_coefficients,
    tensor_layer,
    tensor_module,
    total_shift,
)
from dam.testing import make_family
from dam.training.loop import train

NOTEBOOK = ROOT / "notebooks" / "analyse_coefficients.ipynb"
SOURCES = ["arithmetic", "reverse", "counting"]
INIT = [0.5, 0.3, 0.2]
LAYER_MODULES = [
    "self_attn.q_proj",
    "self_attn.q_proj.bias",
    "self_attn.k_proj",
    "self_attn.k_proj.bias",
    "self_attn.v_proj",
    "self_attn.v_proj.bias",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
    "input_layernorm",
    "post_attention_layernorm",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-step run of the tiny config on a Qwen2 family (q/k/v biases), softmax transform, non-uniform init."""
    base, sources = make_family(tmp_path_factory.mktemp("family"), 3, arch="qwen2")
    out = tmp_path_factory.mktemp("runs") / "tiny"
    extra = ["dam.transform=softmax", f"dam.init={INIT}", "train.max_steps=4", "train.save_every=0"]
    return train(tiny_config(base, sources, out, *extra))


@pytest.fixture(scope="module")
def table(run: Path) -> pd.DataFrame:
    return load_coefficient_table(run)


def test_one_row_per_tensor_and_source_with_module_kind_and_layer(run: Path, table: pd.DataFrame) -> None:
    raw = load_file(run / "dam_coefficients.safetensors")
    assert list(table.columns) == COLUMNS
    assert len(table) == len(raw) * 3 and set(table["tensor"]) == set(raw)
    assert list(table["source"].cat.categories) == SOURCES
    assert (table.groupby("tensor")["source"].apply(list) == pd.Series({t: SOURCES for t in raw})).all()
    rows = table.drop_duplicates("tensor").set_index("tensor")
    expected = {
        "model.embed_tokens.weight": ("embed_tokens", "embedding", None),
        "model.layers.0.self_attn.q_proj.weight": ("self_attn.q_proj", "linear", 0),
        "model.layers.1.self_attn.k_proj.bias": ("self_attn.k_proj.bias", "bias", 1),
        "model.layers.1.mlp.down_proj.weight": ("mlp.down_proj", "linear", 1),
        "model.layers.0.post_attention_layernorm.weight": ("post_attention_layernorm", "norm", 0),
        "model.norm.weight": ("norm", "norm", None),
        "lm_head.weight": ("lm_head", "linear", None),
    }
    for name, (module, kind, layer) in expected.items():
        row = rows.loc[name]
        assert (row["module"], row["kind"]) == (module, kind), name
        assert pd.isna(row["layer"]) if layer is None else row["layer"] == layer, name
    # embedding first, layers in order with projections in the usual order, then the final norm and lm_head
    in_layers = table[table["layer"].notna()].drop_duplicates("tensor")
    assert list(in_layers["layer"]) == [0] * 12 + [1] * 12
    assert list(in_layers["module"][:12]) == LAYER_MODULES
    assert list(table.drop_duplicates("tensor")["module"]) == ["embed_tokens", *LAYER_MODULES * 2, "lm_head", "norm"]


def test_statistics_are_those_of_the_transformed_coefficients(run: Path, table: pd.DataFrame) -> None:
    raw = load_file(run / "dam_coefficients.safetensors")
    for row in table.itertuples():
        i = SOURCES.index(row.source)
        values = torch.softmax(raw[row.tensor].double(), dim=0)[i].flatten()  # the run's transform is softmax
        assert row.numel == values.numel()
        assert row.init == pytest.approx(INIT[i])
        for stat, expected in [
            ("mean", values.mean()),
            ("std", values.std(correction=0)),
            ("min", values.min()),
            ("max", values.max()),
            ("abs_drift", (values - INIT[i]).abs().mean()),
        ]:
            assert getattr(row, stat) == pytest.approx(float(expected), rel=1e-5, abs=1e-7), (row.tensor, stat)
        assert row.drift == pytest.approx(row.mean - INIT[i])
        assert row.trainable
    assert (table["abs_drift"] > 1e-4).all(), "every coefficient trained for 4 steps at lr 1e-2"


def test_coefficients_file_gives_the_same_table(run: Path, table: pd.DataFrame) -> None:
    pd.testing.assert_frame_equal(load_coefficient_table(run / "merged" / "dam_coefficients.safetensors"), table)


def test_summary_by_kind_and_source_equals_the_training_log(run: Path, table: pd.DataFrame) -> None:
    summary = summarise_coefficients(table)
    last = load_metrics(run).iloc[-1]
    assert sorted(summary["kind"].unique()) == ["bias", "embedding", "linear", "norm"]
    assert len(summary) == 4 * 3
    for row in summary.itertuples():
        for stat in ("mean", "std", "min", "max"):
            logged = last[f"coefficients/{row.kind}/{row.source}/{stat}"]
            assert getattr(row, stat) == pytest.approx(logged, rel=1e-5, abs=1e-7), (row.kind, row.source, stat)
    numel = table.groupby("kind")["numel"].sum() / 3
    assert (summary.groupby("kind")["numel"].first() == numel).all()


def test_names_from_other_layouts_and_sources_without_a_run_config() -> None:
    assert tensor_layer("transformer.h.11.attn.c_attn.weight") == 11
    assert tensor_module("transformer.h.11.attn.c_attn.weight") == "transformer.attn.c_attn"
    assert tensor_layer("model.language_model.layers.7.mlp.up_proj.weight") == 7
    assert tensor_layer("model.embed_tokens.weight") is None
    assert tensor_module("model.layers.2.self_attn.q_proj.bias") == "self_attn.q_proj.bias"
    meta = {"sources": ["/a/math", "org/ja-model"], "training": None}
    assert source_names(meta) == ["math", "ja-model"]
    assert source_names({"sources": ["/a/model", "/b/model"]}) == ["/a/model", "/b/model"]  # folder names clash


def test_metrics_keep_the_last_record_of_each_step(tmp_path: Path) -> None:
    records = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0}, {"step": 3, "loss": 9.0}]
    records += [{"step": 3, "loss": 1.5}, {"step": 4, "loss": 1.0}]  # resumed from step 2: step 3 logged again
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    metrics = load_metrics(tmp_path)
    assert list(metrics["step"]) == [1, 2, 3, 4] and list(metrics["loss"]) == [3.0, 2.0, 1.5, 1.0]
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "lo')
    with pytest.raises(DamError, match="line 2"):
        load_metrics(tmp_path)
    with pytest.raises(DamError, match="no metrics.jsonl"):
        load_metrics(tmp_path / "missing")


def panel_titles(fig: Figure) -> list[str]:
    return [ax.get_title() for ax in fig.axes if ax.get_title()]


def assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_heatmap_panels_hold_layers_by_sources(table: pd.DataFrame, tmp_path: Path) -> None:
    fig = plot_coefficient_heatmap(table, path=tmp_path / "plots" / "heatmap.png")
    assert isinstance(fig, Figure)
    assert panel_titles(fig) == [*LAYER_MODULES, "outside the layers"]
    assert len(fig.axes) == len(LAYER_MODULES) + 2  # + the colour bar
    q = table[table["module"] == "self_attn.q_proj"]
    expected = q.pivot_table(index="layer", columns="source", values="mean", observed=False).to_numpy()
    np.testing.assert_allclose(fig.axes[0].images[0].get_array(), expected)
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == SOURCES
    outside = fig.axes[len(LAYER_MODULES)]
    assert [t.get_text() for t in outside.get_yticklabels()] == ["embed_tokens", "lm_head", "norm"]
    assert_png(tmp_path / "plots" / "heatmap.png")

    drift = plot_coefficient_heatmap(table, "drift", path=tmp_path / "drift.png")
    norm = drift.axes[0].images[0].norm
    assert norm.vcenter == 0 and norm.vmin == pytest.approx(-norm.vmax)
    assert_png(tmp_path / "drift.png")
    with pytest.raises(DamError, match="no column"):
        plot_coefficient_heatmap(table, "median")


def test_distributions_have_one_panel_per_kind_and_a_histogram_per_source(run: Path, table: pd.DataFrame) -> None:
    path = run.parent / "distributions.png"
    fig = plot_coefficient_distributions(run, path=path)
    titles = panel_titles(fig)
    assert [t.split()[0] for t in titles] == ["embedding", "linear", "norm", "bias"]
    per_kind = table[table["source"] == "arithmetic"].groupby("kind")["numel"].sum()
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == SOURCES
    for ax, title in zip(fig.axes, titles, strict=True):
        assert len(ax.patches) == 3  # one step histogram per source
        assert sorted(line.get_xdata()[0] for line in ax.lines) == sorted(INIT)  # init lines (the inits differ)
        assert f"({per_kind[title.split()[0]]:,} per source)" in title
    assert_png(path)


def test_loss_curves_plot_every_logged_loss_term(run: Path, tmp_path: Path) -> None:
    metrics = load_metrics(run)
    fig = plot_loss_curves(metrics, path=tmp_path / "loss.png")
    assert panel_titles(fig) == ["loss", "loss/kl", "loss/similarity", "grad_norm", "lr"]
    x, y = fig.axes[1].lines[0].get_data()
    assert list(x) == [1, 2, 3, 4] and list(y) == list(metrics["loss/kl"])
    assert_png(tmp_path / "loss.png")
    with pytest.raises(DamError, match="no loss columns"):
        plot_loss_curves(metrics[["step", "lr"]].rename(columns={"lr": "other"}))


def test_dam_analyze_prints_the_summary_and_shift_and_writes_the_plots(
    run: Path, table: pd.DataFrame, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``dam analyze``: the library's summary and shift, as JSON or a table; the plots, never overwritten without
    ``--force``; a path without coefficients is one error line."""
    assert main(["analyze", str(run), "--shift", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    expected = summarise_coefficients(table)
    printed = pd.DataFrame(record["coefficients"])
    assert list(printed.columns) == list(expected.columns) and printed["numel"].tolist() == expected["numel"].tolist()
    assert printed.select_dtypes("number").to_numpy() == pytest.approx(expected.select_dtypes("number").to_numpy())
    labels = ["kind", "part", "source"]
    assert printed[labels].astype(str).equals(expected[labels].astype(str))
    assert record["shift"] == pytest.approx(total_shift(merge_shift(run)).to_dict(), rel=1e-12)
    assert main(["analyze", str(run)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 1 + len(expected) and printed[0].split()[:4] == ["kind", "part", "source", "numel"]

    plots = tmp_path / "plots"
    assert main(["analyze", str(run), "--plots", str(plots)]) == 0
    assert capsys.readouterr().out.strip().endswith(f"wrote drift.png, distributions.png, losses.png to {plots}")
    for name in ("drift.png", "distributions.png", "losses.png"):
        assert_png(plots / name)
    assert not (plots / "alignment.png").exists()  # the run had loss.align: 0
    before = (plots / "drift.png").stat().st_mtime_ns
    assert main(["analyze", str(run), "--plots", str(plots)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --plots") and "--force" in err and "\n" not in err
    assert (plots / "drift.png").stat().st_mtime_ns == before
    assert main(["analyze", str(run), "--plots", str(plots), "--force"]) == 0
    assert main(["analyze", str(tmp_path / "nothing")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "nothing" in err and "\n" not in err and "Traceback" not in err


def test_notebook_is_saved_without_outputs() -> None:
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


def test_notebook_runs_against_a_finished_run(run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from nbclient import NotebookClient

    monkeypatch.setenv("DAM_RUN", str(run))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(notebook, kernel_name="python3", timeout=120, resources={"metadata": {"path": str(run)}}).execute()
    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 4, "heat map, drift heat map, distributions, loss curves"


# ------------------------------------------------------------------- every granularity and the task-vector form


@pytest.fixture(scope="module")
def qwen2_family(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    return make_family(tmp_path_factory.mktemp("granularity"), 2, arch="qwen2", seed=5)


def _coefficients_file(family: tuple[Path, list[Path]], folder: Path, base_first: bool, **options) -> Path:
    """A coefficients file of a wrapper whose raw coefficients were moved at random, as if trained (no run)."""
    base, experts = family
    sources = [base, *experts] if base_first else experts
    model = DAMModel.from_pretrained(str(base), [str(s) for s in sources], DAMOptions(**options))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.trainable_coefficients():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model.save_coefficients(folder / "coefficients.safetensors")


def test_row_column_rows_and_columns_are_apart_in_table_plots_and_layer_means(qwen2_family, tmp_path: Path) -> None:
    path = _coefficients_file(qwen2_family, tmp_path, False, granularity="row_column", transform="sigmoid")
    raw = load_file(path)
    table = load_coefficient_table(path)
    q = table[table["tensor"] == "model.layers.0.self_attn.q_proj.weight"].set_index(["part", "source"])
    out, inp = 32, 32  # the tiny config's q_proj (hidden 32 -> 4 heads x 8)
    assert set(q.index.get_level_values("part")) == {"row", "column"}
    for i, source in enumerate(["source0", "source1"]):
        rows, columns = q.loc[("row", source)], q.loc[("column", source)]
        values = raw["model.layers.0.self_attn.q_proj.weight"][i].double()  # (out + in,)
        assert (rows["numel"], columns["numel"]) == (out, inp)
        assert rows["mean"] == pytest.approx(float(values[:out].mean()))  # row scales: not transformed
        assert columns["mean"] == pytest.approx(float(torch.sigmoid(values[out:]).mean()))
        assert rows["init"] == 1.0 and columns["init"] == pytest.approx(0.5)
    assert set(table[table["kind"].isin(["norm", "bias"])]["part"]) == {"element"}

    fig = plot_coefficient_heatmap(table)
    titles = panel_titles(fig)
    assert "self_attn.q_proj" in titles and "self_attn.q_proj (row scales)" in titles
    assert "outside the layers (row scales)" in titles and "input_layernorm (row scales)" not in titles
    assert len(fig.axes) == len(titles) + 2  # one colour bar for the coefficients, one for the row scales
    means = layer_means(table)
    assert list(means.index) == ["embed_tokens", "embed_tokens rows", "layer 0", "layer 0 rows", "layer 1"] + [
        "layer 1 rows",
        "lm_head",
        "lm_head rows",
        "norm",
    ]
    layer0 = table[(table["layer"] == 0) & (table["part"] == "row") & (table["source"] == "source1")]
    expected = (layer0["mean"] * layer0["numel"]).sum() / layer0["numel"].sum()
    assert means.loc["layer 0 rows", "source1"] == pytest.approx(expected)
    titles = panel_titles(plot_coefficient_distributions(path))
    assert [t.split(" (")[0] for t in titles] == [
        "embedding",
        "embedding row scales",
        "linear",
        "linear row scales",
        "norm",
        "bias",
    ]


def test_tensor_granularity_is_one_scalar_per_tensor(qwen2_family, tmp_path: Path) -> None:
    table = load_coefficient_table(_coefficients_file(qwen2_family, tmp_path, False, granularity="tensor"))
    weights = table[table["kind"] != "bias"]
    assert set(weights["part"]) == {"scalar"} and (weights["numel"] == 1).all() and (weights["std"] == 0).all()
    assert set(table[table["kind"] == "bias"]["part"]) == {"element"}  # dam.bias per_output
    assert panel_titles(plot_coefficient_heatmap(table))[-1] == "outside the layers"


def test_task_vector_form_shows_the_lambdas(qwen2_family, tmp_path: Path) -> None:
    path = _coefficients_file(qwen2_family, tmp_path, True, granularity="tensor", transform="task_vector")
    raw = load_file(path)
    table = load_coefficient_table(path)
    sources = ["base", "source0", "source1"]
    assert list(table["source"].cat.categories) == sources
    assert list(table.drop_duplicates("source")["derived"]) == [True, False, False]
    for row in table[table["kind"] != "bias"].itertuples():
        lambdas = raw[row.tensor].double().clamp(0, 1)[1:]  # (2, 1): the experts' raw values, clamped
        expected = 1 - lambdas.sum() if row.derived else lambdas[sources.index(row.source) - 1].sum()
        assert row.mean == pytest.approx(float(expected)), (row.tensor, row.source)
        assert row.init == pytest.approx(0.4 if row.derived else 0.3)  # the default init: every lambda 0.3
    fig = plot_coefficient_heatmap(table)
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["source0", "source1"]
    assert fig.get_suptitle().startswith("AdaMerging lambdas")
    assert list(layer_means(table).columns) == ["source0", "source1"]
    distributions = plot_coefficient_distributions(path)
    assert [t.get_text() for t in distributions.axes[0].get_legend().get_texts()] == ["source0", "source1"]


def _shift_by_hand(w_base: torch.Tensor, weights: list[torch.Tensor], a: torch.Tensor) -> tuple[float, float, float]:
    """``(rescale, task, task_arithmetic)`` of :func:`merge_shift` from the effective coefficients ``a`` (N, *S)."""
    taus = [w - w_base for w in weights]
    norm = w_base.norm()
    rescale = (a.sum(0) - 1) * w_base
    task = sum(a_i * tau for a_i, tau in zip(a, taus, strict=True))
    return float(rescale.norm() / norm), float(task.norm() / norm), float(sum(taus).norm() / norm)


@pytest.mark.parametrize("base_first", [True, False])
def test_merge_shift_splits_the_move_into_the_base_rescaled_and_the_task_vectors(
    qwen2_family, tmp_path: Path, base_first: bool
) -> None:
    base, experts = qwen2_family
    path = _coefficients_file(qwen2_family, tmp_path, base_first, granularity="row_column")
    raw = load_file(path)
    sources = [base, *experts] if base_first else experts
    weights = [load_file(next(Path(s).glob("*.safetensors"))) for s in sources]
    w_base = load_file(next(Path(base).glob("*.safetensors")))
    table = merge_shift(path).set_index("tensor")
    assert list(table.columns) == [c for c in SHIFT_COLUMNS if c != "tensor"]
    assert set(table.index) == set(raw)
    for name, shape_of in [
        ("model.layers.0.self_attn.q_proj.weight", "row_column"),
        ("model.layers.1.input_layernorm.weight", "element"),
        ("model.layers.0.self_attn.k_proj.bias", "element"),
    ]:
        c = raw[name].double()
        out = w_base[name].shape[0]
        a = c[:, :out, None] * c[:, None, out:] if shape_of == "row_column" else c  # (N, out, in) or (N, out)
        expected = _shift_by_hand(w_base[name].double(), [w[name].double() for w in weights], a)
        row = table.loc[name]
        # float32 reads against a float64 hand computation: relative 1e-4 is far below the 0.2 moves drawn
        assert (row["rescale"], row["task"], row["task_arithmetic"]) == pytest.approx(expected, rel=1e-4), name
        assert row["base_norm"] == pytest.approx(float(w_base[name].norm()), rel=1e-5)
    assert table.loc["model.layers.0.self_attn.q_proj.weight", "rescale"] > 0.05  # the random move rescales
    base_sq = table["base_norm"] ** 2
    pooled = total_shift(table.reset_index())
    for column in ["rescale", "task", "task_arithmetic"]:  # the whole model's move over the whole base, by hand
        moves = sum(float((table.loc[n, column] * table.loc[n, "base_norm"]) ** 2) for n in table.index)
        assert pooled[column] == pytest.approx((moves / base_sq.sum()) ** 0.5, rel=1e-9)


def test_merge_shift_of_the_task_vector_form_never_rescales_the_base(qwen2_family, tmp_path: Path) -> None:
    path = _coefficients_file(qwen2_family, tmp_path, True, granularity="column", transform="task_vector")
    table = merge_shift(path)
    assert table["rescale"].max() < 1e-6  # 1 - sum lambda_k + sum lambda_k = 1 up to float32 rounding
    assert (table["task"] > 0).all()


def test_total_shift_leaves_out_tensors_whose_base_is_zero() -> None:
    nan = float("nan")
    table = pd.DataFrame(
        {"base_norm": [3.0, 4.0, nan], "rescale": [0.1, 0.2, nan], "task": [0.0, 0.5, nan], "task_arithmetic": 1.0}
    )
    pooled = total_shift(table)
    # moves 0.3 and 0.8 (rescale), 0 and 2 (task), 3 and 4 (task arithmetic) over a base of norm 5
    assert pooled["rescale"] == pytest.approx((0.3**2 + 0.8**2) ** 0.5 / 5)
    assert pooled["task"] == pytest.approx(2 / 5) and pooled["task_arithmetic"] == pytest.approx(1.0)
