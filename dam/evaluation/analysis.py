"""What a DAM run learned: its coefficients as a tidy table, its metrics, and plots of both.

A run folder (or a bare ``dam_coefficients.safetensors``) holds the raw coefficients of every merged tensor, shape
``(N, in)`` for linear and embedding weights, ``(N, size)`` for norms, ``(N, out)`` or ``(N, 1)`` for biases, plus
metadata naming the sources, the transform and the init. :func:`load_coefficient_table` applies the transform (the
values the merge actually used, ``W = sum_i W_i diag(c_i)``) and reduces each source's vector to one row::

    tensor  module            kind    layer  source      numel  init   mean   std    min    max    drift  abs_drift
    model.layers.0.self_attn.q_proj.weight
            self_attn.q_proj  linear  0      arithmetic  64     0.333  0.341  0.004  0.330  0.352  0.008  0.008

``module`` is the tensor name without the layer index, ``model.`` prefix and ``.weight`` suffix (biases keep
``.bias``); ``kind`` is ``linear``/``embedding``/``norm``/``bias`` as in the training logs; ``layer`` is the decoder
layer index (``<NA>`` for the embedding, final norm and ``lm_head``); ``init`` is the source's coefficient at
step 0; ``drift = mean - init`` (signed: did the source gain weight?) and ``abs_drift = mean |c - init|`` (did its
columns move at all, even if in both directions?). A tied ``lm_head`` has no row of its own: it shares the
embedding's coefficients.

Plots return a :class:`matplotlib.figure.Figure` built without pyplot (no global state; works headless) and write
a PNG when given ``path``. In a notebook, run ``%matplotlib inline`` once so figures display.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from matplotlib.colors import Normalize, TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from torch import Tensor

from dam.adaptive.coefficients import read_coefficients
from dam.adaptive.layers import apply_transform
from dam.errors import DamError
from dam.evaluation.kinship import module_kind
from dam.training.run_dir import METRICS_FILE

# the layer names dam.evaluation.kinship.module_kind strips
_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")
# order of the usual projections inside a layer (others follow alphabetically)
_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_KINDS = ("embedding", "linear", "norm", "bias")
COLUMNS = [
    "tensor",
    "module",
    "kind",
    "layer",
    "source",
    "numel",
    "init",
    "mean",
    "std",
    "min",
    "max",
    "drift",
    "abs_drift",
    "trainable",
]


# ----------------------------------------------------------------------------------------------------- loading


def source_names(metadata: dict[str, Any]) -> list[str]:
    """Short source labels: the run config's ``models[i].name`` when recorded, else the model folder or Hub id."""
    models = (metadata.get("training") or {}).get("models") or []
    names = [m.get("name") for m in models if isinstance(m, dict)]
    if len(names) == len(metadata["sources"]) and all(names):
        return [str(n) for n in names]
    short = [Path(s).name for s in metadata["sources"]]
    return short if len(set(short)) == len(short) else list(metadata["sources"])


def tensor_module(name: str) -> str:
    """``model.layers.3.self_attn.q_proj.weight`` -> ``self_attn.q_proj``; biases keep ``.bias``."""
    return module_kind(name).removesuffix(".weight")


def tensor_layer(name: str) -> int | None:
    """The decoder layer index in a tensor name, or None outside the layers."""
    match = _LAYER.search(name)
    return int(match.group(1)) if match else None


