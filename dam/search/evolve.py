"""Evolutionary merge search (``dam evolve``, strategy ``cmaes``): CMA-ES over a classic method's parameters.

The genotype is mergekit-evolve's: one value per layer group x model x filter x parameter. ``layer_groups``
contiguous groups of layers (near-equal sizes) each get their own values; ``filters`` (tensor-name substrings
such as ``self_attn``, ``mlp``) get their own values inside each group, every other tensor a default one. The
parameters are the method's per-model ``weight`` (and ``density`` for ties/dare_ties), or slerp's ``t``. A
genotype is written as an ordinary mergekit config: one group as ``models:``, several as ``slices:`` (one per
group, every source with its ``layer_range``), filters as ``[{filter, value}, ..., {value}]`` lists, so the
best config runs unchanged under ``dam merge`` and ``mergekit-yaml``. Embeddings take the first group's values,
the final norm and ``lm_head`` the last group's (mergekit's rule for slices).

The search is an optuna study with its CMA-ES sampler (``cmaes`` package) in a storage database (default
``sqlite:///OUT/study.db``): a killed search run again continues the same study (completed candidates and the
CMA-ES state are kept; a candidate cut off mid-evaluation is dropped), and several workers (``dam evolve`` on the
same config, one storage URL) share one study. The first candidate is mergekit-evolve's start (weight ``1/n``,
density 1, t 0.5), queued once by the worker that creates the study; CMA-ES then starts from the centre of the
ranges with a step of 1/6 of each range (optuna's defaults; mergekit-evolve's sigma). Values are rounded to 6
decimals, so the written config is the evaluated one.

Several workers: an evaluations budget is counted once over all of them. A candidate is evaluated only if the
candidates numbered before it that finished or are still being evaluated leave room in the budget; otherwise it is
dropped (optuna's ``PRUNED``, no evaluation) and its worker stops. A candidate whose worker died does not hold its
place: on this machine it is dropped as soon as its process is gone, elsewhere once its heartbeat stops (optuna's
grace period). (A time budget is checked as candidates finish, so each worker may pass it by one candidate.) A
stopping worker waits for the candidates other workers were still evaluating, then writes the outputs under a
file lock in ``OUT``; the outputs of a study that has not changed are not rewritten.

Each candidate is merged in memory by the streaming engine and scored on the fitness; nothing of it is written.
A candidate fails when its merge or its fitness raises a user error or its score is not a finite number: one
warning line names it and why, the study keeps it (optuna's ``FAIL``, the reason in its ``error`` attribute), and
it counts against the budget (an evaluation, and its seconds). The search stops with a one-line error when the
start (candidate 0) fails, or when ``budget.max_failures_in_a_row`` candidates of one worker fail one after
another. A new search stopped before any candidate finished (a failed start, Ctrl-C in the first candidate, an
unreachable storage) leaves ``OUT`` as it found it, and deletes the study it created in a database server; later,
``OUT`` and the study are kept, and running the search again continues it.

When the budget (evaluations or evaluation seconds, counted over the whole study) is spent, the worker writes:

- ``best.yaml``: the best candidate's mergekit config; ``merged/``: that merge;
- ``candidates.jsonl``: one line per finished candidate, failed ones with ``"score": null`` and their ``error``
  (rewritten from the study after every candidate);
- ``fitness.png``: fitness per scored candidate and the best so far; ``results.json``: the best, the start's
  score (candidate 0's; null when it did not finish, its worker having died) and the compute (failed candidates
  included, and counted apart).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import warnings
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from filelock import FileLock

from dam.errors import DamError
from dam.io.checkpoint import CheckpointReader
from dam.merge.config import MergeConfig, parse_merge_config
from dam.merge.engine import plan_merge, run_merge
from dam.search.config import EvolveConfig, SearchSpace
from dam.search.fitness import CandidateEvaluator, Fitness
from dam.search.records import SearchLog, first_missing, plot_fitness, prepare_out, restore_out, saved_config

logger = logging.getLogger(__name__)

STUDY_NAME = "dam-evolve"
WORKER = "worker"  # the user attribute naming the worker ("host:pid") evaluating a candidate
ERROR = "error"  # the user attribute of a failed candidate: why (a FAIL without it was dropped: its worker died)
LOCK_FILE = ".lock"  # in OUT: the workers of one machine create the study, then write the outputs, one at a time
# a worker claims (sets WORKER on) a new candidate milliseconds after creating it; one unclaimed for this long was
# created by a worker that died before claiming it (generous: sampling reads the study, which may wait on a lock)
CLAIM_SECONDS = 30.0
_LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


@dataclass(frozen=True)
class Gene:
    """One searched value: parameter ``parameter`` of model ``model`` (None: a method-level one, slerp's ``t``) on
    the tensors of layer group ``group`` matching ``filter`` (None: every other tensor)."""

    group: int
    model: int | None
    filter: str | None
    parameter: str
    low: float
    high: float

    @property
    def name(self) -> str:
        where = f"g{self.group}" + (f".m{self.model}" if self.model is not None else "")
        return f"{where}.{self.filter or 'other'}.{self.parameter}"


def num_layers(model: str) -> int:
    """The layer count in ``model``'s config.json."""
    with CheckpointReader(model) as reader:
        for key in _LAYER_COUNT_KEYS:
            if isinstance(reader.config.get(key), int):
                return reader.config[key]
    raise DamError(f"model {model!r}: config.json names no layer count ({', '.join(_LAYER_COUNT_KEYS)})")


def layer_groups(layers: int, groups: int) -> list[tuple[int, int]]:
    """``groups`` contiguous ``[start, end)`` ranges covering ``layers`` layers, sizes differing by at most one."""
    if groups > layers:
        raise DamError(f"search.layer_groups is {groups} but the models have {layers} layers")
    bounds = [round(i * layers / groups) for i in range(groups + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def genes(space: SearchSpace, n_models: int, groups: int) -> list[Gene]:
    """The genotype's dimensions, group by group, model by model, filter by filter (the default last)."""
    filters: list[str | None] = [*space.filters, None]
    models: list[int | None] = [None] if space.method == "slerp" else list(range(n_models))
    out = []
    for g in range(groups):
        for m in models:
            for f in filters:
                for p in space.searched:
                    out.append(Gene(g, m, f, p, *space.bounds(p)))
    return out


def start_values(space: SearchSpace, genotype: list[Gene], n_models: int) -> dict[str, float]:
    """mergekit-evolve's starting point: weight ``1/n``, density 1, t 0.5 (clipped into the searched ranges)."""
    start = {"weight": 1.0 / n_models, "density": 1.0, "t": 0.5}
    return {g.name: min(max(start[g.parameter], g.low), g.high) for g in genotype}


def _setting(values: dict[str, float], genotype: list[Gene], group: int, model: int | None, parameter: str) -> Any:
    """One parameter's mergekit setting: a number, or a filter list ending with the default."""
    mine = {g.filter: values[g.name] for g in genotype if (g.group, g.model, g.parameter) == (group, model, parameter)}
    if list(mine) == [None]:
        return mine[None]
    return [{"filter": f, "value": v} for f, v in mine.items() if f is not None] + [{"value": mine[None]}]


def candidate_config(
    config: EvolveConfig, genotype: list[Gene], values: dict[str, float], groups: list[tuple[int, int]], header: str
) -> MergeConfig:
    """The mergekit config of one genotype (see the module docstring), its YAML text headed by ``header``."""
    space = config.search
    assert space is not None
    method = space.method
    fixed = dict(space.method_parameters)
    values = {k: round(v, 6) for k, v in values.items()}

    def model_params(group: int, model: int) -> dict[str, Any]:
        return {p: _setting(values, genotype, group, model, p) for p in space.searched}

    data: dict[str, Any] = {"merge_method": method}
    uses_base = method != "linear"
    if uses_base:
        data["base_model"] = config.base_model
    if method == "slerp":
        if len(config.models) != 1:
            raise DamError(
                f"search.method slerp merges the base with exactly one model; models has {len(config.models)}"
            )
        other = config.models[0]
        if len(groups) == 1:
            data["models"] = [{"model": config.base_model}, {"model": other}]
            fixed["t"] = _setting(values, genotype, 0, None, "t")
        else:
            data["slices"] = [
                {
                    "sources": [{"model": m, "layer_range": list(r)} for m in (config.base_model, other)],
                    "parameters": {"t": _setting(values, genotype, g, None, "t")},
                }
                for g, r in enumerate(groups)
            ]
    elif len(groups) == 1:
        data["models"] = [{"model": m, "parameters": model_params(0, i)} for i, m in enumerate(config.models)]
    else:
        slices = []
        for g, r in enumerate(groups):
            sources = [
                {"model": m, "layer_range": list(r), "parameters": model_params(g, i)}
                for i, m in enumerate(config.models)
            ]
            if uses_base:
                sources.append({"model": config.base_model, "layer_range": list(r)})
            slices.append({"sources": sources})
        data["slices"] = slices
    if fixed:
        data["parameters"] = fixed
    if config.dtype is not None:
        data["dtype"] = config.dtype
    text = header + yaml.safe_dump(data, sort_keys=False, default_flow_style=None)
    return parse_merge_config(data, text, origin="search")


# ------------------------------------------------------------------------------------------------ the search


def _storage(config: EvolveConfig, out: Path) -> Any:
    import optuna

    url = config.storage or f"sqlite:///{out / 'study.db'}"
    try:
        # heartbeats: a trial whose worker died is marked failed by the next worker once its grace period passes
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats are "experimental"
            return optuna.storages.RDBStorage(url, heartbeat_interval=30, grace_period=120)
    except Exception as e:  # a bad URL or an unreachable database server
        raise DamError(f"storage {url!r}: {e}") from None


class _Failed(Exception):
    """A candidate failed (its reason is logged and kept in the study); optuna marks it ``FAIL`` and goes on."""


def _completed(study: Any) -> list[Any]:
    from optuna.trial import TrialState

    return sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: t.number)


def _failed(study: Any) -> list[Any]:
    """The candidates whose evaluation failed (not those dropped because their worker died)."""
    from optuna.trial import TrialState

    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)) if ERROR in t.user_attrs]


