"""Model soups (Wortsman et al., 2022): the uniform average of the candidates, and the greedy soup.

Greedy soup: score every candidate on the held-out fitness, sort them best first, start the soup with the best,
then for each next candidate score the average of the soup plus it, and keep it if the score does not drop
(``>=``, the paper's rule: on a small validation set ties are common, and a tie keeps the ingredient); with
``strict: true`` only if it strictly improves (``>``). One pass; every average is the registry's ``linear`` merge
with equal weights (``normalize: true``), computed in memory by the streaming engine.

Every evaluation is part of the result, so the first one that fails (the merge or the fitness raises a user
error, or the score is not a finite number) stops the soup with a one-line error naming it; nothing is written.

:func:`run_soup` writes, all at once when it finishes (nothing at ``out`` otherwise):

- ``soup.json``: every candidate's score, the uniform soup's, each greedy step (candidate, score, kept) and the
  compute (wall time, forward tokens);
- ``evaluations.jsonl``: one line per evaluation;
- ``greedy.yaml`` / ``uniform.yaml``: the two soups as mergekit configs, and ``greedy/`` / ``uniform/`` the merged
  models (``dam merge greedy.yaml DIR`` or ``mergekit-yaml greedy.yaml DIR``, run from ``out``, remakes them).

Local models are written relative to ``out`` (``./x``, ``../x``; :mod:`dam.io.paths`), Hub ids as given.
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
from dam.io.paths import portable_paths, portable_reference
from dam.io.writer import atomic_output_dir
from dam.merge.config import MergeConfig, parse_merge_config
from dam.merge.engine import plan_merge, run_merge
from dam.search.config import SoupConfig, config_dict
from dam.search.fitness import CandidateEvaluator, Fitness, Score
from dam.search.records import SearchLog, first_missing, saved_config

logger = logging.getLogger(__name__)


def average_config(models: Sequence[str], dtype: str | None = None, origin: str = "soup") -> MergeConfig:
    """The mergekit config of the uniform average of ``models`` (``linear``, weight 1 each, normalised)."""
    data: dict[str, Any] = {
        "merge_method": "linear",
        "models": [{"model": m, "parameters": {"weight": 1.0}} for m in models],
        "parameters": {"normalize": True},
    }
    if dtype is not None:
        data["dtype"] = dtype
    text = f"# {origin}: the uniform average of {len(models)} model(s), made by dam soup\n"
    text += yaml.safe_dump(data, sort_keys=False)
    return parse_merge_config(data, text, origin=origin)


def check_candidates(config: MergeConfig) -> None:
    """Plan ``config``'s merge from the headers only: models of different architectures, vocabularies or tensors
    fail here, before any evaluation."""
    plan_merge(config).close()


def greedy_soup(
    candidates: dict[str, Score], evaluate: Any, *, strict: bool = False
) -> tuple[list[str], float, list[dict[str, Any]]]:
    """The greedy soup of ``candidates`` (model -> its own score) with ``evaluate(models) -> Score`` scoring an
    average. A candidate is kept when the soup with it scores at least the soup's score (``strict``: more than).
    Candidates are tried best first (equal scores in their given order). Returns the kept models, the soup's
    score and the first step, then one per candidate after the first."""
    order = sorted(candidates, key=lambda m: candidates[m].score, reverse=True)  # stable: ties keep their order
    kept, best = [order[0]], candidates[order[0]].score
    steps = [{"model": order[0], "score": best, "kept": True, "soup": list(kept)}]
    for model in order[1:]:
        score = evaluate([*kept, model]).score
        keep = score > best if strict else score >= best
        if keep:
            kept, best = [*kept, model], score
        steps.append({"model": model, "score": score, "kept": keep, "soup": list(kept)})
        logger.info("greedy soup: + %s -> %.4f (%s)", model, score, "kept" if keep else "dropped")
    return kept, best, steps


def run_soup(config: SoupConfig, out: str | Path, *, force: bool = False) -> dict[str, Any]:
    """Uniform and greedy soups of ``config.models`` (see the module docstring). Returns what ``soup.json`` holds."""
    fitness = Fitness(config.fitness)
    uniform = average_config(config.models, config.dtype, "uniform soup")
    check_candidates(uniform)
    out = Path(out).expanduser().absolute()
    created = first_missing(out)
    try:
        return _soup(config, out, force, fitness, uniform)
    except BaseException:
        if created is not None and created != out:  # the parents made for OUT (OUT itself is written at the end)
            shutil.rmtree(created, ignore_errors=True)
        raise


def _soup(config: SoupConfig, out: Path, force: bool, fitness: Fitness, uniform: MergeConfig) -> dict[str, Any]:
    """The soups of :func:`run_soup`, written to ``out`` all at once."""
    started = time.perf_counter()
    with atomic_output_dir(out, force=force) as tmp:
        log = SearchLog(tmp / "evaluations.jsonl", config.wandb, saved_config(config, out), tmp, "soup")
        evaluator = CandidateEvaluator(fitness, config.models[0])
        try:

            def evaluate(models: list[str], kind: str) -> Score:
                named = [portable_reference(m, out) for m in models]
                try:
                    score = evaluator.merge(average_config(models)) if len(models) > 1 else evaluator.model(models[0])
                except DamError as e:
                    what = f"candidate {models[0]}" if kind == "candidate" else f"the {kind} soup of {models}"
                    raise DamError(f"soup: {what} failed, so the soup stops and writes nothing: {e}") from None
                log.log({"evaluation": evaluator.evaluations, "kind": kind, "models": named, **score.to_dict()})
                return score

            candidates = {m: evaluate([m], "candidate") for m in config.models}
            uniform_score = evaluate(list(config.models), "uniform")
            kept, best, steps = greedy_soup(
                candidates, lambda models: evaluate(models, "greedy"), strict=config.strict
            )
        finally:
            log.close()
        greedy = average_config(kept, config.dtype, "greedy soup")
        for name, merge in (("uniform", uniform), ("greedy", greedy)):
            (tmp / f"{name}.yaml").write_text(merge.portable_text(out), encoding="utf-8")
            run_merge(merge, tmp / name, progress=False)
        summary = {
            "fitness": fitness.describe(),
            "candidates": {m: s.to_dict() for m, s in candidates.items()},
            "uniform": {"models": list(config.models), **uniform_score.to_dict()},
            "greedy": {"models": kept, "score": best, "steps": steps},
            "compute": {
                "evaluations": evaluator.evaluations,
                "evaluation_seconds": evaluator.seconds,
                "forward_tokens": evaluator.tokens,
                "wall_seconds": time.perf_counter() - started,
            },
            "config": config_dict(config),
        }
        (tmp / "soup.json").write_text(json.dumps(portable_summary(summary, out), indent=2) + "\n", encoding="utf-8")
    return summary


def portable_summary(summary: dict[str, Any], folder: Path) -> dict[str, Any]:
    """``summary`` as ``soup.json`` in ``folder`` holds it: models relative to ``folder``, Hub ids as given."""

    def ref(model: str) -> str:
        return portable_reference(model, folder)

    greedy = summary["greedy"]
    steps = [{**s, "model": ref(s["model"]), "soup": [ref(m) for m in s["soup"]]} for s in greedy["steps"]]
    return {
        **summary,
        "candidates": {ref(m): s for m, s in summary["candidates"].items()},
        "uniform": {**summary["uniform"], "models": [ref(m) for m in summary["uniform"]["models"]]},
        "greedy": {**greedy, "models": [ref(m) for m in greedy["models"]], "steps": steps},
        "config": portable_paths(summary["config"], folder),
    }


def format_soup(summary: dict[str, Any]) -> str:
    """The candidates' scores, the uniform soup's, and the greedy soup step by step."""
    lines = [f"fitness: {summary['fitness']}", "candidates (best first):"]
    ranked = sorted(summary["candidates"].items(), key=lambda kv: kv[1]["score"], reverse=True)
    lines += [f"  {s['score']:10.4f}  {m}" for m, s in ranked]
    lines.append(f"uniform soup of {len(summary['uniform']['models'])}: {summary['uniform']['score']:.4f}")
    rule = "strictly improves" if summary["config"].get("strict") else "does not drop"
    lines.append(f"greedy soup (a candidate is kept when the score {rule}):")
    for step in summary["greedy"]["steps"]:
        mark = "kept" if step["kept"] else "dropped"
        lines.append(f"  + {step['model']}: {step['score']:.4f} ({mark}; soup of {len(step['soup'])})")
    lines.append(f"greedy soup of {len(summary['greedy']['models'])}: {summary['greedy']['score']:.4f}")
    c = summary["compute"]
    lines.append(
        f"compute: {c['evaluations']} evaluations, {c['evaluation_seconds']:.1f} s evaluating, "
        f"{c['forward_tokens']} forward tokens"
    )
    return "\n".join(lines)
