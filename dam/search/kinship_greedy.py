"""Top-k greedy merging with model kinship (Hu et al., 2024): ``dam evolve`` with ``strategy: kinship_greedy``.

The population starts as the input models, each scored on the fitness. Each generation:

1. the top ``k`` members by score are taken, and their kinship (cosine or Pearson similarity of their task
   vectors against the base, :func:`dam.evaluation.kinship.model_kinship`) is measured pairwise; when the mean
   pairwise kinship exceeds ``stop_kinship`` the search stops (the top models have become one model: the study
   stopped there and saved about 30% of the compute);
2. every pair of the top ``k`` not merged before is merged (``slerp`` by default: from the better model toward
   the other by ``t``; ``linear``; or a task-arithmetic method over the base), and, with ``exploration``, the
   best member with the member least related to it by kinship (the exploration merge that escapes the local
   optimum plain greedy merging stalls in);
3. the merges are written under ``OUT/models/`` (later generations merge them and measure their kinship), scored
   and added to the population.

It stops after ``max_generations``, when no new pair is left, at the kinship threshold, or when the budget is
spent. ``OUT/members.jsonl`` holds one line per scored member (its parents, generation, score and cost),
``OUT/generations.jsonl`` one per generation (top-k, their kinships, the merges made, why it stopped). A killed
search run again replays the recorded members without re-evaluating them and continues.

A merge that fails (the merge or its fitness raises a user error, or the score is not a finite number) is logged
as one warning, recorded in ``members.jsonl`` with ``"score": null`` and its ``error``, counts against the budget
and joins no generation; its pair is not merged again. The search stops with a one-line error when an input model
fails (the inputs are its start: a new search then leaves ``OUT`` as it found it) or when
``budget.max_failures_in_a_row`` merges in a row fail (``OUT`` is kept: run it again to continue).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import yaml

from dam.errors import DamError
from dam.evaluation.kinship import model_kinship
from dam.io.paths import portable_reference, resolve_reference
from dam.merge.config import MergeConfig, load_saved_merge_config, parse_merge_config
from dam.merge.engine import plan_merge, run_merge
from dam.search.config import PAIR_DEFAULTS, EvolveConfig, KinshipGreedy
from dam.search.fitness import CandidateEvaluator, Fitness
from dam.search.records import (
    SearchLog,
    first_missing,
    plot_fitness,
    prepare_out,
    read_records,
    restore_out,
    saved_config,
)
from dam.search.soup import average_config, check_candidates

logger = logging.getLogger(__name__)


def pair_config(settings: KinshipGreedy, better: str, other: str, base: str, header: str) -> MergeConfig:
    """The mergekit config merging two members with ``settings.method`` (``better`` is slerp's starting point)."""
    method = settings.method
    params = dict(PAIR_DEFAULTS[method] if settings.parameters is None else settings.parameters)
    data: dict[str, Any] = {"merge_method": method}
    if method == "slerp":
        data["base_model"] = better
    elif method != "linear":
        data["base_model"] = base
    data["models"] = [{"model": better}, {"model": other}]
    data["parameters"] = params
    return parse_merge_config(data, header + yaml.safe_dump(data, sort_keys=False), origin="kinship_greedy")


class _Kinship:
    """Kinship of two members against the base, measured once per pair (cached in ``OUT/kinship.jsonl``)."""

    def __init__(self, base: str, measure: str, path: Path):
        self.base, self.measure, self.path = base, measure, path
        records = read_records(path)
        self.cache = {frozenset((r["a"], r["b"])): r["value"] for r in records}
        self.seconds = sum(r["seconds"] for r in records)  # of every measurement, a resumed search's included

    def __call__(self, a: tuple[str, str], b: tuple[str, str]) -> float:
        """Kinship of members ``(name, path)`` ``a`` and ``b``; nan where a task vector is zero."""
        key = frozenset((a[0], b[0]))
        if key not in self.cache:
            started = time.perf_counter()
            value = getattr(model_kinship(a[1], b[1], self.base).overall, self.measure)
            seconds = time.perf_counter() - started
            self.seconds += seconds
            self.cache[key] = None if math.isnan(value) else value
            record = {"a": a[0], "b": b[0], "value": self.cache[key], "seconds": seconds}
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        value = self.cache[key]
        return math.nan if value is None else value


def run_kinship_greedy(config: EvolveConfig, out: str | Path, *, force: bool = False) -> dict[str, Any]:
    """Run (or resume) the kinship-guided greedy search of ``config`` into ``out``; see the module docstring."""
    settings = config.kinship_greedy
    assert settings is not None
    fitness = Fitness(config.fitness)
    check_candidates(average_config([*config.models, config.base_model]))  # one architecture, headers only
    # the pair merge's parameters and the models, headers only
    plan_merge(pair_config(settings, config.models[0], config.models[1], config.base_model, "")).close()
    out = Path(out).expanduser().absolute()
    created = first_missing(out)
    resumed = prepare_out(out, config, force)
    try:
        return _search(config, out, fitness)
    except _StartFailed as e:
        where = "leaves nothing in" if not resumed else "keeps"
        if not resumed:
            restore_out(out, created)  # a new search stopped before its start was scored: OUT as found
        raise DamError(
            f"kinship_greedy: input model {e.model!r} failed, so the search stops and {where} {out}: {e}"
        ) from None
    except BaseException:
        if not resumed and not (out / "members.jsonl").is_file():  # stopped before any member was scored
            restore_out(out, created)
        raise


class _StartFailed(DamError):
    """An input model (the start) failed; the message is why."""

    def __init__(self, model: str, reason: str):
        super().__init__(reason)
        self.model = model


def _search(config: EvolveConfig, out: Path, fitness: Fitness) -> dict[str, Any]:
    """The search of :func:`run_kinship_greedy` in the prepared folder ``out``."""
    settings = config.kinship_greedy
    assert settings is not None
    (out / "models").mkdir(exist_ok=True)
    # members.jsonl names models relative to ``out``: resolved back to where they are
    done = {r["name"]: {**r, "path": resolve_reference(r["path"], out)} for r in read_records(out / "members.jsonl")}
    log = SearchLog(out / "members.jsonl", config.wandb, saved_config(config, out), out, "kinship_greedy")
    evaluator = CandidateEvaluator(fitness, config.base_model, seed=config.seed)
    kinship = _Kinship(config.base_model, settings.measure, out / "kinship.jsonl")
    members: dict[str, dict[str, Any]] = {}
    failed: dict[str, dict[str, Any]] = {}  # merges whose evaluation failed: they count, but join no generation
    in_a_row: list[str] = []  # this run's failures since its last scored merge
    merged: set[frozenset[str]] = set()  # pairs merged so far
    generations: list[dict[str, Any]] = []
    budget = config.budget

    def spent() -> bool:
        count = len(members) + len(failed)
        seconds = sum(m["seconds"] for m in [*members.values(), *failed.values()])
        return (budget.evaluations is not None and count >= budget.evaluations) or (
            budget.seconds is not None and seconds >= budget.seconds
        )

    def add(name: str, path: str, generation: int, parents: list[str], merge: MergeConfig | None) -> None:
        if name in done:
            (failed if done[name]["score"] is None else members)[name] = done[name]
            return
        started = time.perf_counter()
        try:
            if merge is not None:
                run_merge(merge, path, force=True, seed=config.seed, progress=False)  # a killed run's is redone
            merge_seconds = time.perf_counter() - started
            score = evaluator.model(path)
        except DamError as e:
            if merge is None:
                raise _StartFailed(path, str(e)) from None
            in_a_row.append(str(e))
            seconds = time.perf_counter() - started
            record = {"name": name, "path": path, "generation": generation, "parents": parents, "score": None}
            failed[name] = {**record, "error": str(e), "seconds": seconds}
            log.log({**failed[name], "path": portable_reference(path, out)})
            logger.warning(
                "kinship_greedy: %s (%s) failed (%d in a row): %s", name, " + ".join(parents), len(in_a_row), e
            )
            if len(in_a_row) >= budget.max_failures_in_a_row:
                raise DamError(
                    f"kinship_greedy: {len(in_a_row)} merges in a row failed (budget.max_failures_in_a_row), so the "
                    f"search stops; {out} keeps its {len(members) + len(failed)} members (run it again to "
                    f"continue). The last failure: {e}"
                ) from None
            return
        in_a_row.clear()
        record = {
            "name": name,
            "path": path,
            "generation": generation,
            "parents": parents,
            **score.to_dict(),
            "seconds": score.seconds + merge_seconds,
        }
        members[name] = record
        log.log({**record, "path": portable_reference(path, out)})
        logger.info("kinship_greedy: %s (%s) -> %.4f", name, " + ".join(parents) or "input", score.score)

    try:
        for i, model in enumerate(config.models):
            if spent():
                break
            add(f"input{i}", model, 0, [], None)
        stop = None
        for generation in range(1, settings.max_generations + 1):
            if spent():
                stop = "budget"
                break
            ranked = sorted(members, key=lambda n: members[n]["score"], reverse=True)
            top = ranked[: settings.k]
            ref = {n: (n, members[n]["path"]) for n in members}
            pairwise = {f"{a}~{b}": kinship(ref[a], ref[b]) for a, b in itertools.combinations(top, 2)}
            finite = [v for v in pairwise.values() if not math.isnan(v)]
            mean_kinship = sum(finite) / len(finite) if finite else math.nan
            entry: dict[str, Any] = {
                "generation": generation,
                "top": {n: members[n]["score"] for n in top},
                "kinship": pairwise,
                "mean_top_kinship": mean_kinship,
                "merges": [],
            }
            generations.append(entry)
            if mean_kinship > settings.stop_kinship:
                stop = "kinship"
                break
            pairs = [(a, b, "top-k") for a, b in itertools.combinations(top, 2) if frozenset((a, b)) not in merged]
            if settings.exploration:
                best = ranked[0]
                new = [n for n in ranked[1:] if frozenset((best, n)) not in merged and n not in top]
                if new:
                    pairs.append((best, min(new, key=lambda n: _order(kinship(ref[best], ref[n]))), "exploration"))
            if not pairs:
                stop = "no new pair"
                break
            for j, (a, b, why) in enumerate(pairs):
                if spent():
                    break
                name = f"gen{generation}-{j}"
                header = f"# dam evolve kinship_greedy: {name} = {a} + {b} ({why})\n"
                merge = pair_config(settings, members[a]["path"], members[b]["path"], config.base_model, header)
                merged.add(frozenset((a, b)))
                add(name, str(out / "models" / name), generation, [a, b], merge)
                made = members.get(name) or failed[name]  # a failed merge: score None
                entry["merges"].append({"name": name, "parents": [a, b], "why": why, "score": made["score"]})
    finally:
        log.close()
    if stop is None:
        stop = "budget" if spent() else "max_generations"
    if generations:
        generations[-1]["stop"] = stop
    _write_lines(out / "generations.jsonl", generations)
    return _finish(config, out, members, failed, generations, stop, evaluator, kinship)


def _order(value: float) -> float:
    """Sort key of a kinship: nan (a zero task vector) last."""
    return math.inf if math.isnan(value) else value


def _write_lines(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _finish(
    config: EvolveConfig,
    out: Path,
    members: dict[str, dict[str, Any]],
    failed: dict[str, dict[str, Any]],
    generations: list[dict[str, Any]],
    stop: str,
    evaluator: CandidateEvaluator,
    kinship: _Kinship,
) -> dict[str, Any]:
    if not members:
        raise DamError("kinship_greedy: the budget allowed no evaluation")
    best = max(members.values(), key=lambda m: m["score"])
    if best["parents"]:
        config_text = load_saved_merge_config(best["path"]).portable_text(out)  # models relative to ``out``
        (out / "best.yaml").write_text(config_text, encoding="utf-8")
    plot_fitness([m["score"] for m in members.values()], out / "fitness.png", "dam evolve (kinship greedy)", "fitness")
    results = {
        "strategy": "kinship_greedy",
        "fitness": evaluator.fitness.describe(),
        "best": {"name": best["name"], "path": best["path"], "score": best["score"], "parents": best["parents"]},
        "best_input": max((m for m in members.values() if not m["parents"]), key=lambda m: m["score"])["score"],
        "generations": len(generations),
        "stop": stop,
        "compute": {
            "evaluations": len(members) + len(failed),
            "failed": len(failed),
            "evaluation_seconds": sum(m["seconds"] for m in [*members.values(), *failed.values()]),
            "kinship_seconds": kinship.seconds,
            "forward_tokens": sum(m.get("forward_tokens") or 0 for m in members.values()),
        },
    }
    written = {**results, "best": {**results["best"], "path": portable_reference(best["path"], out)}}
    (out / "results.json").write_text(json.dumps(written, indent=2) + "\n", encoding="utf-8")
    return results


def format_kinship_greedy(results: dict[str, Any], out: Path) -> str:
    lines = [f"fitness: {results['fitness']}"]
    for g in [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines() if line]:
        top = ", ".join(f"{n} {s:.4f}" for n, s in g["top"].items())
        lines.append(f"generation {g['generation']}: top {top}; mean kinship {g['mean_top_kinship']:.4f}")
        for m in g["merges"]:
            score = "failed" if m["score"] is None else f"{m['score']:.4f}"
            lines.append(f"  {m['name']} = {' + '.join(m['parents'])} ({m['why']}): {score}")
    b = results["best"]
    lines.append(
        f"stopped: {results['stop']}; best {b['name']} {b['score']:.4f} (best input {results['best_input']:.4f})"
    )
    c = results["compute"]
    lines.append(
        f"compute: {c['evaluations']} evaluations ({c['failed']} failed), {c['evaluation_seconds']:.1f} s evaluating "
        "and merging, "
        f"{c['kinship_seconds']:.1f} s kinship, {c['forward_tokens']} forward tokens"
    )
    return "\n".join(lines)