def _evaluated(study: Any) -> list[Any]:
    """The candidates that count against the budget: completed and failed, by number."""
    return sorted([*_completed(study), *_failed(study)], key=lambda t: t.number)


def _start_failure(study: Any) -> str | None:
    """Why the start (candidate 0) failed, or None."""
    return next((t.user_attrs[ERROR] for t in _failed(study) if t.number == 0), None)


def _worker() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _process_gone(worker: str) -> bool:
    """Whether ``worker`` ("host:pid") ran on this machine and its process no longer exists."""
    host, _, pid = worker.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's live process
        return False
    return False


def _running(study: Any, storage: Any) -> list[Any]:
    """The candidates being evaluated, after dropping (``FAIL``) those of dead workers: a candidate of this machine
    as soon as its worker's process is gone, one of another machine when its heartbeat stops, one no worker
    claimed within :data:`CLAIM_SECONDS` of its creation (its worker died while sampling it)."""
    import optuna
    from optuna.trial import TrialState

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # as the heartbeats
        optuna.storages.fail_stale_trials(study)
    now = datetime.now()  # optuna stamps datetime_start with the local naive time too
    running = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = t.user_attrs.get(WORKER)
        if _process_gone(worker) if worker else (now - t.datetime_start).total_seconds() > CLAIM_SECONDS:
            storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)  # optuna names no public trial id
            logger.info("evolve: candidate %d: its worker (%s) died; dropped", t.number, worker or "unknown")
        else:
            running.append(t)
    return running


