"""What a DAM run learned: its coefficients as a tidy table, its metrics, and plots of both.

A run folder (or a bare ``dam_coefficients.safetensors``) holds the raw coefficients of every merged tensor, shape
``(N, in)`` for linear and embedding weights (``(N, out + in)`` under ``row_column``, ``(N, 1)`` under ``tensor``),
``(N, size)`` for norms, ``(N, out)`` or ``(N, 1)`` for biases, plus metadata naming the sources, the transform and
the init. :func:`load_coefficient_table` applies the transform (the values the merge actually used,
``W = sum_i W_i diag(c_i)``) and reduces each source's vector, per part, to one row::

    tensor  module            kind    part    layer  source      numel  init   mean   std    min    max    drift  ...
    model.layers.0.self_attn.q_proj.weight
            self_attn.q_proj  linear  column  0      arithmetic  64     0.333  0.341  0.004  0.330  0.352  0.008  ...

``module`` is the tensor name without the layer index, ``model.`` prefix and ``.weight`` suffix (biases keep
``.bias``); ``kind`` is ``linear``/``embedding``/``norm``/``bias`` as in the training logs; ``part`` is ``column``,
``row`` (the row scales of ``row_column``, apart from its columns), ``element`` (norms, per-output biases) or
``scalar`` (``tensor`` granularity); ``layer`` is the decoder layer index (``<NA>`` for the embedding, final norm
and ``lm_head``); ``init`` is the source's coefficient at step 0 (1 for row scales); ``drift = mean - init``
(signed: did the source gain weight?) and ``abs_drift = mean |c - init|`` (did its columns move at all, even if in
both directions?); ``trainable`` and ``derived`` (the base's coefficient ``1 - sum_k lambda_k`` of the
task-vector form, ``dam.transform: task_vector``, whose plots show the lambdas). A tied ``lm_head`` has no row of
its own: it shares the embedding's coefficients.

Plots return a :class:`matplotlib.figure.Figure` built without pyplot (no global state; works headless) and write
a PNG when given ``path``. In a notebook, run ``%matplotlib inline`` once so figures display.
"""

from __future__ import annotations

import contextlib
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
from dam.adaptive.init import basis_weights, relative_to, task_vector_base
from dam.adaptive.layers import merge, row_count, transform_coefficients
from dam.errors import DamError
from dam.evaluation.kinship import module_kind
from dam.io.checkpoint import CheckpointReader
from dam.training.run_dir import ALIGN_LAYER_PREFIX, METRICS_FILE

