"""The demo end to end (``dam demo run``): family, DAM, classic merges, evaluation, table and plot.

:func:`run_demo` does, in order:

1. unless ``root/models/build_report.json`` exists, put the family under ``root``: the toy family is shipped with
   the package (:func:`dam.demo.family.install_shipped_family` copies it, no build), the real one is built;
2. train DAM with ``dam/demo/configs/dam.yaml`` (its ``data/demo/...`` paths moved under ``root``, ``output_dir`` set
   to ``out``, ``train.seed`` and ``data.seed`` set to ``seed``, then the caller's overrides); a finished run in
   ``out`` made with the same resolved config is reused, an unfinished one resumed from its checkpoint;
3. merge the experts with the classic methods of ``dam/demo/configs/merge/*.yaml`` into ``out/merges/<method>``
   (DARE's random drop seeded with ``seed``), reusing a merge made from the same config text; then, with ``full``,
   the learned merges it is compared with (:data:`LEARNED_BASELINES`): RegMean over the DAM config's sources and
   data (``out/merges/regmean``), layer-wise AdaMerging and DAM at the granularity the default does not use, each a
   DAM run of the default config with a few overrides (``out/learned/<name>``). Every learned merge and classic
   merge runs in a child process, which gives its wall time and peak resident memory (its own: see
   :func:`dam.demo.children.peak_rss_mib`);
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

import contextlib
import json
import logging
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml

from dam.demo.children import MeasuredChild
from dam.demo.paths import SMOLLM2, TOY, Family
from dam.errors import DamError
from dam.io.paths import portable_reference
from dam.progress import bars_shown, phase, quiet

logger = logging.getLogger(__name__)

DAM_CONFIG = TOY.config_dir / "dam.yaml"
MERGE_CONFIG_DIR = TOY.config_dir / "merge"
CLASSIC_METHODS = ("linear", "task_arithmetic", "ties", "dare_ties")
LEARNED_BASELINES: dict[str, tuple[str, ...]] = {
    # layer-wise AdaMerging (Yang et al., 2024): W = W_base + sum_k lambda_k tau_k per tensor, the base a source at
    # its derived coefficient 1 - sum_k lambda_k, each lambda clamped to [0, 1], trained on the merged model's
    # prediction entropy (no teacher); the coefficient-similarity term and the layer alignment (the real family's
    # DAM objective, which has no teacher to align with here) belong to DAM, not AdaMerging. The paper starts lambda
    # at 0.3, task arithmetic's tuned scale on its benchmark; on the toy family's validation split (seed 0, the
    # demo's budget) 0.3 and 0.5 (this one at 1500 steps) kept no skill (0.8, 0.7), 0.7 kept `reverse` (32.3, also
    # on seed 1), 1.0 less (31.3 at 1500 steps, 16.0 on seed 1): docs/quickstart.md. Not tried on the real family.
    # Its learning rate stays the 1e-2 it was tried at on both families, whatever the DAM config's; its
    # clamped task-vector form is its own basis, so the weights basis whatever the DAM config's.
    "adamerging": (
        "train.lr=1e-2",
        "dam.basis=weights",
        "dam.granularity=tensor",
        "dam.transform=task_vector",
        "dam.init=0.7",
        "loss.objective=entropy",
        "loss.similarity=0",
        "loss.align=0",
    ),
    "dam_column": ("dam.granularity=column",),
    "dam_row_column": ("dam.granularity=row_column",),
}
"""The learned merges the demo's DAM (the default config, row ``dam``) is compared with: name -> overrides of
the default DAM config. A baseline whose resolved config equals the default's is the ``dam`` row itself and is
not run twice. RegMean (row ``regmean``, ``REGMEAN_ALPHA``) needs no training and is run besides."""
FAMILY_BASELINES: dict[str, tuple[str, ...]] = {"toy": tuple(LEARNED_BASELINES), "smollm2": ("adamerging",)}
"""Which :data:`LEARNED_BASELINES` each family's run trains (each costs a DAM run: the real family's runs only
AdaMerging beside DAM)."""
REGMEAN_ALPHA = 0.9  # the off-diagonal scale the RegMean paper recommends for language models (0.9-0.95)
COST_FILE = "cost.json"
FAMILY_FILE = "family.json"  # which build of the family the runs in the output folder were trained on
# --quick: a smoke run (seconds): few DAM steps on few examples, a short evaluation
_QUICK_OVERRIDES = ("train.max_steps=6", "train.warmup_steps=1", "train.log_every=2", "data.num_examples=48")
QUICK_EVAL_LIMIT = 20


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DamError(f"demo config {path} not found (it is package data of dam.demo: reinstall dam)")
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise DamError(f"demo config {path}: expected a mapping of config keys")
    return data


def dam_config(
    root: str | Path,
    out: str | Path,
    *,
    seed: int = 0,
    overrides: Sequence[str] = (),
    quick: bool = False,
    family: Family = TOY,
) -> Any:
    """The DAM run config of the demo: the family's ``dam.yaml`` pointed at ``root`` and ``out``, seeded with
    ``seed``, then ``overrides`` (``key=value``, they win). Returns a :class:`dam.training.config.DAMConfig`."""
    from dam.training.config import load_config

    config_file = family.config_dir / "dam.yaml"
    data = _read_yaml(config_file)
    moved = [f"base_model={family.rebase(data['base_model'], root)}"]
    for m in data["models"]:
        moved += [f"models.{m['name']}.model={family.rebase(m['model'], root)}"]
        moved += [f"models.{m['name']}.dataset={family.rebase(m['dataset'], root)}"]
    run = [f"output_dir={out}", f"train.seed={seed}", f"data.seed={seed}"]
    every = [*moved, *run, *(_QUICK_OVERRIDES if quick else ()), *overrides]
    return load_config(config_file, [*every, *_shortened_warmup(data, every)])


def _shortened_warmup(data: dict[str, Any], overrides: Sequence[str]) -> list[str]:
    """``["train.warmup_steps=N"]`` when ``overrides`` shorten ``train.max_steps`` below the config's warm-up
    without setting the warm-up themselves (``dam demo run train.max_steps=10``): the warm-up becomes a tenth of
    the steps. Otherwise ``[]``."""
    import copy

    from dam.training.config import apply_override

    if any(o.removeprefix("--").startswith("train.warmup_steps=") for o in overrides):
        return []
    resolved = copy.deepcopy(data)
    for item in overrides:
        apply_override(resolved, item)
    train = resolved.get("train") or {}
    steps, warmup = train.get("max_steps"), train.get("warmup_steps", 0)
    if not isinstance(steps, int) or not isinstance(warmup, int) or isinstance(steps, bool) or warmup <= steps:
        return []
    logger.info(
        "demo: train.max_steps=%d is shorter than the warm-up (%d): warm-up %d steps", steps, warmup, steps // 10
    )
    return [f"train.warmup_steps={steps // 10}"]


def merge_config_text(method: str, root: str | Path, seed: int, family: Family = TOY) -> str:
    """The mergekit YAML of the family's ``merge/<method>.yaml`` with its model paths moved under ``root``, headed
    by the seed it is run with (so a merge made with another DARE seed is not mistaken for this one)."""
    data = _read_yaml(family.config_dir / "merge" / f"{method}.yaml")
    if data.get("base_model"):
        data["base_model"] = family.rebase(data["base_model"], root)
    for m in data.get("models", []):
        m["model"] = family.rebase(m["model"], root)
    return f"# dam demo run: {method} of {root}/models, --seed {seed}\n" + yaml.safe_dump(data, sort_keys=False)


# ------------------------------------------------------------------------------------------------ the steps


def record_cost(folder: Path, outcome: tuple[Any, float, float]) -> tuple[Any, dict[str, float]]:
    """``(result, {"seconds", "peak_rss_mib"})`` of a :meth:`MeasuredChild.wait` outcome, the cost also written to
    ``folder/cost.json``."""
    result, seconds, peak = outcome
    cost = {"seconds": seconds, "peak_rss_mib": peak}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / COST_FILE).write_text(json.dumps(cost) + "\n")
    return result, cost


def measured(folder: Path, fn: Any, *args: Any, threads: int | None = None) -> tuple[Any, dict[str, float]]:
    """``fn(*args)`` in a :class:`MeasuredChild`, waited for: the result and ``{"seconds", "peak_rss_mib"}``, also
    recorded in ``folder/cost.json``; an exception of ``fn`` is raised here."""
    return record_cost(folder, MeasuredChild(fn, *args, threads=threads).wait())


def _recorded_cost(folder: Path) -> dict[str, float] | None:
    file = folder / COST_FILE
    return json.loads(file.read_text()) if file.is_file() else None


def _report_file(root: Path) -> Path:
    """The build report of the family under ``root`` (every family's build writes one)."""
    return root / "models" / "build_report.json"


def _family_fingerprint(root: Path) -> str | None:
    """The SHA-256 of the family's build report under ``root`` (None before it is built): every build writes a
    new one, so runs trained on another build of the family are told apart from runs on this one."""
    import hashlib

    report = _report_file(root)
    return hashlib.sha256(report.read_bytes()).hexdigest() if report.is_file() else None


def _check_out(out: Path, config: Any, force: bool) -> None:
    """Refuse an ``out`` that holds anything but a DAM run of this exact config (or delete it under ``force``)."""
    from dam.training.config import portable_config
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
    if yaml.safe_load(saved.read_text()) != portable_config(config, out):
        raise DamError(
            f"output folder {out} holds a DAM run of another config ({saved} differs): use --force to retrain, "
            "or another --out"
        )


def _check_family(out: Path, root: Path, fingerprint: str | None) -> None:
    """Refuse an ``out`` whose runs were trained on another build of the family than the one under ``root`` (whose
    :func:`_family_fingerprint` is ``fingerprint``), or that does not record which (the config names the models by
    path only, so a rebuilt family looks the same)."""
    from dam.training.run_dir import CONFIG_FILE

    if not (out / CONFIG_FILE).is_file():
        return
    recorded = out / FAMILY_FILE
    try:
        trained_on = json.loads(recorded.read_text())["build_report_sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        trained_on = None
    if trained_on is None or trained_on != fingerprint:
        unrecorded = f"a family it does not record ({recorded} missing or unreadable)"
        why = "another build of the family" if trained_on else unrecorded
        raise DamError(
            f"output folder {out} holds runs trained on {why}, not on {root / 'models'}'s: use --force to retrain, "
            "or another --out"
        )


def _dam_run_complete(run: Path) -> bool:
    from dam.adaptive.coefficients import COEFFICIENTS_FILE
    from dam.training.run_dir import MERGED_DIR

    return (run / COEFFICIENTS_FILE).is_file() and (run / MERGED_DIR / "config.json").is_file()


def _train(config: Any) -> Path:
    from dam.training.loop import train

    return train(config)


def train_dam(config: Any, label: str = "DAM") -> tuple[Path, str, dict[str, float] | None]:
    """Train (or resume) the run of ``config`` unless it is complete, in a measured child process;
    ``(run folder, "reused"|"trained", cost)`` (the cost recorded when it was trained, None if unknown).
    ``label`` names the run in the progress lines (``DAM``, ``adamerging``, ...)."""
    with dam_beside(config, label) as finish:
        return finish()


@contextlib.contextmanager
def dam_beside(
    config: Any, label: str = "DAM", threads: int | None = None
) -> Iterator[Callable[[], tuple[Path, str, dict[str, float] | None]]]:
    """Start training (or resuming) the run of ``config`` in a measured child process (at ``threads`` torch
    threads if given) unless it is complete, and yield ``finish``, which waits for it and returns what
    :func:`train_dam` does; the caller works beside it until then. Leaving the block before ``finish`` (an error
    beside it) kills the training, which resumes from its last checkpoint on the next run."""
    run = Path(config.output_dir)
    if _dam_run_complete(run):
        logger.info("demo: reusing the finished %s run in %s", label, run)
        yield lambda: (run, "reused", _recorded_cost(run))
        return
    steps = f"{config.train.max_steps} steps" if config.train.max_steps else f"{config.train.epochs} epochs"
    what = f"demo: training {label} into {run} ({steps} of {config.train.batch_size} sequences)"
    if threads is not None:
        what += f" at {threads} thread{'s' * (threads > 1)}"
    with phase(what, log=logger):  # its end line comes when the caller's block ends, right after ``finish``
        child = MeasuredChild(_train, config, threads=threads)
        try:
            yield lambda: (run, "trained", record_cost(run, child.wait())[1])
        finally:
            child.stop()


def _regmean(config: Any, folder: Path) -> None:
    from dam.training.regmean import run_regmean

    run_regmean(config, folder, alpha=REGMEAN_ALPHA, force=True)


def learned_merges(
    default: Any,
    root: str | Path,
    out: Path,
    *,
    seed: int,
    overrides: Sequence[str],
    quick: bool,
    family: Family = TOY,
) -> tuple[dict[str, Path], dict[str, dict[str, float] | None], dict[str, float]]:
    """RegMean and the family's :data:`LEARNED_BASELINES` next to the default DAM config ``default``: ``({name:
    model folder}, {name: cost}, {name: wall seconds of this call})``. Finished ones are reused."""
    from dam.training.config import config_to_dict
    from dam.training.run_dir import MERGED_DIR

    folders: dict[str, Path] = {}
    costs: dict[str, dict[str, float] | None] = {}
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    regmean = out / "merges" / "regmean"
    if (regmean / "config.json").is_file():
        logger.info("demo: reusing the RegMean merge in %s", regmean)
        costs["regmean"] = _recorded_cost(regmean)
    else:
        with phase(f"demo: RegMean (alpha {REGMEAN_ALPHA}) of the DAM config's sources into {regmean}", log=logger):
            _, costs["regmean"] = measured(regmean, _regmean, default, regmean)
    folders["regmean"] = regmean
    seconds["regmean"] = time.perf_counter() - t0
    reference = {k: v for k, v in config_to_dict(default).items() if k != "output_dir"}
    for name in FAMILY_BASELINES[family.name]:
        t0 = time.perf_counter()
        extra = LEARNED_BASELINES[name]
        folder = out / "learned" / name
        config = dam_config(root, folder, seed=seed, overrides=[*overrides, *extra], quick=quick, family=family)
        if {k: v for k, v in config_to_dict(config).items() if k != "output_dir"} == reference:
            continue  # this is the default config: the ``dam`` row
        run, _, costs[name] = train_dam(config, label=name)
        folders[name] = run / MERGED_DIR
        seconds[name] = time.perf_counter() - t0
    return folders, costs, seconds


def _classic_merge(config: Any, folder: Path, seed: int, progress: bool) -> None:
    from dam.merge.engine import run_merge

    run_merge(config, folder, seed=seed, progress=progress)  # refuses a non-empty folder of another config


def classic_merges(
    root: str | Path, merges: Path, *, seed: int = 0, family: Family = TOY, threads: int | None = None
) -> tuple[dict[str, Path], dict[str, dict[str, float] | None]]:
    """Run every classic demo merge into ``merges/<method>`` (measured, like the learned ones, at ``threads``
    torch threads if given, then without a bar: another process's bar is on the terminal); a folder made from the
    same config text is reused, one made from another is refused (DamError). ``(folders, costs)``."""
    from dam.merge.config import parse_merge_config

    folders, costs = {}, {}
    for method in CLASSIC_METHODS:
        text = merge_config_text(method, root, seed, family)
        folder = merges / method
        written = folder / "mergekit_config.yml"
        origin = str(family.config_dir / "merge" / f"{method}.yaml")
        config = parse_merge_config(yaml.safe_load(text), text, origin=origin)
        if (
            written.is_file()
            and written.read_text(encoding="utf-8") == config.portable_text(folder)
            and (folder / "config.json").is_file()
        ):
            logger.info("demo: reusing the %s merge in %s", method, folder)
            costs[method] = _recorded_cost(folder)
        else:
            _, costs[method] = measured(folder, _classic_merge, config, folder, seed, threads is None, threads=threads)
            logger.info("demo: merged %s into %s in %.1f s", method, folder, costs[method]["seconds"])
        folders[method] = folder
    return folders, costs


def evaluate_models(
    models: dict[str, Path],
    root: str | Path,
    tasks: Sequence[str],
    *,
    split: str,
    limit: int | None = None,
    batch_size: int = 100,
    bars: bool = True,
) -> list[Any]:
    """:func:`dam.evaluation.evaluate.evaluate_model` of every model on every task's ``split`` (``validation`` or
    ``test``) under ``root``; ``bars=False``: no bar even on a terminal (another process's bar is there)."""
    from dam.evaluation.evaluate import evaluate_model, load_tasks

    loaded = load_tasks(list(tasks), data_dir=root, split=split, limit=limit)
    results = []
    for i, (name, path) in enumerate(models.items(), 1):
        t0 = time.perf_counter()
        progress = bars and bars_shown()
        results.append(evaluate_model(path, loaded, batch_size=batch_size, name=name, progress=progress))
        if not quiet():
            logger.info(
                "demo: evaluated %s on %s (%d/%d) in %.1f s", name, split, i, len(models), time.perf_counter() - t0
            )
    return results


# ------------------------------------------------------------------------------------------- summaries


def skills_mean(accuracy: dict[str, float], skills: Sequence[str]) -> float:
    """Mean accuracy over the skills (``generic`` left out: it is the base's, not a merged expert's)."""
    return sum(accuracy[s] for s in skills) / len(skills)


def goal_checks(
    accuracy: dict[str, dict[str, float]], skills: Sequence[str], general: str | None = None
) -> dict[str, Any]:
    """The quality goals of the demo, from ``accuracy[model][task]`` (percent).

    With ``general`` (the base's task), also ``general_retention``: DAM's score there over the base's (goal >= 0.9),
    and ``best_other``/``other_margin``: DAM's skills mean minus the best other merge's, learned and searched ones
    included (every row but the base, the experts and ``dam``; goal >= 10 points).

    ``margin``: DAM's mean over the skills minus the best classic merge's (goal >= 5 points). ``retention``:
    per skill, DAM's accuracy over that skill's expert's own accuracy (goal >= 0.9 on every skill).
    ``worst_retention``: per learned merge (every model but the base, the experts and the classic merges), its
    lowest accuracy / expert ratio over the skills.
    """
    dam = skills_mean(accuracy["dam"], skills)
    classic = {m: skills_mean(accuracy[m], skills) for m in CLASSIC_METHODS if m in accuracy}
    best = max(classic, key=classic.__getitem__)
    retention = {s: accuracy["dam"][s] / accuracy[s][s] if accuracy[s][s] else float("nan") for s in skills}
    learned = [m for m in accuracy if m not in ("base", *skills, *CLASSIC_METHODS)]
    worst = {
        m: min(accuracy[m][s] / accuracy[s][s] if accuracy[s][s] else float("nan") for s in skills) for m in learned
    }
    extra: dict[str, Any] = {}
    if general is not None:
        others = {m: skills_mean(accuracy[m], skills) for m in accuracy if m not in ("base", *skills, "dam")}
        best_other = max(others, key=others.__getitem__)
        retained = accuracy["dam"][general] / accuracy["base"][general] if accuracy["base"][general] else float("nan")
        extra = {
            "general_retention": retained,
            "general_goal_met": retained >= 0.9,
            "best_other": best_other,
            "other_margin": dam - others[best_other],
            "other_margin_goal_met": dam - others[best_other] >= 10.0,
        }
    return {
        **extra,
        "worst_retention": worst,
        "dam_skills_mean": dam,
        "best_classic": best,
        "best_classic_skills_mean": classic[best],
        "margin": dam - classic[best],
        "margin_goal_met": dam - classic[best] >= 5.0,
        "retention": retention,
        "retention_goal_met": all(r >= 0.9 for r in retention.values()),
    }


def format_comparison(
    accuracy: dict[str, dict[str, float]],
    tasks: Sequence[str],
    skills: Sequence[str],
    costs: dict[str, dict[str, float] | None] | None = None,
) -> str:
    """Models as rows, tasks then the mean over the skills as columns (accuracy in percent); with ``costs``, each
    merge's wall seconds and peak resident MiB too (blank for the base and the experts, ``?`` if unknown)."""
    columns = [*tasks, "skills mean", *(["time s", "peak MiB"] if costs is not None else [])]
    width = max(len("accuracy %"), *(len(m) for m in accuracy))
    widths = [max(len(c), 5) for c in columns]
    lines = ["  ".join(["accuracy %".ljust(width), *(c.rjust(w) for c, w in zip(columns, widths, strict=True))])]
    for model, row in accuracy.items():
        cells = [f"{row[t]:.1f}" for t in tasks] + [f"{skills_mean(row, skills):.1f}"]
        if costs is not None:
            cost = costs.get(model)
            if model not in costs:
                cells += ["", ""]
            else:
                cells += ["?", "?"] if cost is None else [f"{cost['seconds']:.0f}", f"{cost['peak_rss_mib']:.0f}"]
        lines.append("  ".join([model.ljust(width), *(c.rjust(w) for c, w in zip(cells, widths, strict=True))]))
    return "\n".join(lines)


def format_goals(goals: dict[str, Any]) -> str:
    """Three lines: DAM against the best classic merge, DAM against each expert on its own skill, and every learned
    merge's worst skill against its expert."""
    margin = (
        f"DAM skills mean {goals['dam_skills_mean']:.1f} vs best classic ({goals['best_classic']}) "
        f"{goals['best_classic_skills_mean']:.1f}: {goals['margin']:+.1f} points "
        f"(goal >= +5: {'met' if goals['margin_goal_met'] else 'not met'})"
    )
    ratios = ", ".join(f"{s} {100 * r:.1f}%" for s, r in goals["retention"].items())  # 89.9% is not 90%
    retention = (
        f"DAM / expert on its own skill: {ratios} (goal >= 90% each: "
        f"{'met' if goals['retention_goal_met'] else 'not met'})"
    )
    lines = [margin, retention]
    if "general_retention" in goals:
        met = "met" if goals["general_goal_met"] else "not met"
        lines.append(f"DAM / base on general: {100 * goals['general_retention']:.1f}% (goal >= 90%: {met})")
        met = "met" if goals["other_margin_goal_met"] else "not met"
        lines.append(
            f"DAM skills mean vs the best other merge ({goals['best_other']}): {goals['other_margin']:+.1f} points "
            f"(goal >= +10: {met})"
        )
    if not goals["worst_retention"]:
        return "\n".join(lines)
    learned = ", ".join(f"{m} {100 * r:.1f}%" for m, r in goals["worst_retention"].items())
    best = max(goals["worst_retention"], key=goals["worst_retention"].__getitem__)
    met = goals["worst_retention"][best] >= 0.9
    verdict = "met" if met else "not met"
    worst = f"worst skill / its expert per learned merge: {learned} (best: {best}; goal >= 90%: {verdict})"
    return "\n".join([*lines, worst])


def _model_colours(models: Sequence[str], skills: Sequence[str]) -> list[Any]:
    from matplotlib import colormaps

    blues, oranges, greens = colormaps["Blues"], colormaps["Oranges"], colormaps["Greens"]
    named = ("base", "dam", *skills, *CLASSIC_METHODS, "regmean", *LEARNED_BASELINES)
    searched = [m for m in models if m not in named]
    colours = []
    for m in models:
        if m == "base":
            colours.append("0.55")
        elif m in skills:
            colours.append(blues(0.45 + 0.45 * skills.index(m) / max(len(skills) - 1, 1)))
        elif m in CLASSIC_METHODS:
            colours.append(oranges(0.35 + 0.55 * CLASSIC_METHODS.index(m) / (len(CLASSIC_METHODS) - 1)))
        elif m in ("regmean", *LEARNED_BASELINES):
            order = ("regmean", *LEARNED_BASELINES)
            colours.append(greens(0.35 + 0.55 * order.index(m) / (len(order) - 1)))
        elif m == "dam":
            colours.append("tab:red")
        else:  # the searches (greedy soup, kinship-greedy, CMA-ES)
            colours.append(colormaps["Purples"](0.4 + 0.5 * searched.index(m) / max(len(searched) - 1, 1)))
    return colours


def layer_coefficients(run: str | Path) -> Any:
    """Mean merge coefficient per (layer, source) of a DAM run (:func:`dam.evaluation.analysis.layer_means`: the
    tensors outside the layers one row each, a ``row_column`` run's row scales in rows of their own). A
    DataFrame, rows in model order, columns the sources."""
    from dam.evaluation.analysis import layer_means, load_coefficient_table

    return layer_means(load_coefficient_table(run))


HEAT_MAP_LABELS = 24  # the most row labels (and rows annotated with their values) the coefficient map shows


def _coefficient_map(fig: Any, ax: Any, coefficients: Any, title: str) -> None:
    """One annotated heat map of ``coefficients`` (rows: layers, columns: sources) with a colour bar of its own."""
    import numpy as np

    data = coefficients.to_numpy(dtype=float)
    image = ax.imshow(data, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xticks(range(data.shape[1]), list(coefficients.columns))
    # a deep model's rows (30 layers) are too many to label and annotate each: every k-th label, and the values
    # only on a short map
    every = -(-data.shape[0] // HEAT_MAP_LABELS)
    ax.set_yticks(range(0, data.shape[0], every), list(coefficients.index)[::every])
    lo, hi = float(np.nanmin(data)), float(np.nanmax(data))
    for (r, c), v in np.ndenumerate(data) if every == 1 else ():
        dark = (v - lo) / ((hi - lo) or 1.0) < 0.5
        ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=8, color="w" if dark else "k")
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, shrink=0.85)


def plot_results(
    accuracy: dict[str, dict[str, float]],
    tasks: Sequence[str],
    skills: Sequence[str],
    run: str | Path,
    path: str | Path,
) -> Any:
    """Grouped accuracy bars (tasks and the skills mean x models) and the DAM coefficients per layer and source
    (:func:`layer_coefficients`) as annotated heat maps: one, or for a ``row_column`` run two, the column
    coefficients and the row scales apart, each on a colour scale of its own (on one scale the contrast between
    row scales near 1 and columns near the init's lambdas would hide how either moved). Writes a PNG at ``path``;
    returns the matplotlib Figure."""
    import numpy as np
    from matplotlib.figure import Figure

    models = list(accuracy)
    groups = [*tasks, "skills mean"]
    coefficients = layer_coefficients(run)
    is_rows = coefficients.index.str.endswith(" rows")
    maps = [("DAM coefficients: mean per layer and source", coefficients)]
    if is_rows.any():
        row_scales = coefficients[is_rows].rename(index=lambda label: label.removesuffix(" rows"))
        maps = [
            ("DAM column coefficients: mean per layer and source", coefficients[~is_rows]),
            ("DAM row scales: mean per layer and source", row_scales),
        ]
    fig = Figure(figsize=(15 + 5 * (len(maps) - 1), 5.2), layout="constrained")
    bars_ax, *heat_axes = fig.subplots(1, 1 + len(maps), width_ratios=[2.6] + [1] * len(maps))
    width = 0.85 / len(models)
    x = np.arange(len(groups))
    for i, (model, colour) in enumerate(zip(models, _model_colours(models, list(skills)), strict=True)):
        values = [accuracy[model][t] for t in tasks] + [skills_mean(accuracy[model], skills)]
        bars_ax.bar(x - 0.425 + (i + 0.5) * width, values, width, label=model, color=colour, edgecolor="white", lw=0.4)
    bars_ax.set_xticks(x, groups)
    bars_ax.set_ylim(0, 105)
    bars_ax.set_ylabel("exact-match accuracy (%)")
    bars_ax.set_title("Test accuracy: base, experts, classic and learned merges, DAM")
    bars_ax.axvline(len(tasks) - 0.5, color="0.7", lw=0.8, ls="--")
    bars_ax.legend(ncol=1, fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    bars_ax.grid(axis="y", alpha=0.3)
    for ax, (title, frame) in zip(heat_axes, maps, strict=True):
        _coefficient_map(fig, ax, frame, title)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return fig


# ------------------------------------------------------------------------------------------------ the command


def _ensure_family(root: Path, quick: bool, family: Family = TOY) -> dict[str, Any]:
    """The build report of the family under ``root``: the one there; else the shipped toy family installed there
    (:func:`dam.demo.family.install_shipped_family`, no build; a copy of dam without it builds it), a tiny toy
    family built in seconds (``quick``), or the real family built (minutes to hours)."""
    from dam.demo.family import SHIPPED_FAMILY, DemoSettings, build_demo, install_shipped_family

    report_file = _report_file(root)
    if report_file.is_file():
        return json.loads(report_file.read_text())
    if family is SMOLLM2:
        from dam.demo.real import build_real

        logger.info("demo: no real family at %s: building it (SmolLM2-135M-Instruct and three experts)", root)
        return build_real(root, progress=not quick)
    if not quick:
        if (SHIPPED_FAMILY / "build_report.json").is_file():
            return install_shipped_family(root)
        logger.info("demo: no family at %s and none shipped with this copy of dam: building it", root / "models")
        return build_demo(root)
    # a tiny family in seconds, for smoke tests: the numbers mean nothing
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
    logger.info("demo: --quick: building a tiny family at %s (seconds)", root / "models")
    return build_demo(root, settings=settings, progress=False)


def run_demo(
    root: str | Path = "data/demo",
    out: str | Path = "runs/demo",
    *,
    seed: int = 0,
    force: bool = False,
    dam_overrides: Sequence[str] = (),
    quick: bool = False,
    full: bool = False,
    searches: bool = False,
    family: Family = TOY,
) -> dict[str, Any]:
    """The demo end to end (see the module docstring). Returns what ``out/results.json`` holds, plus ``table``
    (the comparison), ``goals_text`` and ``kinship_text`` (the experts' kinship matrix) as printable strings.

    ``seed`` seeds DAM's training and data order and DARE's drop (the family is built with seed 0, matching the
    committed datasets). ``quick``: a smoke run (a tiny family if one must be built, 6 DAM steps, 20 eval
    examples per task) whose numbers mean nothing. ``full``: the whole comparison, also RegMean and the family's
    learned baselines (:data:`FAMILY_BASELINES`, each a DAM run of the default budget); without it the run is
    DAM against the classic merges. ``searches``: also run the greedy soup, kinship-greedy merging and CMA-ES at
    two budgets (:mod:`dam.demo.searches`), chosen on validation, evaluated on test beside DAM, and the
    quality-per-compute table (``compute``, ``compute_text``). ``family``: :data:`dam.demo.paths.TOY` (the
    shipped family, installed under ``root`` if none is there) or :data:`dam.demo.paths.SMOLLM2` (the real family,
    :mod:`dam.demo.real`: its base and experts are scored once by the build, whose figures the run reuses, and its
    searches are the greedy soup and a small CMA-ES).

    ``seconds`` (in ``results.json``) holds every phase's wall seconds: ``family``, ``dam``, ``merges`` (the
    classic ones), with ``full`` ``regmean`` and each learned baseline by name, with ``searches`` ``searches``,
    then ``eval``, ``plots`` and ``total``."""
    from dam.demo.family import format_kinship_matrix, torch_threads
    from dam.demo.searches import compute_table

    start = time.perf_counter()
    root, out = Path(root), Path(out)
    config = dam_config(root, out, seed=seed, overrides=dam_overrides, quick=quick, family=family)
    _check_out(out, config, force)
    fingerprint = _family_fingerprint(root)
    if fingerprint is not None:  # a family there already: its runs are checked before any work
        _check_family(out, root, fingerprint)
    for method in CLASSIC_METHODS:  # config errors before any heavy work
        merge_config_text(method, root, seed, family)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    with phase(f"demo: the {family.name} family in {root / 'models'}", log=logger):
        report = _ensure_family(root, quick, family)
    skills = list(report["skills"])
    seconds["family"] = time.perf_counter() - t0
    if fingerprint is None:  # the family was installed or built just now: its report is checked now
        fingerprint = _family_fingerprint(root)  # (the shipped toy family installs the same report each time)
        _check_family(out, root, fingerprint)
    out.mkdir(parents=True, exist_ok=True)
    (out / FAMILY_FILE).write_text(json.dumps({"build_report_sha256": fingerprint}) + "\n")

    tasks = [family.general, *skills]
    limit = QUICK_EVAL_LIMIT if quick else None
    batch = 32 if family is SMOLLM2 else 100
    reused = family is SMOLLM2 and not quick  # the build scored the base and the experts on both splits
    evaluated: dict[str, dict[str, Any]] = {"validation": {}, "test": {}}  # split -> model -> EvalResult

    def evaluate(models: dict[str, Path], bars: bool = True) -> None:
        if not models:
            return
        t0 = time.perf_counter()
        what = (
            f"demo: evaluating {len(models)} model{'s' * (len(models) > 1)} on {len(tasks)} tasks' validation and test"
        )
        with phase(what, log=logger):
            for split, done in evaluated.items():
                kwargs = {"split": split, "limit": limit, "batch_size": batch, "bars": bars}
                done.update({r.model: r for r in evaluate_models(models, root, tasks, **kwargs)})
        seconds["eval"] = seconds.get("eval", 0.0) + time.perf_counter() - t0

    from dam.training.run_dir import MERGED_DIR

    family_models = {} if reused else {name: root / report["models"][name] for name in ["base", *skills]}
    t0 = time.perf_counter()
    classic = "demo: classic merges ({}) into {}".format(", ".join(CLASSIC_METHODS), out / "merges")
    seconds["dam"] = 0.0  # first in the summary, whichever order the phases end in
    beside = family.beside_dam and not _dam_run_complete(out)
    if beside:  # the merges and the evaluation that need no DAM run on one core, DAM on the others
        import torch

        cores = torch.get_num_threads()
        with dam_beside(config, threads=max(1, cores - 1)) as finish_dam, torch_threads(1):
            t1 = time.perf_counter()
            with phase(classic + " beside DAM, at 1 thread", log=logger):
                merges, costs = classic_merges(root, out / "merges", seed=seed, family=family, threads=1)
            seconds["merges"] = time.perf_counter() - t1
            evaluate(family_models | merges, bars=False)
            run, dam_status, dam_cost = finish_dam()
        seconds["dam"] = time.perf_counter() - t0
    else:
        run, dam_status, dam_cost = train_dam(config)
        seconds["dam"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        with phase(classic, log=logger):
            merges, costs = classic_merges(root, out / "merges", seed=seed, family=family)
        seconds["merges"] = time.perf_counter() - t0
    dam_compute_file = out / "dam_compute.json"  # DAM's training cost, kept for reruns that reuse the run
    if dam_status == "trained" or not dam_compute_file.is_file():
        from dam.demo.searches import dam_forward_tokens

        dam_compute = {"seconds": seconds["dam"] if dam_status == "trained" else None}
        dam_compute["forward_tokens"] = dam_forward_tokens(config)
        dam_compute_file.write_text(json.dumps(dam_compute) + "\n")
    dam_compute = json.loads(dam_compute_file.read_text())
    learned: dict[str, Path] = {}
    if full:
        learned, learned_costs, learned_seconds = learned_merges(
            config, root, out, seed=seed, overrides=dam_overrides, quick=quick, family=family
        )
        costs |= learned_costs
        seconds |= learned_seconds
    costs |= {"dam": dam_cost}

    models = family_models | merges | learned | {"dam": run / MERGED_DIR}
    compute: dict[str, dict[str, Any]] = {"dam": dam_compute}
    if searches:
        from dam.demo.searches import run_searches

        t0 = time.perf_counter()
        with phase("demo: searches (greedy soup, kinship-greedy, CMA-ES), chosen on validation", log=logger):
            kept = run_searches(root, out, seed=seed, quick=quick, limit=limit, family=family)
        seconds["searches"] = time.perf_counter() - t0
        models.update({name: Path(k["path"]) for name, k in kept.items()})
        compute.update({name: {k: v for k, v in c.items() if k != "path"} for name, c in kept.items()})
    evaluate({name: path for name, path in models.items() if name not in evaluated["test"]})
    validation = [evaluated["validation"][name] for name in models]
    results = [evaluated["test"][name] for name in models]
    accuracy = {r.model: {t.task: t.accuracy for t in r.tasks} for r in results}
    validation_accuracy = {r.model: {t.task: t.accuracy for t in r.tasks} for r in validation}
    if reused:
        accuracy = {name: report["accuracy"][name] for name in ["base", *skills]} | accuracy
        validation_accuracy = {n: report["validation_accuracy"][n] for n in ["base", *skills]} | validation_accuracy
    goals = goal_checks(accuracy, skills, general=family.general if family is SMOLLM2 else None)

    t0 = time.perf_counter()
    plot_results(accuracy, tasks, skills, run, out / "results.png")
    from dam.evaluation.analysis import load_coefficient_table, plot_coefficient_heatmap

    plot_coefficient_heatmap(load_coefficient_table(run), path=out / "coefficients.png")
    seconds["plots"] = time.perf_counter() - t0
    seconds["total"] = time.perf_counter() - start
    summary = {
        "family": family.name,
        "root": portable_reference(root, out),
        "seed": seed,
        "quick": quick,
        "full": full,
        "dam_run": portable_reference(run, out),
        "dam_status": dam_status,
        "beside_dam": beside,
        "tasks": tasks,
        "skills": skills,
        "accuracy": accuracy,
        "validation_accuracy": validation_accuracy,
        "models": [r.to_dict() for r in results],
        "validation_models": [r.to_dict() for r in validation],
        "goals": goals,
        "costs": costs,
        "dam_options": {"granularity": config.dam.granularity, "objective": config.loss.objective},
        "kinship": report["kinship"],
        "seconds": seconds,
        "compute": compute,
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    return {
        **summary,
        "table": format_comparison(accuracy, tasks, skills, costs),
        "goals_text": format_goals(goals),
        "kinship_text": format_kinship_matrix(report),
        "compute_text": compute_table(compute, {m: skills_mean(accuracy[m], skills) for m in compute}),
    }