def _has_room(config: EvolveConfig, study: Any, storage: Any, number: int) -> bool:
    """Whether candidate ``number`` fits the evaluations budget: the candidates numbered before it that finished, are
    queued or are being evaluated leave room. Every worker counts the same candidates in the same order, so the
    budget is counted once: a candidate just created by another worker is waited for until it is claimed."""
    from optuna.trial import TrialState

    if config.budget.evaluations is None:
        return True
    while True:
        running = _running(study, storage)
        if not any(t.number < number and WORKER not in t.user_attrs for t in running):
            break
        time.sleep(0.05)
    done = [*study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.WAITING)), *_failed(study)]
    return sum(t.number < number for t in [*done, *running]) < config.budget.evaluations


def _await(study: Any, storage: Any, numbers: set[int]) -> None:
    """Wait until none of the candidates ``numbers`` (other workers') is still being evaluated."""
    while numbers & {t.number for t in _running(study, storage)}:
        time.sleep(0.5)


def _spent(study: Any) -> tuple[int, float]:
    done = _evaluated(study)
    return len(done), sum(t.user_attrs.get("seconds", 0.0) for t in done)


def _budget_left(config: EvolveConfig, study: Any) -> bool:
    count, seconds = _spent(study)
    b = config.budget
    return (b.evaluations is None or count < b.evaluations) and (b.seconds is None or seconds < b.seconds)