def transformed_coefficients(run_or_file: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """``(merge coefficients by tensor name, metadata)``: the file's raw coefficients through the run's transform,
    as float32 ``(N, ...)`` tensors, ordered embedding, layers (ascending), then the rest."""
    tensors, metadata = read_coefficients(run_or_file)
    transform = metadata["options"]["transform"]
    order = sorted(tensors, key=lambda name: _tensor_order(name, metadata["tensors"].get(name, {}).get("kind")))
    return {name: apply_transform(tensors[name].float(), transform) for name in order}, metadata


def _kind(name: str, metadata_kind: str | None) -> str:
    return "bias" if name.endswith(".bias") else str(metadata_kind)


def _tensor_order(name: str, metadata_kind: str | None) -> tuple[int, int, int, str]:
    """Sort key: embedding first, then layer by layer (projections in the usual order), then final norm/lm_head."""
    layer = tensor_layer(name)
    kind = _kind(name, metadata_kind)
    group = 0 if layer is None and kind == "embedding" else 1 if layer is not None else 2
    return group, layer if layer is not None else -1, _module_rank(tensor_module(name), kind), name


def _module_rank(module: str, kind: str) -> int:
    leaf = module.removesuffix(".bias").rsplit(".", 1)[-1]
    rank = _PROJECTIONS.index(leaf) if leaf in _PROJECTIONS else len(_PROJECTIONS)
    return 2 * rank + (kind == "bias")


def load_coefficient_table(run_or_file: str | Path) -> pd.DataFrame:
    """One row per (merged tensor, source) with the statistics of its merge coefficients (columns: ``COLUMNS``).

    ``run_or_file``: a training run folder or a coefficients file. The statistics are over the transformed
    coefficient vector of that tensor and source (``std`` is the population std).
    """
    coefficients, metadata = transformed_coefficients(run_or_file)
    sources = source_names(metadata)
    init = metadata["init_weights"]
    rows = []
    for name, values in coefficients.items():
        info = metadata["tensors"].get(name, {})
        flat = values.reshape(values.shape[0], -1).double()  # (N, numel)
        for i, source in enumerate(sources):
            row = flat[i]
            rows.append(
                {
                    "tensor": name,
                    "module": tensor_module(name),
                    "kind": _kind(name, info.get("kind")),
                    "layer": tensor_layer(name),
                    "source": source,
                    "numel": row.numel(),
                    "init": float(init[i]),
                    "mean": float(row.mean()),
                    "std": float(row.std(correction=0)),
                    "min": float(row.min()),
                    "max": float(row.max()),
                    "drift": float(row.mean()) - float(init[i]),
                    "abs_drift": float((row - init[i]).abs().mean()),
                    "trainable": bool(info.get("trainable", True)),
                }
            )
    table = pd.DataFrame(rows, columns=COLUMNS)
    table["layer"] = table["layer"].astype("Int64")
    table["source"] = pd.Categorical(table["source"], categories=sources, ordered=True)
    return table


def summarise_coefficients(table: pd.DataFrame, by: tuple[str, ...] = ("kind", "source")) -> pd.DataFrame:
    """Pool the per-tensor rows of :func:`load_coefficient_table` into groups (default: kind x source).

    Pooled exactly over every coefficient of the group: ``mean = sum n_t m_t / sum n_t``, ``std`` from
    ``sum n_t (s_t^2 + m_t^2) / sum n_t - mean^2``, ``min``/``max`` over the group, ``drift = mean - init``
    (``init`` is per source, so ``by`` should keep ``source``) and ``abs_drift`` numel-weighted. When every kind is
    trained, the kind x source rows equal the training log's ``coefficients/<kind>/<source>/*`` statistics at the
    last step (the log covers trainable coefficients only: filter on ``trainable`` to compare otherwise).
    """
    by = list(by)
    work = table.assign(
        _sum=table["numel"] * table["mean"],
        _sq=table["numel"] * (table["std"] ** 2 + table["mean"] ** 2),
        _abs=table["numel"] * table["abs_drift"],
        _init=table["numel"] * table["init"],
    )
    grouped = work.groupby(by, observed=True, sort=False)
    out = grouped.agg(
        numel=("numel", "sum"),
        _sum=("_sum", "sum"),
        _sq=("_sq", "sum"),
        _abs=("_abs", "sum"),
        _init=("_init", "sum"),
        min=("min", "min"),
        max=("max", "max"),
    )
    out["mean"] = out["_sum"] / out["numel"]
    out["std"] = np.sqrt(np.maximum(out["_sq"] / out["numel"] - out["mean"] ** 2, 0.0))
    out["init"] = out["_init"] / out["numel"]
    out["drift"] = out["mean"] - out["init"]
    out["abs_drift"] = out["_abs"] / out["numel"]
    return out[["numel", "init", "mean", "std", "min", "max", "drift", "abs_drift"]].reset_index()


def load_metrics(run: str | Path) -> pd.DataFrame:
    """``metrics.jsonl`` of a run folder as one row per optimizer step, sorted by step.

    A resumed run appends the steps after its checkpoint again; the last record of each step is kept (the one the
    finished run's coefficients descend from).
    """
    path = Path(run).expanduser()
    path = path / METRICS_FILE if path.is_dir() else path
    if not path.is_file():
        raise DamError(f"run {run}: no {METRICS_FILE} (is it a training run folder?)")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise DamError(f"{path}: line {number} is not JSON ({e})") from e
    if not records or any("step" not in r for r in records):
        raise DamError(f"{path}: no records with a 'step' key")
    metrics = pd.DataFrame(records).drop_duplicates("step", keep="last").sort_values("step")
    return metrics.reset_index(drop=True)


# ------------------------------------------------------------------------------------------------------ plots


def _grid(n: int, columns: int, size: tuple[float, float]) -> tuple[Figure, list[Any]]:
    """A figure with ``n`` panels on a grid ``columns`` wide; unused cells are removed."""
    columns = max(1, min(columns, n))
    rows = math.ceil(n / columns)
    fig = Figure(figsize=(size[0] * columns, size[1] * rows), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False).ravel().tolist()
    for ax in axes[n:]:
        ax.remove()
    return fig, axes[:n]


def _save(fig: Figure, path: str | Path | None) -> Figure:
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
    return fig


def _sources(table: pd.DataFrame) -> list[str]:
    """Source labels in the run's order (the table's categorical order) or in order of appearance."""
    column = table["source"]
    return list(column.cat.categories) if isinstance(column.dtype, pd.CategoricalDtype) else list(column.unique())


def _check_columns(table: pd.DataFrame, columns: list[str], what: str) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise DamError(f"{what}: the table has no column(s) {', '.join(missing)}")


def plot_coefficient_heatmap(
    table: pd.DataFrame,
    value: str = "mean",
    *,
    center: float | None = None,
    columns: int = 4,
    annotate: bool | None = None,
    path: str | Path | None = None,
) -> Figure:
    """Layers x sources heat maps of ``value`` (a column of :func:`load_coefficient_table`), one panel per module.

    Panels: every module found in the layers (``self_attn.q_proj``, ``mlp.down_proj``, ``input_layernorm``...),
    then one panel "outside the layers" whose rows are the other modules (embedding, final norm, ``lm_head``). One
    colour scale for all panels. ``center`` switches to a diverging map symmetric about it (default 0 for
    ``drift``, else a sequential map); ``annotate`` writes the values in the cells (default: when at most 16 rows).
    """
    _check_columns(table, ["module", "layer", "source", value], "plot_coefficient_heatmap")
    if table.empty:
        raise DamError("plot_coefficient_heatmap: the table is empty")
    if center is None and value == "drift":
        center = 0.0
    sources = _sources(table)
    in_layers = table[table["layer"].notna()]
    outside = table[table["layer"].isna()]
    panels: list[tuple[str, pd.DataFrame]] = [
        (module, group.pivot_table(index="layer", columns="source", values=value, aggfunc="mean", observed=False))
        for module, group in in_layers.groupby("module", sort=False)
    ]
    if not outside.empty:
        pivot = outside.pivot_table(index="module", columns="source", values=value, aggfunc="mean", observed=False)
        panels.append(("outside the layers", pivot.reindex(list(dict.fromkeys(outside["module"])))))
    panels = [(title, pivot.reindex(columns=sources)) for title, pivot in panels]

    values = table[value].to_numpy(dtype=float)
    lo, hi = float(np.nanmin(values)), float(np.nanmax(values))
    norm: Normalize
    if center is not None:
        half = max(abs(lo - center), abs(hi - center)) or 1e-12
        norm, cmap = TwoSlopeNorm(center, center - half, center + half), "RdBu_r"
    else:
        norm, cmap = Normalize(lo, hi if hi > lo else lo + 1e-12), "viridis"
    rows = max(len(pivot) for _, pivot in panels)
    annotate = rows <= 16 if annotate is None else annotate
    height = 0.9 + 0.22 * min(max(rows, 3), 16) + 0.1 * max(rows - 16, 0)  # 32 layers: 6.9 in per panel
    width = 0.55 * len(sources) + 1.6
    fig, axes = _grid(len(panels), columns, (width, height))
    image = None
    for ax, (title, pivot) in zip(axes, panels, strict=True):
        data = pivot.to_numpy(dtype=float)
        image = ax.imshow(data, aspect="auto", cmap=cmap, norm=norm, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.set_xticks(range(len(sources)), sources, rotation=45, ha="right", fontsize=8)
        ticks = list(range(len(pivot)))
        if len(ticks) > 16:
            ticks = ticks[:: math.ceil(len(ticks) / 16)]
        ax.set_yticks(ticks, [str(pivot.index[t]) for t in ticks], fontsize=8)
        if title != "outside the layers":
            ax.set_ylabel("layer", fontsize=8)
        elif len(pivot) < rows:  # a few rows: a shorter panel (at least a quarter of the others) than the layers'
            ax.set_box_aspect(height / width * max(len(pivot) / rows, 0.25))
        if annotate:
            for (r, c), v in np.ndenumerate(data):
                if not np.isnan(v):
                    shade = float(norm(v))  # 0..1 along the colour map: dark at viridis' low end, RdBu's ends
                    dark = shade < 0.45 if center is None else abs(shade - 0.5) > 0.3
                    ax.text(c, r, f"{v:.3g}", ha="center", va="center", fontsize=6, color="w" if dark else "k")
    fig.colorbar(image, ax=axes, label=value, shrink=0.8)
    fig.suptitle(f"DAM coefficients: {value} per layer and source")
    return _save(fig, path)


def plot_coefficient_distributions(
    run_or_file: str | Path, *, bins: int = 60, columns: int = 4, path: str | Path | None = None
) -> Figure:
    """Histograms of every merge coefficient, one panel per kind (embedding, linear, norm, bias), one line per
    source; the dashed lines mark each source's init value. Reads the coefficients file (not the table), so the
    spread within tensors shows, not only their means."""
    coefficients, metadata = transformed_coefficients(run_or_file)
    sources = source_names(metadata)
    by_kind: dict[str, list[Tensor]] = {}
    for name, values in coefficients.items():
        kind = _kind(name, metadata["tensors"].get(name, {}).get("kind"))
        by_kind.setdefault(kind, []).append(values.reshape(values.shape[0], -1))
    kinds = [k for k in _KINDS if k in by_kind] + sorted(set(by_kind) - set(_KINDS))
    fig, axes = _grid(len(kinds), columns, (4.2, 3.0))
    colours = [f"C{i % 10}" for i in range(len(sources))]
    init_weights = metadata["init_weights"]
    inits = [(init_weights[0], "k")] if len(set(init_weights)) == 1 else list(zip(init_weights, colours, strict=True))
    for ax, kind in zip(axes, kinds, strict=True):
        values = torch.cat(by_kind[kind], dim=1).numpy()  # (N, coefficients of this kind)
        lo, hi = float(values.min()), float(values.max())
        edges = np.linspace(lo, hi if hi > lo else lo + 1e-6, bins + 1)
        for i, source in enumerate(sources):
            ax.hist(values[i], bins=edges, histtype="step", color=colours[i], label=source, linewidth=1.2)
        for init, colour in inits:
            ax.axvline(init, color=colour, linestyle="--", linewidth=0.8)
        ax.set_title(f"{kind} ({values.shape[1]:,} per source)", fontsize=9)
        ax.set_xlabel("coefficient", fontsize=8)
        ax.set_ylabel("count", fontsize=8)
        ax.tick_params(labelsize=8)
    axes[0].legend(fontsize=8)
    fig.suptitle("DAM coefficients: distribution per kind and source (dashed: init)")
    return _save(fig, path)


def plot_loss_curves(metrics: pd.DataFrame, *, columns: int = 3, path: str | Path | None = None) -> Figure:
    """One panel per loss term (``loss``, ``loss/kl``, ``loss/similarity``...), then ``grad_norm`` and ``lr`` when
    logged, against the optimizer step (:func:`load_metrics`)."""
    _check_columns(metrics, ["step"], "plot_loss_curves")
    names = [c for c in metrics.columns if c == "loss"] + [c for c in metrics.columns if c.startswith("loss/")]
    names += [c for c in ("grad_norm", "lr") if c in metrics.columns]
    if not names:
        raise DamError("plot_loss_curves: the metrics have no loss columns")
    fig, axes = _grid(len(names), columns, (4.0, 2.8))
    for ax, name in zip(axes, names, strict=True):
        series = metrics[["step", name]].dropna()
        ax.plot(series["step"], series[name], marker="." if len(series) <= 50 else None)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle("DAM training")
    return _save(fig, path)