# the layer names dam.evaluation.kinship.module_kind strips
_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")
# order of the usual projections inside a layer (others follow alphabetically)
_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_KINDS = ("embedding", "linear", "norm", "bias")
PARTS = ("column", "row", "element", "scalar")
COLUMNS = [
    "tensor",
    "module",
    "kind",
    "part",
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
    "derived",
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


def coefficient_parts(run_or_file: str | Path) -> tuple[dict[str, dict[str, Tensor]], dict[str, Any]]:
    """``(merge coefficients by tensor name and part, metadata)``: the file's raw coefficients through the run's
    transform (row scales untransformed, the task-vector form's base coefficient derived), as float32
    ``(N, count)`` tensors, tensors ordered embedding, layers (ascending), then the rest.

    Parts (:data:`PARTS`): ``column`` (a linear or embedding weight's per-column coefficients), ``row`` (the row
    scales of ``dam.granularity: row_column``, split off the ``(N, out + in)`` vector by the weight's shape in the
    base checkpoint's header), ``element`` (norm weights, per-output biases) and ``scalar`` (``tensor``
    granularity, scalar biases)."""
    tensors, metadata = read_coefficients(run_or_file)
    options = metadata["options"]
    transform, granularity = options["transform"], options.get("granularity", "column")
    base = task_vector_base(metadata)
    order = _ordered(tensors, metadata)
    out: dict[str, dict[str, Tensor]] = {}
    with contextlib.ExitStack() as stack:
        reader = None
        if granularity == "row_column":  # the split of (out + in) needs the weights' shapes
            reader = stack.enter_context(CheckpointReader(metadata["base_model"]))
        for name in order:
            raw = tensors[name].float()
            kind = _kind(name, metadata["tensors"].get(name, {}).get("kind"))
            if kind == "bias":  # biases follow dam.bias, not dam.granularity
                part = "scalar" if options["bias"] == "scalar" else "element"
            else:
                part = "scalar" if granularity == "tensor" else "element" if kind == "norm" else "column"
            rows = 0
            if reader is not None and part == "column":
                rows = row_count((raw.shape[0], *reader.shape(name)), raw.shape)
            merged = transform_coefficients(raw, transform, rows, base)
            out[name] = {"row": merged[:, :rows], "column": merged[:, rows:]} if rows else {part: merged}
    return out, metadata


def _kind(name: str, metadata_kind: str | None) -> str:
    return "bias" if name.endswith(".bias") else str(metadata_kind)


def _ordered(tensors: dict[str, Tensor], metadata: dict[str, Any]) -> list[str]:
    """The coefficient file's tensor names in model order (:func:`_tensor_order`)."""
    return sorted(tensors, key=lambda name: _tensor_order(name, metadata["tensors"].get(name, {}).get("kind")))


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
    """One row per (merged tensor, part, source) with the statistics of its merge coefficients (columns:
    ``COLUMNS``).

    ``run_or_file``: a training run folder or a coefficients file. The statistics are over the transformed
    coefficients of that tensor, part (:func:`coefficient_parts`: ``row`` and ``column`` apart for ``row_column``)
    and source (``std`` is the population std). ``init`` is the source's init coefficient (1 for row scales).
    ``derived`` marks the base's coefficient in the task-vector form (``dam.transform: task_vector``): ``1 -
    sum_k lambda_k``, not trained; the other sources' rows of such a run are the lambdas. In the task-vector basis
    (``dam.basis: task_vectors``) the base's rows are its own scale (init: the sum of the init weights) and every
    other source's the weights of its task vector.
    """
    coefficients, metadata = coefficient_parts(run_or_file)
    sources = source_names(metadata)
    relative = relative_to(metadata)
    init = basis_weights(metadata["init_weights"], "weights" if relative is None else "task_vectors", relative)
    base = task_vector_base(metadata)
    rows = []
    for name, parts in coefficients.items():
        info = metadata["tensors"].get(name, {})
        for part, values in parts.items():
            flat = values.double()  # (N, count)
            for i, source in enumerate(sources):
                row, start = flat[i], 1.0 if part == "row" else float(init[i])
                rows.append(
                    {
                        "tensor": name,
                        "module": tensor_module(name),
                        "kind": _kind(name, info.get("kind")),
                        "part": part,
                        "layer": tensor_layer(name),
                        "source": source,
                        "numel": row.numel(),
                        "init": start,
                        "mean": float(row.mean()),
                        "std": float(row.std(correction=0)),
                        "min": float(row.min()),
                        "max": float(row.max()),
                        "drift": float(row.mean()) - start,
                        "abs_drift": float((row - start).abs().mean()),
                        "trainable": bool(info.get("trainable", True)),
                        "derived": i == base,
                    }
                )
    table = pd.DataFrame(rows, columns=COLUMNS)
    table["layer"] = table["layer"].astype("Int64")
    table["source"] = pd.Categorical(table["source"], categories=sources, ordered=True)
    return table


def summarise_coefficients(table: pd.DataFrame, by: tuple[str, ...] = ("kind", "part", "source")) -> pd.DataFrame:
    """Pool the per-tensor rows of :func:`load_coefficient_table` into groups (default: kind x part x source, so
    that a ``row_column`` run's row scales are not averaged with its column coefficients).

    Pooled exactly over every coefficient of the group: ``mean = sum n_t m_t / sum n_t``, ``std`` from
    ``sum n_t (s_t^2 + m_t^2) / sum n_t - mean^2``, ``min``/``max`` over the group, ``drift = mean - init``
    (``init`` is per source and part, so ``by`` should keep ``source``) and ``abs_drift`` numel-weighted. When every
    kind is trained, the rows grouped ``by=("kind", "source")`` equal the training log's
    ``coefficients/<kind>/<source>/*`` statistics at the last step (the log covers trainable coefficients only:
    filter on ``trainable`` to compare otherwise).
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


SHIFT_COLUMNS = ["tensor", "module", "kind", "layer", "numel", "base_norm", "rescale", "task", "task_arithmetic"]


def merge_shift(run_or_file: str | Path) -> pd.DataFrame:
    """Where the merge moved each tensor away from the base: one row per merged tensor (columns
    :data:`SHIFT_COLUMNS`), reading the base and every source tensor by tensor.

    With ``a_i`` the effective coefficient of source i on each element (``r_i c_i^T`` under ``row_column``, the
    column, element or scalar coefficients broadcast otherwise; the transform applied) and ``tau_i = W_i -
    W_base``, the merge is ``W = sum_i a_i * W_i = W_base + (sum_i a_i - 1) * W_base + sum_i a_i * tau_i`` (``*``
    elementwise). ``rescale`` is the norm of the second term and ``task`` of the third, both relative to
    ``||W_base||`` (Frobenius): how much of the move rescales the base itself and how much adds the sources'
    differences from it. ``task_arithmetic`` is ``||sum_i tau_i|| / ||W_base||``, the move of task arithmetic at
    lambda 1, for scale. The coefficients of a merge that only reweights the task vectors sum to 1 on every element
    (``rescale`` 0, as in the task-vector form). In the task-vector basis (``dam.basis: task_vectors``) the base's
    own coefficients ``a_base`` are the whole rescaling (``rescale`` is the norm of ``(a_base - 1) * W_base``)
    and every other source's weight its task vector (``task``). A learned ``rescale`` far above
    ``task_arithmetic`` means the coefficients rescaled the base's weights more than they merged the sources
    (measured on SmolLM2-135M: docs/real-family.md). ``base_norm`` is ``||W_base||`` (weights of a pooled mean:
    :func:`total_shift`); a base tensor of zeros has no relative move, and its row holds NaN there and in the
    three ratios."""
    tensors, metadata = read_coefficients(run_or_file)
    options = metadata["options"]
    transform = options["transform"]
    base = task_vector_base(metadata)
    relative = relative_to(metadata)
    order = _ordered(tensors, metadata)
    sources = metadata["sources"]
    models = dict.fromkeys([metadata["base_model"], *sources])  # the base is usually a source too: read it once
    rows = []
    with contextlib.ExitStack() as stack:
        readers = {m: stack.enter_context(CheckpointReader(m)) for m in models}
        for name in order:
            weights = {m: reader.get(name, dtype=torch.float32) for m, reader in readers.items()}
            w_base = weights[metadata["base_model"]]
            raw = tensors[name].float()
            count = row_count((len(sources), *w_base.shape), raw.shape)
            coefficients = transform_coefficients(raw, transform, count, base)
            own = coefficients
            if relative is not None:  # only the base's own coefficients multiply W_base
                own = torch.zeros_like(coefficients)
                own[relative] = coefficients[relative]
            rescaled = merge((w_base for _ in sources), own, count) - w_base
            taus = [weights[m] - w_base for m in sources]
            norm = float(w_base.norm()) or math.nan  # a zero tensor (a bias) has no relative move
            rows.append(
                {
                    "tensor": name,
                    "module": tensor_module(name),
                    "kind": _kind(name, metadata["tensors"].get(name, {}).get("kind")),
                    "layer": tensor_layer(name),
                    "numel": w_base.numel(),
                    "base_norm": norm,
                    "rescale": float(rescaled.norm()) / norm,
                    "task": float(merge(taus, coefficients, count).norm()) / norm,
                    "task_arithmetic": float(sum(taus).norm()) / norm,
                }
            )
    table = pd.DataFrame(rows, columns=SHIFT_COLUMNS)
    table["layer"] = table["layer"].astype("Int64")
    return table


def total_shift(table: pd.DataFrame) -> pd.Series:
    """The whole model's ``rescale``, ``task`` and ``task_arithmetic`` from :func:`merge_shift`'s rows: each
    move's norm over every tensor at once relative to the base's, ``sqrt(sum_t ||W_t|| ^ 2 x_t ^ 2 / sum_t ||W_t||
    ^ 2)`` (tensors whose base is zero left out)."""
    shown = table.dropna(subset=["base_norm"])
    weights = shown["base_norm"] ** 2
    columns = ["rescale", "task", "task_arithmetic"]
    return np.sqrt((shown[columns] ** 2).mul(weights, axis=0).sum() / weights.sum())


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


def _shown(table: pd.DataFrame) -> tuple[pd.DataFrame, bool]:
    """``(rows to plot, task-vector form?)``: a task-vector run's derived base coefficients are left out, so the
    plots show its lambdas (the base keeps weight 1 in ``W_base + sum_k lambda_k tau_k``)."""
    if "derived" in table.columns and table["derived"].any():
        return table[~table["derived"].astype(bool)], True
    return table, False


def _scale_groups(table: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """The table split by colour scale: the merge coefficients, then (``row_column``) the row scales, which start
    at 1 whatever the init and would squash the coefficients' colours on a shared scale."""
    if "part" not in table.columns:
        return [("", table)]
    rows = table["part"] == "row"
    return [(label, part) for label, part in [("", table[~rows]), ("row scales", table[rows])] if not part.empty]


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
    colour scale for all panels, except that a ``row_column`` run's row scales get panels of their own (titled
    ``... (row scales)``) after the coefficients' and a colour scale of their own. A task-vector run
    (``dam.transform: task_vector``) shows its lambdas: the derived base column is left out. ``center`` switches
    to a diverging map symmetric about it (default 0 for ``drift``, else a sequential map); ``annotate`` writes
    the values in the cells (default: when at most 16 rows).
    """
    _check_columns(table, ["module", "layer", "source", value], "plot_coefficient_heatmap")
    if table.empty:
        raise DamError("plot_coefficient_heatmap: the table is empty")
    if center is None and value == "drift":
        center = 0.0
    shown, task_vector = _shown(table)
    sources = [s for s in _sources(table) if s in set(shown["source"])]
    panels: list[tuple[str, pd.DataFrame, int]] = []  # (title, layers-or-modules x sources, colour scale)
    groups = _scale_groups(shown)
    for g, (label, group) in enumerate(groups):
        suffix = f" ({label})" if label else ""
        in_layers = group[group["layer"].notna()]
        outside = group[group["layer"].isna()]
        for module, part in in_layers.groupby("module", sort=False):
            pivot = part.pivot_table(index="layer", columns="source", values=value, aggfunc="mean", observed=False)
            panels.append((module + suffix, pivot, g))
        if not outside.empty:
            pivot = outside.pivot_table(index="module", columns="source", values=value, aggfunc="mean", observed=False)
            panels.append(("outside the layers" + suffix, pivot.reindex(list(dict.fromkeys(outside["module"]))), g))
    panels = [(title, pivot.reindex(columns=sources), g) for title, pivot, g in panels]

    scales: list[tuple[Normalize, str]] = []
    for _, group in groups:
        values = group[value].to_numpy(dtype=float)
        lo, hi = float(np.nanmin(values)), float(np.nanmax(values))
        if center is not None:
            half = max(abs(lo - center), abs(hi - center)) or 1e-12
            scales.append((TwoSlopeNorm(center, center - half, center + half), "RdBu_r"))
        else:
            scales.append((Normalize(lo, hi if hi > lo else lo + 1e-12), "viridis"))
    rows = max(len(pivot) for _, pivot, _ in panels)
    annotate = rows <= 16 if annotate is None else annotate
    height = 0.9 + 0.22 * min(max(rows, 3), 16) + 0.1 * max(rows - 16, 0)  # 32 layers: 6.9 in per panel
    width = 0.55 * len(sources) + 1.6
    fig, axes = _grid(len(panels), columns, (width, height))
    images: dict[int, Any] = {}
    for ax, (title, pivot, g) in zip(axes, panels, strict=True):
        norm, cmap = scales[g]
        data = pivot.to_numpy(dtype=float)
        images[g] = ax.imshow(data, aspect="auto", cmap=cmap, norm=norm, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.set_xticks(range(len(sources)), sources, rotation=45, ha="right", fontsize=8)
        ticks = list(range(len(pivot)))
        if len(ticks) > 16:
            ticks = ticks[:: math.ceil(len(ticks) / 16)]
        ax.set_yticks(ticks, [str(pivot.index[t]) for t in ticks], fontsize=8)
        if not title.startswith("outside the layers"):
            ax.set_ylabel("layer", fontsize=8)
        elif len(pivot) < rows:  # a few rows: a shorter panel (at least a quarter of the others) than the layers'
            ax.set_box_aspect(height / width * max(len(pivot) / rows, 0.25))
        if annotate:
            for (r, c), v in np.ndenumerate(data):
                if not np.isnan(v):
                    shade = float(norm(v))  # 0..1 along the colour map: dark at viridis' low end, RdBu's ends
                    dark = shade < 0.45 if center is None else abs(shade - 0.5) > 0.3
                    ax.text(c, r, f"{v:.3g}", ha="center", va="center", fontsize=6, color="w" if dark else "k")
    for g, (label, _) in enumerate(groups):
        group_axes = [ax for ax, (_, _, k) in zip(axes, panels, strict=True) if k == g]
        fig.colorbar(images[g], ax=group_axes, label=f"{value} ({label})" if label else value, shrink=0.8)
    if task_vector:
        fig.suptitle(f"AdaMerging lambdas: {value} per layer and task vector (the base keeps weight 1)")
    else:
        fig.suptitle(f"DAM coefficients: {value} per layer and source")
    return _save(fig, path)


def plot_coefficient_distributions(
    run_or_file: str | Path, *, bins: int = 60, columns: int = 4, path: str | Path | None = None
) -> Figure:
    """Histograms of every merge coefficient, one panel per kind (embedding, linear, norm, bias), one line per
    source; the dashed lines mark each source's init value. A ``row_column`` run's row scales get panels of their
    own (``linear row scales``...; init 1); a task-vector run's panels show the lambdas (the derived base
    coefficient is left out). Reads the coefficients file (not the table), so the spread within tensors shows,
    not only their means."""
    coefficients, metadata = coefficient_parts(run_or_file)
    base = task_vector_base(metadata)
    shown = [i for i in range(len(metadata["sources"])) if i != base]
    sources = [source_names(metadata)[i] for i in shown]
    init_weights = [metadata["init_weights"][i] for i in shown]
    by_kind: dict[str, list[Tensor]] = {}
    for name, parts in coefficients.items():
        kind = _kind(name, metadata["tensors"].get(name, {}).get("kind"))
        for part, values in parts.items():
            by_kind.setdefault(f"{kind} row scales" if part == "row" else kind, []).append(values[shown])
    order = [k for kind in _KINDS for k in (kind, f"{kind} row scales")]
    kinds = [k for k in order if k in by_kind] + sorted(set(by_kind) - set(order))
    fig, axes = _grid(len(kinds), columns, (4.2, 3.0))
    colours = [f"C{i % 10}" for i in range(len(sources))]
    inits = [(init_weights[0], "k")] if len(set(init_weights)) == 1 else list(zip(init_weights, colours, strict=True))
    for ax, kind in zip(axes, kinds, strict=True):
        values = torch.cat(by_kind[kind], dim=1).numpy()  # (sources shown, coefficients of this kind)
        lo, hi = float(values.min()), float(values.max())
        edges = np.linspace(lo, hi if hi > lo else lo + 1e-6, bins + 1)
        for i, source in enumerate(sources):
            ax.hist(values[i], bins=edges, histtype="step", color=colours[i], label=source, linewidth=1.2)
        for init, colour in [(1.0, "k")] if kind.endswith("row scales") else inits:
            ax.axvline(init, color=colour, linestyle="--", linewidth=0.8)
        ax.set_title(f"{kind} ({values.shape[1]:,} per source)", fontsize=9)
        ax.set_xlabel("lambda" if base is not None else "coefficient", fontsize=8)
        ax.set_ylabel("count", fontsize=8)
        ax.tick_params(labelsize=8)
    axes[0].legend(fontsize=8)
    if base is not None:
        fig.suptitle("AdaMerging lambdas: distribution per kind and task vector (dashed: init)")
    else:
        fig.suptitle("DAM coefficients: distribution per kind and source (dashed: init)")
    return _save(fig, path)


def layer_means(table: pd.DataFrame) -> pd.DataFrame:
    """Mean trained coefficient per (layer, source), pooled over the layer's tensors by size: rows ``layer 0``,
    ``layer 1``... in model order, with the tensors outside the layers (embedding, final norm, ``lm_head``) one row
    each; columns the sources. A ``row_column`` run's row scales are pooled apart, in a row ``layer 0 rows``
    after each layer's; a task-vector run's columns are its lambdas (the derived base is left out).
    ``table``: :func:`load_coefficient_table`."""
    shown, _ = _shown(table[table["trainable"]])
    rows = shown["part"] == "row" if "part" in shown.columns else pd.Series(False, index=shown.index)
    labels = [
        (f"layer {int(layer)}" if pd.notna(layer) else module) + (" rows" if row else "")
        for layer, module, row in zip(shown["layer"], shown["module"], rows, strict=True)
    ]
    work = shown.assign(row=labels, weighted=shown["mean"] * shown["numel"])
    sums = work.groupby(["row", "source"], sort=False, observed=True)[["weighted", "numel"]].sum()
    means = (sums["weighted"] / sums["numel"]).unstack("source")

    names = list(dict.fromkeys(label.removesuffix(" rows") for label in labels))  # in table (model) order

    def rank(label: str) -> tuple[int, int, bool]:
        """Embedding, layers by index, the rest in model order; each row-scale row right after its own."""
        name = label.removesuffix(" rows")
        group = 1 if name.startswith("layer ") else 0 if "embed" in name else 2
        return group, int(name.split()[1]) if group == 1 else names.index(name), label.endswith(" rows")

    return means.reindex(sorted(dict.fromkeys(labels), key=rank))


def alignment_by_layer(metrics: pd.DataFrame) -> pd.DataFrame:
    """``loss.align``'s relative distance ``||h_l - g_l||^2 / ||g_l||^2`` per decoder layer over training, from
    :func:`load_metrics`: one row per logged step (index ``step``), one column per layer (0 = the first decoder
    layer's output, the last = after the final norm). A run trained without ``loss.align`` is a DamError."""
    columns = {c: int(c[len(ALIGN_LAYER_PREFIX) :]) for c in metrics.columns if c.startswith(ALIGN_LAYER_PREFIX)}
    if not columns:
        raise DamError("alignment_by_layer: the metrics have no per-layer alignment (the run had loss.align: 0)")
    table = metrics.set_index("step")[list(columns)].rename(columns=columns).dropna(how="all")
    table.columns.name = "layer"
    return table[sorted(table.columns)]


def plot_alignment(metrics: pd.DataFrame, *, path: str | Path | None = None) -> Figure:
    """A heat map of :func:`alignment_by_layer`: decoder layer against step, the colour the relative distance on a
    log scale (it falls by orders of magnitude as the merge learns), so a layer that stays misaligned while the
    others converge stands out."""
    from matplotlib.colors import LogNorm

    table = alignment_by_layer(metrics)
    values = table.to_numpy().T  # (layers, steps)
    positive = values[values > 0]
    fig = Figure(figsize=(min(3.0 + 0.25 * len(table), 14.0), 1.5 + 0.18 * values.shape[0]), layout="constrained")
    ax = fig.subplots()
    norm = LogNorm(positive.min(), positive.max()) if positive.size and positive.min() < positive.max() else None
    steps = table.index.to_numpy(dtype=float)  # cell edges halfway between logged steps
    middles = (steps[1:] + steps[:-1]) / 2 if len(steps) > 1 else np.array([])
    first = steps[0] - (middles[0] - steps[0] if middles.size else 0.5)
    last = steps[-1] + (steps[-1] - middles[-1] if middles.size else 0.5)
    x_edges = np.concatenate([[first], middles, [last]])
    y_edges = np.arange(values.shape[0] + 1) - 0.5
    image = ax.pcolormesh(x_edges, y_edges, values, cmap="magma", norm=norm)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step")
    ax.set_ylabel("decoder layer")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    fig.colorbar(image, ax=ax, label="||h - g||^2 / ||g||^2")
    ax.set_title("Layer-wise alignment with the teachers over training")
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