def _write_candidates(study: Any, path: Path) -> list[dict[str, Any]]:
    rows = [
        {"number": t.number, "score": t.value, "params": t.params, **{k: v for k, v in t.user_attrs.items()}}
        for t in _evaluated(study)
    ]
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)
    return rows


def run_evolve(config: EvolveConfig, out: str | Path, *, force: bool = False, progress: bool = True) -> dict[str, Any]:
    """Run (or resume, or join as one more worker) the CMA-ES search of ``config`` into ``out``; see the module
    docstring. Returns what ``out/results.json`` holds."""
    import optuna

    space = config.search
    assert space is not None
    fitness = Fitness(config.fitness)
    groups = layer_groups(num_layers(config.base_model), space.layer_groups)
    genotype = genes(space, len(config.models), len(groups))
    x0 = start_values(space, genotype, len(config.models))
    plan_merge(candidate_config(config, genotype, x0, groups, "")).close()  # every check, headers only
    out = Path(out).expanduser().absolute()
    created = first_missing(out)
    resumed = prepare_out(out, config, force)
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # a failed candidate is one warning of ours, no traceback
    sampler = optuna.samplers.CmaEsSampler(seed=config.seed, warn_independent_sampling=False)
    storage = study = None
    made = False  # whether this worker created the study

    def undo() -> bool:
        """A new search that finished no candidate leaves nothing: OUT as found, the study it created deleted."""
        from optuna.trial import TrialState

        try:
            states = (TrialState.COMPLETE, TrialState.RUNNING)
            if resumed or (study is not None and study.get_trials(deepcopy=False, states=states)):
                return False
            if made and config.storage is not None:  # a database server's study; the default one lives in OUT
                optuna.delete_study(study_name=STUDY_NAME, storage=storage)
            if storage is not None:
                storage.engine.dispose()
        except Exception as e:  # the database went away: the error that stopped the search is the one to report
            logger.warning("evolve: could not delete the study of the stopped search: %s", e)
            return False
        restore_out(out, created)
        return True

    try:
        with FileLock(out / LOCK_FILE):  # workers starting together: one creates the tables, the study and its start
            storage = _storage(config, out)
            try:
                study = optuna.create_study(
                    study_name=STUDY_NAME, storage=storage, sampler=sampler, direction="maximize"
                )
                made = True
                study.enqueue_trial(x0)
            except optuna.exceptions.DuplicatedStudyError:
                study = optuna.load_study(study_name=STUDY_NAME, storage=storage, sampler=sampler)
        failures = _search(config, study, storage, out, genotype, groups, fitness, resumed, progress)
        failure = _start_failure(study)
    except BaseException:
        undo()
        raise
    if failure is not None:
        where = f"leaves nothing in {out}" if undo() else f"keeps the study in {out}"
        raise DamError(f"evolve: the start (candidate 0) failed, so the search stops and {where}: {failure}")
    if failures:
        count, _ = _spent(study)
        raise DamError(
            f"evolve: {len(failures)} candidates in a row failed (budget.max_failures_in_a_row), so this worker "
            f"stops; the study keeps its {count} candidates and {out} its files (run it again to continue). "
            f"The last failure: {failures[-1]}"
        )
    _await(study, storage, {t.number for t in _running(study, storage)})
    with FileLock(out / LOCK_FILE):
        return finish(config, study, genotype, groups, out, fitness)


