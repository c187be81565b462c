"""Quality of the demo merge over several seeds: ``dam demo run``'s comparison, mean and spread per method and task.

For each seed S in ``--seeds`` it runs :func:`dam.demo.run.run_demo` into ``WORKDIR/seed<S>`` with DAM's training
seed and data order set to S (``train.seed``, ``data.seed``) and DARE's random drop seeded with S; the family is
the one under ``--root`` (built once with seed 0 if missing: rebuilding it per seed takes ~5-8 min each on 2 CPU
cores). ``--family-seeds`` also rebuilds a family per listed seed under ``WORKDIR/family<F>`` (datasets and
models of that seed) and runs every ``--seeds`` seed on it, for when someone has the time.

Settings are chosen on validation and reported on test: ``--grid KEY=V1,V2`` (repeatable) makes one candidate
DAM config per combination of the listed values (on top of the positional overrides); every candidate runs on
every seed, and the one with the best mean *validation* score (the worst skill's DAM / expert ratio, then the
skills mean) is the one whose *test* figures are printed. Without ``--grid`` there is one candidate.

Prints, per model (base, experts, classic merges, RegMean, AdaMerging, DAM at each granularity) and task, the
mean and population std of the exact-match test accuracy over all runs, the same for the mean over the skills,
each run's time and peak memory per merge, and the two goals of issue 5 checked on the
means: DAM's skills mean >= the best classic method's + 5 points, and DAM >= 90% of each expert's own accuracy;
then every learned merge's worst skill / expert ratio (issue 10's goal: the best learned merge >= 90%).
Writes every run's accuracies (validation and test) and the summary to ``WORKDIR/quality.json``.

    python benchmarks/quality.py [--seeds 0 1 2] [--root data/demo] [--workdir runs/quality]
                                 [--grid train.lr=1e-2,3e-2 ...] [overrides ...]

``--searches`` adds the searches of ``dam demo run --searches`` (greedy soup, kinship-greedy merging, CMA-ES at
two budgets; each selects on validation) to every run, reported on test beside DAM, and prints the mean compute
(wall seconds, forward tokens) of each method: the quality-per-compute table.

Existing seed folders of the same config are reused; ``--force`` retrains them. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import statistics
import time
from pathlib import Path

from dam.demo.run import CLASSIC_METHODS, format_comparison, goal_checks, run_demo, skills_mean


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.pstdev(values)


def candidates(grid: list[str]) -> list[list[str]]:
    """``["a=1,2", "b=x"]`` -> ``[["a=1", "b=x"], ["a=2", "b=x"]]``: one override list per combination."""
    axes = []
    for item in grid:
        key, sep, values = item.partition("=")
        if not sep or not key or not values:
            raise SystemExit(f"--grid {item!r}: expected KEY=V1,V2,...")
        axes.append([f"{key}={v}" for v in values.split(",")])
    return [list(c) for c in itertools.product(*axes)]


def validation_score(runs: list[dict], skills: list[str]) -> tuple[float, float]:
    """Mean over runs of (worst skill's DAM / expert validation ratio, DAM's validation skills mean): higher wins."""
    worst = [min(goal_checks(r["validation_accuracy"], skills)["retention"].values()) for r in runs]
    means = [skills_mean(r["validation_accuracy"]["dam"], skills) for r in runs]
    return statistics.fmean(worst), statistics.fmean(means)


def summarise(runs: list[dict], tasks: list[str], skills: list[str]) -> dict:
    """Per model and task (and ``skills mean``): mean and population std over the runs; goals on the means."""
    models = list(runs[0]["accuracy"])
    columns = [*tasks, "skills mean"]
    per_run = {m: {c: [] for c in columns} for m in models}
    for run in runs:
        for m in models:
            for t in tasks:
                per_run[m][t].append(run["accuracy"][m][t])
            per_run[m]["skills mean"].append(skills_mean(run["accuracy"][m], skills))
    stats = {m: {c: _mean_std(v) for c, v in cols.items()} for m, cols in per_run.items()}
    means = {m: {t: stats[m][t][0] for t in tasks} for m in models}
    return {"stats": stats, "goals_on_means": goal_checks(means, skills), "runs": len(runs)}


def format_summary(summary: dict, tasks: list[str]) -> str:
    columns = [*summary["stats"]["dam"]]
    width = max(len("accuracy % (mean ± std)"), *(len(m) for m in summary["stats"]))
    cells = {
        m: [f"{mu:.1f} ± {sd:.1f}" for mu, sd in (row[c] for c in columns)] for m, row in summary["stats"].items()
    }
    widths = [max(len(c), *(len(cells[m][j]) for m in cells)) for j, c in enumerate(columns)]
    header = [c.rjust(w) for c, w in zip(columns, widths, strict=True)]
    lines = ["  ".join(["accuracy % (mean ± std)".ljust(width), *header])]
    for m, row in cells.items():
        lines.append("  ".join([m.ljust(width), *(c.rjust(w) for c, w in zip(row, widths, strict=True))]))
    goals = summary["goals_on_means"]
    lines.append("")
    lines.append(
        f"DAM skills mean {goals['dam_skills_mean']:.1f} vs best classic ({goals['best_classic']}) "
        f"{goals['best_classic_skills_mean']:.1f}: {goals['margin']:+.1f} points "
        f"(goal >= +5: {'met' if goals['margin_goal_met'] else 'NOT met'})"
    )
    ratios = ", ".join(f"{s} {100 * r:.0f}%" for s, r in goals["retention"].items())
    lines.append(
        f"DAM / expert on its own skill: {ratios} (goal >= 90%: {'met' if goals['retention_goal_met'] else 'NOT met'})"
    )
    worst = goals["worst_retention"]
    if worst:
        best = max(worst, key=worst.__getitem__)
        learned = ", ".join(f"{m} {100 * r:.0f}%" for m, r in worst.items())
        verdict = "met" if worst[best] >= 0.9 else "NOT met"
        lines.append(f"worst skill / its expert per learned merge: {learned} (best: {best}; goal >= 90%: {verdict})")
    return "\n".join(lines)


def format_compute(runs: list[dict]) -> str:
    """Mean wall seconds and forward tokens per method over the runs (DAM's tokens estimated; see
    dam.demo.searches)."""
    lines = ["compute (mean over runs)   wall s  forward tokens  evaluations"]
    for name in runs[0]["compute"]:
        rows = [r["compute"][name] for r in runs]
        seconds = [c["seconds"] for c in rows if c["seconds"] is not None]
        wall = f"{statistics.fmean(seconds):.0f}" if seconds else "n/a"
        tokens = statistics.fmean(c["forward_tokens"] for c in rows) / 1e6
        evaluations = rows[0].get("evaluations")
        lines.append(f"{name:<25}{wall:>8}{tokens:>15.2f}M{evaluations if evaluations is not None else '-':>13}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="DAM/data/DARE seeds (default 0 1 2)")
    parser.add_argument("--root", default="data/demo", help="demo family folder (default data/demo)")
    parser.add_argument("--family-seeds", type=int, nargs="*", default=[], help="also rebuild a family per seed")
    parser.add_argument("--workdir", default="runs/quality", help="where the runs and quality.json go")
    parser.add_argument("--force", action="store_true", help="retrain seed folders of another config")
    parser.add_argument(
        "--grid", action="append", default=[], help="KEY=V1,V2: candidate values, chosen on validation"
    )
    parser.add_argument(
        "--searches",
        action="store_true",
        help="also the greedy soup, kinship-greedy merge and CMA-ES at two budgets (chosen on validation), with the "
        "compute each took",
    )
    parser.add_argument("overrides", nargs="*", help="key=value overrides of dam/demo/configs/dam.yaml")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    workdir = Path(args.workdir)
    families = [("default", Path(args.root))] + [(f"family{f}", workdir / f"family{f}") for f in args.family_seeds]
    grid = candidates(args.grid)
    runs: dict[int, list[dict]] = {c: [] for c in range(len(grid))}
    t0 = time.perf_counter()
    for label, root in families:
        if label != "default" and not (root / "models" / "build_report.json").is_file():
            from dam.demo.family import build_demo

            build_demo(root, int(label.removeprefix("family")), progress=False)
        for c, extra in enumerate(grid):
            for seed in args.seeds:
                out = workdir / (f"{label}-seed{seed}" + (f"-c{c}" if len(grid) > 1 else ""))
                overrides = [*args.overrides, *extra]
                summary = run_demo(
                    root, out, seed=seed, force=args.force, dam_overrides=overrides, full=True, searches=args.searches
                )
                print(
                    f"{label} seed {seed} {' '.join(extra)} (DAM {summary['dam_status']}, "
                    f"{summary['seconds']['dam']:.0f} s), test accuracy:"
                )
                table = format_comparison(summary["accuracy"], summary["tasks"], summary["skills"], summary["costs"])
                print(table, flush=True)
                if args.searches:
                    print(summary["compute_text"], flush=True)
                runs[c].append(
                    {
                        "family": label,
                        "seed": seed,
                        "overrides": extra,
                        "accuracy": summary["accuracy"],
                        "validation_accuracy": summary["validation_accuracy"],
                        "seconds": summary["seconds"],
                        "costs": summary["costs"],
                        "compute": summary["compute"],
                    }
                )
    tasks, skills = summary["tasks"], summary["skills"]
    scores = {c: validation_score(r, skills) for c, r in runs.items()}
    chosen = max(scores, key=scores.__getitem__)
    result = summarise(runs[chosen], tasks, skills)
    n_runs = sum(len(r) for r in runs.values())
    print(f"\n{n_runs} runs in {time.perf_counter() - t0:.0f} s; classic methods: {', '.join(CLASSIC_METHODS)}")
    for c, (worst, mean) in scores.items():
        mark = "  <- chosen" if c == chosen else ""
        label = " ".join(grid[c]) or "defaults"
        print(f"validation: {label}: worst skill ratio {worst:.3f}, skills mean {mean:.1f}{mark}")
    print("test accuracy of the chosen settings:")
    print(format_summary(result, tasks))
    if args.searches:
        print(format_compute(runs[chosen]))
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "quality.json").write_text(
        json.dumps(
            {
                "seeds": args.seeds,
                "families": [f for f, _ in families],
                "overrides": args.overrides,
                "grid": grid,
                "chosen": grid[chosen],
                "validation_scores": [scores[c] for c in runs],
                "runs": [r for c in runs for r in runs[c]],
                **result,
            },
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
