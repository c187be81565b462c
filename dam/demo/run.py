"""The demo end to end (``dam demo run``): family, DAM, classic merges, evaluation, table and plot.

:func:`run_demo` does, in order:

1. build the demo family under ``root`` (:func:`dam.demo.family.build_demo`) unless ``root/models/build_report.json``
   exists;
2. train DAM with ``dam/demo/configs/dam.yaml`` (its ``data/demo/...`` paths moved under ``root``, ``output_dir`` set
   to ``out``, ``train.seed`` and ``data.seed`` set to ``seed``, then the caller's overrides); a finished run in
   ``out`` made with the same resolved config is reused, an unfinished one resumed from its checkpoint;
3. merge the experts with the classic methods of ``dam/demo/configs/merge/*.yaml`` into ``out/merges/<method>``
   (DARE's random drop seeded with ``seed``), reusing a merge made from the same config text;
4. evaluate the base, the experts, the classic merges and the DAM merge on every task's validation and test
   splits (settings are chosen on validation, e.g. by ``benchmarks/quality.py``; the figures are reported on test);
5. write ``out/results.json`` (every model x task on both splits, the goal checks on test, the experts' kinship,
   timings),
   ``out/results.png`` (per-task accuracy bars and the learned coefficients per layer and source) and
   ``out/coefficients.png`` (the per-module heat maps of :func:`dam.evaluation.analysis.plot_coefficient_heatmap`).

Nothing in ``out`` is replaced without ``force``: a folder holding anything other than a run of the same config
is refused before any work starts, and ``force`` deletes it first.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from dam.errors import DamError

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parent / "configs"  # package data: the demo runs from any working directory
DAM_CONFIG = CONFIG_DIR / "dam.yaml"
MERGE_CONFIG_DIR = CONFIG_DIR / "merge"
CLASSIC_METHODS = ("linear", "task_arithmetic", "ties", "dare_ties")
GENERIC = "generic"
# the prefix of the family's paths in the demo configs, replaced by ``root``
_CONFIG_ROOT = ("data", "demo")
# --quick: a smoke run (seconds): few DAM steps on few examples, a short evaluation
_QUICK_OVERRIDES = ("train.max_steps=6", "train.warmup_steps=1", "train.log_every=2", "data.num_examples=48")
QUICK_EVAL_LIMIT = 20


def rebase(path: str, root: str | Path) -> str:
    """``path`` with a leading ``data/demo`` (or ``./data/demo``) replaced by ``root``; other paths as given."""
    parts = Path(path).parts
    if parts[: len(_CONFIG_ROOT)] != _CONFIG_ROOT:
        return path
    return str(Path(root).joinpath(*parts[len(_CONFIG_ROOT) :]))


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DamError(f"demo config {path} not found (it is package data of dam.demo: reinstall dam)")
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise DamError(f"demo config {path}: expected a mapping of config keys")
    return data


def dam_config(
    root: str | Path, out: str | Path, *, seed: int = 0, overrides: Sequence[str] = (), quick: bool = False
) -> Any:
    """The DAM run config of the demo: ``dam/demo/configs/dam.yaml`` pointed at ``root`` and ``out``, seeded with
    ``seed``, then ``overrides`` (``key=value``, they win). Returns a :class:`dam.training.config.DAMConfig`."""
    from dam.training.config import load_config

    data = _read_yaml(DAM_CONFIG)
    moved = [f"base_model={rebase(data['base_model'], root)}"]
    for m in data["models"]:
        moved += [f"models.{m['name']}.model={rebase(m['model'], root)}"]
        moved += [f"models.{m['name']}.dataset={rebase(m['dataset'], root)}"]
    run = [f"output_dir={out}", f"train.seed={seed}", f"data.seed={seed}"]
    return load_config(DAM_CONFIG, [*moved, *run, *(_QUICK_OVERRIDES if quick else ()), *overrides])


def merge_config_text(method: str, root: str | Path, seed: int) -> str:
    """The mergekit YAML of ``dam/demo/configs/merge/<method>.yaml`` with its model paths moved under ``root``, headed
    by the seed it is run with (so a merge made with another DARE seed is not mistaken for this one)."""
    data = _read_yaml(MERGE_CONFIG_DIR / f"{method}.yaml")
    if data.get("base_model"):
        data["base_model"] = rebase(data["base_model"], root)
    for m in data.get("models", []):
        m["model"] = rebase(m["model"], root)
    return f"# dam demo run: {method} of {root}/models, --seed {seed}\n" + yaml.safe_dump(data, sort_keys=False)


# ------------------------------------------------------------------------------------------------ the steps


def _check_out(out: Path, config: Any, force: bool) -> None:
    """Refuse an ``out`` that holds anything but a DAM run of this exact config (or delete it under ``force``)."""
    from dam.training.config import config_to_dict
    from dam.training.run_dir import CONFIG_FILE

    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    if force:
        logger.info("demo: --force: deleting %s", out)
        shutil.rmtree(out) if out.is_dir() else out.unlink()
        return
    saved = out / CONFIG_FILE
    if not saved.is_file():
        raise DamError(f"output folder {out} exists and is not a DAM run: use --force to replace it, or --out")
    if yaml.safe_load(saved.read_text()) != config_to_dict(config):
        raise DamError(
            f"output folder {out} holds a DAM run of another config ({saved} differs): use --force to retrain, "
            "or another --out"
        )


def _dam_run_complete(run: Path) -> bool:
    from dam.adaptive.coefficients import COEFFICIENTS_FILE
    from dam.training.run_dir import MERGED_DIR

    return (run / COEFFICIENTS_FILE).is_file() and (run / MERGED_DIR / "config.json").is_file()


def train_dam(config: Any) -> tuple[Path, str]:
    """Train (or resume) the run of ``config`` unless it is complete; ``(run folder, "reused"|"trained")``."""
    run = Path(config.output_dir)
    if _dam_run_complete(run):
        logger.info("demo: reusing the finished DAM run in %s", run)
        return run, "reused"
    from dam.training.loop import train

    return train(config), "trained"


def classic_merges(root: str | Path, merges: Path, *, seed: int = 0) -> dict[str, Path]:
    """Run every classic demo merge into ``merges/<method>``; a folder made from the same config text is reused,
    one made from another is refused (DamError)."""
    from dam.merge.config import parse_merge_config
    from dam.merge.engine import run_merge

    folders = {}
    for method in CLASSIC_METHODS:
        text = merge_config_text(method, root, seed)
        folder = merges / method
        written = folder / "mergekit_config.yml"
        config = parse_merge_config(yaml.safe_load(text), text, origin=str(MERGE_CONFIG_DIR / f"{method}.yaml"))
        if (
            written.is_file()
            and written.read_text(encoding="utf-8") == config.portable_text(folder)
            and (folder / "config.json").is_file()
        ):
            logger.info("demo: reusing the %s merge in %s", method, folder)
        else:
            run_merge(config, folder, seed=seed, progress=False)  # refuses a non-empty folder of another config
        folders[method] = folder
    return folders


def evaluate_models(
    models: dict[str, Path], root: str | Path, tasks: Sequence[str], *, split: str, limit: int | None = None
) -> list[Any]:
    """:func:`dam.evaluation.evaluate.evaluate_model` of every model on every task's ``split`` (``validation`` or
    ``test``) under ``root``."""
    from dam.evaluation.evaluate import evaluate_model, load_tasks

    loaded = load_tasks(list(tasks), data_dir=root, split=split, limit=limit)
    results = []
    for name, path in models.items():
        t0 = time.perf_counter()
        results.append(evaluate_model(path, loaded, batch_size=100, name=name))
        logger.info("demo: evaluated %s on %s in %.1f s", name, split, time.perf_counter() - t0)
    return results


# ------------------------------------------------------------------------------------------- summaries


def skills_mean(accuracy: dict[str, float], skills: Sequence[str]) -> float:
    """Mean accuracy over the skills (``generic`` left out: it is the base's, not a merged expert's)."""
    return sum(accuracy[s] for s in skills) / len(skills)


def goal_checks(accuracy: dict[str, dict[str, float]], skills: Sequence[str]) -> dict[str, Any]:
    """The quality goals of the demo, from ``accuracy[model][task]`` (percent).

    ``margin``: DAM's mean over the skills minus the best classic merge's (goal >= 5 points). ``retention``:
    per skill, DAM's accuracy over that skill's expert's own accuracy (goal >= 0.9 on every skill).
    """
    dam = skills_mean(accuracy["dam"], skills)
    classic = {m: skills_mean(accuracy[m], skills) for m in CLASSIC_METHODS if m in accuracy}
    best = max(classic, key=classic.__getitem__)
    retention = {s: accuracy["dam"][s] / accuracy[s][s] if accuracy[s][s] else float("nan") for s in skills}
    return {
        "dam_skills_mean": dam,
        "best_classic": best,
        "best_classic_skills_mean": classic[best],
        "margin": dam - classic[best],
        "margin_goal_met": dam - classic[best] >= 5.0,
        "retention": retention,
        "retention_goal_met": all(r >= 0.9 for r in retention.values()),
    }


def format_comparison(accuracy: dict[str, dict[str, float]], tasks: Sequence[str], skills: Sequence[str]) -> str:
    """Models as rows, tasks then the mean over the skills as columns (accuracy in percent)."""
    columns = [*tasks, "skills mean"]
    width = max(len("accuracy %"), *(len(m) for m in accuracy))
    widths = [max(len(c), 5) for c in columns]
    lines = ["  ".join(["accuracy %".ljust(width), *(c.rjust(w) for c, w in zip(columns, widths, strict=True))])]
    for model, row in accuracy.items():
        cells = [f"{row[t]:.1f}" for t in tasks] + [f"{skills_mean(row, skills):.1f}"]
        lines.append("  ".join([model.ljust(width), *(c.rjust(w) for c, w in zip(cells, widths, strict=True))]))
    return "\n".join(lines)


def format_goals(goals: dict[str, Any]) -> str:
    """Two lines: DAM against the best classic merge, and DAM against each expert on its own skill."""
    margin = (
        f"DAM skills mean {goals['dam_skills_mean']:.1f} vs best classic ({goals['best_classic']}) "
        f"{goals['best_classic_skills_mean']:.1f}: {goals['margin']:+.1f} points "
        f"(goal >= +5: {'met' if goals['margin_goal_met'] else 'not met'})"
    )
    ratios = ", ".join(f"{s} {100 * r:.0f}%" for s, r in goals["retention"].items())
    retention = (
        f"DAM / expert on its own skill: {ratios} (goal >= 90% each: "
        f"{'met' if goals['retention_goal_met'] else 'not met'})"
    )
    return f"{margin}\n{retention}"


def _model_colours(models: Sequence[str], skills: Sequence[str]) -> list[Any]:
    from matplotlib import colormaps

    blues, oranges = colormaps["Blues"], colormaps["Oranges"]
    colours = []
    for m in models:
        if m == "base":
            colours.append("0.55")
        elif m in skills:
            colours.append(blues(0.45 + 0.45 * skills.index(m) / max(len(skills) - 1, 1)))
        elif m in CLASSIC_METHODS:
            colours.append(oranges(0.35 + 0.55 * CLASSIC_METHODS.index(m) / (len(CLASSIC_METHODS) - 1)))
        else:
            colours.append("tab:red")
    return colours


def layer_coefficients(run: str | Path) -> Any:
    """Mean merge coefficient per (layer, source) of a DAM run, pooled over the layer's tensors by size; the
    tensors outside the layers (embedding, final norm, ``lm_head``) get one row each. A DataFrame, rows in
    model order, columns the sources."""
    import pandas as pd

    from dam.evaluation.analysis import load_coefficient_table

    table = load_coefficient_table(run)
    table = table[table["trainable"]]
    table = table.assign(
        row=[
            f"layer {int(layer)}" if pd.notna(layer) else module
            for layer, module in zip(table["layer"], table["module"], strict=True)
        ],
        weighted=table["mean"] * table["numel"],
    )
    sums = table.groupby(["row", "source"], sort=False, observed=True)[["weighted", "numel"]].sum()
    means = (sums["weighted"] / sums["numel"]).unstack("source")
    order = list(dict.fromkeys(table["row"]))
    embed = [r for r in order if "embed" in r]
    layers = sorted((r for r in order if r.startswith("layer ")), key=lambda r: int(r.split()[1]))
    rest = [r for r in order if r not in embed and r not in layers]
    return means.reindex([*embed, *layers, *rest])


def plot_results(
    accuracy: dict[str, dict[str, float]],
    tasks: Sequence[str],
    skills: Sequence[str],
    run: str | Path,
    path: str | Path,
) -> Any:
    """Two panels: grouped accuracy bars (tasks and the skills mean x models) and the DAM coefficients per layer
    and source (:func:`layer_coefficients`) as an annotated heat map. Writes a PNG at ``path``; returns the
    matplotlib Figure."""
    import numpy as np
    from matplotlib.figure import Figure

    models = list(accuracy)
    groups = [*tasks, "skills mean"]
    coefficients = layer_coefficients(run)
    fig = Figure(figsize=(15, 5.2), layout="constrained")
    bars_ax, heat_ax = fig.subplots(1, 2, width_ratios=[2.6, 1])
    width = 0.85 / len(models)
    x = np.arange(len(groups))
    for i, (model, colour) in enumerate(zip(models, _model_colours(models, list(skills)), strict=True)):
        values = [accuracy[model][t] for t in tasks] + [skills_mean(accuracy[model], skills)]
        bars_ax.bar(x - 0.425 + (i + 0.5) * width, values, width, label=model, color=colour, edgecolor="white", lw=0.4)
    bars_ax.set_xticks(x, groups)
    bars_ax.set_ylim(0, 105)
    bars_ax.set_ylabel("exact-match accuracy (%)")
    bars_ax.set_title("Test accuracy: base, experts, classic merges and DAM")
    bars_ax.axvline(len(tasks) - 0.5, color="0.7", lw=0.8, ls="--")
    bars_ax.legend(ncol=1, fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    bars_ax.grid(axis="y", alpha=0.3)

    data = coefficients.to_numpy(dtype=float)
    image = heat_ax.imshow(data, aspect="auto", cmap="viridis", interpolation="nearest")
    heat_ax.set_xticks(range(data.shape[1]), list(coefficients.columns))
    heat_ax.set_yticks(range(data.shape[0]), list(coefficients.index))
    lo, hi = float(np.nanmin(data)), float(np.nanmax(data))
    for (r, c), v in np.ndenumerate(data):
        dark = (v - lo) / ((hi - lo) or 1.0) < 0.5
        heat_ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=8, color="w" if dark else "k")
    heat_ax.set_title("DAM coefficients: mean per layer and source", fontsize=10)
    fig.colorbar(image, ax=heat_ax, shrink=0.85)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return fig


# ------------------------------------------------------------------------------------------------ the command


def _ensure_family(root: Path, quick: bool) -> dict[str, Any]:
    from dam.demo.family import DemoSettings, build_demo

    report_file = root / "models" / "build_report.json"
    if report_file.is_file():
        return json.loads(report_file.read_text())
    settings = None
    if quick:  # a tiny family in seconds, for smoke tests: the numbers mean nothing
        settings = DemoSettings(
            hidden_size=32,
            intermediate_size=64,
            num_layers=2,
            num_heads=2,
            base_steps=20,
            expert_steps=10,
            batch_size=16,
            n_train=64,
            n_train_generic=128,
            n_validation=QUICK_EVAL_LIMIT,
            n_test=QUICK_EVAL_LIMIT,
            replay=16,
            warmup_steps=2,
        )
    logger.info("demo: no family at %s: building it (minutes on CPU)", root / "models")
    return build_demo(root, settings=settings, progress=not quick)


def run_demo(
    root: str | Path = "data/demo",
    out: str | Path = "runs/demo",
    *,
    seed: int = 0,
    force: bool = False,
    dam_overrides: Sequence[str] = (),
    quick: bool = False,
) -> dict[str, Any]:
    """The demo end to end (see the module docstring). Returns what ``out/results.json`` holds, plus ``table``
    (the comparison), ``goals_text`` and ``kinship_text`` (the experts' kinship matrix) as printable strings.

    ``seed`` seeds DAM's training and data order and DARE's drop (the family is built with seed 0, matching the
    committed datasets). ``quick``: a smoke run (a tiny family if one must be built, 6 DAM steps, 20 eval
    examples per task) whose numbers mean nothing."""
    from dam.demo.family import format_kinship_matrix

    root, out = Path(root), Path(out)
    config = dam_config(root, out, seed=seed, overrides=dam_overrides, quick=quick)
    _check_out(out, config, force)
    for method in CLASSIC_METHODS:  # config errors before any heavy work
        merge_config_text(method, root, seed)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    report = _ensure_family(root, quick)
    skills = list(report["skills"])
    seconds["family"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    run, dam_status = train_dam(config)
    seconds["dam"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    merges = classic_merges(root, out / "merges", seed=seed)
    seconds["merges"] = time.perf_counter() - t0

    from dam.training.run_dir import MERGED_DIR

    models = {name: root / report["models"][name] for name in ["base", *skills]}
    models.update(merges)
    models["dam"] = run / MERGED_DIR
    tasks = [GENERIC, *skills]
    t0 = time.perf_counter()
    limit = QUICK_EVAL_LIMIT if quick else None
    validation = evaluate_models(models, root, tasks, split="validation", limit=limit)
    results = evaluate_models(models, root, tasks, split="test", limit=limit)
    seconds["eval"] = time.perf_counter() - t0
    accuracy = {r.model: {t.task: t.accuracy for t in r.tasks} for r in results}
    validation_accuracy = {r.model: {t.task: t.accuracy for t in r.tasks} for r in validation}
    goals = goal_checks(accuracy, skills)

    t0 = time.perf_counter()
    plot_results(accuracy, tasks, skills, run, out / "results.png")
    from dam.evaluation.analysis import load_coefficient_table, plot_coefficient_heatmap

    plot_coefficient_heatmap(load_coefficient_table(run), path=out / "coefficients.png")
    seconds["plots"] = time.perf_counter() - t0
    summary = {
        "root": str(root),
        "seed": seed,
        "quick": quick,
        "dam_run": str(run),
        "dam_status": dam_status,
        "tasks": tasks,
        "skills": skills,
        "accuracy": accuracy,
        "validation_accuracy": validation_accuracy,
        "models": [r.to_dict() for r in results],
        "validation_models": [r.to_dict() for r in validation],
        "goals": goals,
        "kinship": report["kinship"],
        "seconds": seconds,
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    return {
        **summary,
        "table": format_comparison(accuracy, tasks, skills),
        "goals_text": format_goals(goals),
        "kinship_text": format_kinship_matrix(report),
    }