def _search(
    config: EvolveConfig,
    study: Any,
    storage: Any,
    out: Path,
    genotype: list[Gene],
    groups: list[tuple[int, int]],
    fitness: Fitness,
    resumed: bool,
    progress: bool,
) -> list[str]:
    """This worker's candidates, until the budget is spent, the start failed or too many failed in a row.
    Returns the reasons of the failures in a row it stopped on (empty when it did not stop on them)."""
    import optuna

    from dam.progress import progress_bar

    count, _ = _spent(study)
    state = "joining or resuming the" if resumed else "new"  # another worker may be running on the same study
    logger.info("evolve: %s study in %s, %d candidate(s) done so far", state, out, count)
    evaluator = CandidateEvaluator(fitness, config.base_model, seed=config.seed)
    log = SearchLog(None, config.wandb, saved_config(config, out), out, "evolve")
    bar = progress_bar(
        total=config.budget.evaluations,
        initial=count,
        unit="candidate",
        desc="dam evolve",
        enabled=progress,
        leave=True,
    )
    worker = _worker()
    in_a_row: list[str] = []  # this worker's failures since its last scored candidate
    limit = config.budget.max_failures_in_a_row

    def objective(trial: Any) -> float:
        trial.set_user_attr(WORKER, worker)
        if _start_failure(study) is not None:  # another worker's start failed: every worker stops
            study.stop()
            raise optuna.TrialPruned("the start failed")
        if not _has_room(config, study, storage, trial.number):
            study.stop()
            raise optuna.TrialPruned("the candidates before this one fill the budget")
        values = {g.name: trial.suggest_float(g.name, g.low, g.high) for g in genotype}
        started = time.perf_counter()
        try:
            score = evaluator.merge(candidate_config(config, genotype, values, groups, ""))
        except DamError as e:
            seconds = time.perf_counter() - started
            trial.set_user_attr(ERROR, str(e))
            trial.set_user_attr("seconds", seconds)
            in_a_row.append(str(e))
            log.log({"candidate": trial.number, "error": str(e), "seconds": seconds, "params": values})
            logger.warning("evolve: candidate %d failed (%d in a row): %s", trial.number, len(in_a_row), e)
            raise _Failed(str(e)) from None
        in_a_row.clear()
        trial.set_user_attr("metrics", score.metrics)
        trial.set_user_attr("seconds", score.seconds)
        trial.set_user_attr("forward_tokens", score.tokens)
        log.log({"candidate": trial.number, **score.to_dict(), "params": values})
        return score.score

    def after(study: Any, trial: Any) -> None:
        failed = trial.state == optuna.trial.TrialState.FAIL and ERROR in trial.user_attrs
        if trial.state != optuna.trial.TrialState.COMPLETE and not failed:
            return
        _write_candidates(study, out / "candidates.jsonl")
        bar.update()
        if not failed:
            bar.set_postfix(score=f"{trial.value:.4g}", best=f"{study.best_value:.4g}")
        if (failed and (trial.number == 0 or len(in_a_row) >= limit)) or not _budget_left(config, study):
            study.stop()

    try:
        if _budget_left(config, study) and _start_failure(study) is None:
            study.optimize(objective, callbacks=[after], catch=(_Failed,), gc_after_trial=False)
    finally:
        bar.close()
        log.close()
    return list(in_a_row) if len(in_a_row) >= limit else []


def finish(
    config: EvolveConfig, study: Any, genotype: list[Gene], groups: list[tuple[int, int]], out: Path, fitness: Fitness
) -> dict[str, Any]:
    """Write the best config and merge, the candidates, the plot and ``results.json`` from the study."""
    rows = _write_candidates(study, out / "candidates.jsonl")
    scored = [r for r in rows if r["score"] is not None]
    if not scored:
        raise DamError(f"the search in {out} finished no candidate (every one failed: see the log)")
    best = max(scored, key=lambda r: r["score"])
    header = (
        f"# dam evolve ({config.search.method if config.search else ''}, CMA-ES): best of {len(scored)} scored "
        f"candidates, candidate {best['number']}, fitness {best['score']:.6g}\n"
    )
    merge = candidate_config(config, genotype, best["params"], groups, header)
    _write_best(merge, out, config.seed)
    plot_fitness([r["score"] for r in scored], out / "fitness.png", "dam evolve (CMA-ES)", "fitness")
    start = next((r for r in scored if r["number"] == 0), None)
    results = {
        "strategy": "cmaes",
        "fitness": fitness.describe(),
        "best": {"candidate": best["number"], "score": best["score"], "params": best["params"]},
        "start_score": start["score"] if start is not None else None,  # candidate 0's: mergekit-evolve's start
        "compute": {
            "evaluations": len(rows),
            "failed": len(rows) - len(scored),
            "evaluation_seconds": sum(r.get("seconds", 0.0) for r in rows),
            "forward_tokens": sum(r.get("forward_tokens") or 0 for r in rows),
        },
        "dimensions": len(genotype),
        "layer_groups": [list(g) for g in groups],
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return results


def _write_best(merge: MergeConfig, out: Path, seed: int) -> None:
    """``best.yaml`` (local models relative to ``out``) and ``merged/`` (remade only when the best changed)."""
    best_file = out / "best.yaml"
    text = merge.portable_text(out)
    if best_file.is_file() and best_file.read_text() == text and (out / "merged" / "config.json").is_file():
        return
    run_merge(merge, out / "merged", force=True, seed=seed, progress=False)
    best_file.write_text(text, encoding="utf-8")
    logger.info("evolve: wrote %s and %s", best_file, out / "merged")


def format_results(results: dict[str, Any]) -> str:
    c = results["compute"]
    start = results["start_score"]
    lines = [
        f"fitness: {results['fitness']}",
        f"start (candidate 0): {'did not finish' if start is None else f'{start:.4f}'}",
        f"best: candidate {results['best']['candidate']}, {results['best']['score']:.4f}",
        f"compute: {c['evaluations']} evaluations ({c['failed']} failed), {c['evaluation_seconds']:.1f} s evaluating, "
        f"{c['forward_tokens']} forward tokens",
    ]
    return "\n".join(lines)


def run_search(config: EvolveConfig, out: str | Path, *, force: bool = False, progress: bool = True) -> str:
    """``dam evolve``: the config's strategy run into ``out``; returns the printable summary."""
    if config.strategy == "kinship_greedy":
        from dam.search.kinship_greedy import format_kinship_greedy, run_kinship_greedy

        return format_kinship_greedy(run_kinship_greedy(config, out, force=force), Path(out))
    return format_results(run_evolve(config, out, force=force, progress=progress))
