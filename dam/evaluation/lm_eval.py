"""Evaluate a model folder with EleutherAI's lm-evaluation-harness (``pip install 'dam[lm-eval]'``).

:func:`evaluate_lm_eval` runs ``lm_eval.simple_evaluate`` with its Hugging Face backend (``HFLM``) on a model
folder (or Hub id; a ``.gguf`` file, which lm-eval reads with transformers' GGUF loading; or ``MODEL+LORA``: lm-eval
applies the adapter through PEFT) and returns the scores as
``{task: {metric: value}}``. Tasks are lm-eval's own names (``hellaswag``, ``arc_easy``, ...), task YAML files, or
names defined by YAML files under ``include_path`` (a folder or file of task configs, lm-eval's
``--include_path``), so a task over a local jsonl runs offline.

Metric keys drop lm-eval's filter suffix when the filter is ``none`` (``"acc,none"`` -> ``"acc"``, and
``"acc_stderr,none"`` -> ``"acc_stderr"``) and keep it otherwise (``"exact_match,strict-match"``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dam.errors import DamError
from dam.io.checkpoint import resolve_folder, resolve_model_path
from dam.io.gguf import gguf_source
from dam.io.lora import split_reference

logger = logging.getLogger(__name__)

Scores = dict[str, dict[str, float]]


def _import_lm_eval() -> Any:
    try:
        import lm_eval
    except ImportError:
        raise DamError(
            "lm-evaluation-harness is not installed: pip install 'dam[lm-eval]' (or pip install lm-eval)"
        ) from None
    return lm_eval


def _metric_name(key: str) -> str:
    metric, _, filter_name = key.partition(",")
    return metric if filter_name in ("", "none") else key


def scores_from_results(results: dict[str, dict[str, Any]]) -> Scores:
    """``{task: {metric: value}}`` from lm-eval's ``results`` section: numeric entries only (no ``alias``),
    ``N/A`` standard errors dropped."""
    scores: Scores = {}
    for task, entries in results.items():
        scores[task] = {
            _metric_name(key): float(value)
            for key, value in entries.items()
            if isinstance(value, int | float) and not isinstance(value, bool) and not key.startswith("sample")
        }
    return scores


def _task_manager(manager_class: Any, tasks: Sequence[str], include_path: str | Path | None) -> Any:
    """lm-eval's task index: ``include_path``'s tasks alone when they are all the tasks asked for (indexing
    lm-eval's ~15k built-in tasks takes 10-30 s), else the built-in tasks plus ``include_path``'s."""
    if include_path is not None:
        local = manager_class(include_path=str(include_path), include_defaults=False)
        if all(Path(t).is_file() or local.match_tasks([t]) for t in tasks):
            return local
    return manager_class(include_path=str(include_path) if include_path is not None else None)


def check_lm_eval_tasks(tasks: Sequence[str], include_path: str | Path | None = None) -> Any:
    """lm-eval's task manager for ``tasks``, after checking lm-eval is installed and knows every task (names,
    YAML files, or tasks under ``include_path``); a :class:`DamError` naming the first unknown one otherwise."""
    if not tasks:
        raise DamError("--lm-eval: no task given")
    _import_lm_eval()
    from lm_eval.tasks import TaskManager

    manager = _task_manager(TaskManager, tasks, include_path)
    unknown = [t for t in tasks if not Path(t).is_file() and not manager.match_tasks([t])]
    if unknown:
        where = f" (nor under {include_path})" if include_path is not None else ""
        raise DamError(f"lm-eval task {unknown[0]!r} is unknown to lm-eval{where}")
    return manager


def evaluate_lm_eval(
    model: str | Path,
    tasks: Sequence[str],
    *,
    include_path: str | Path | None = None,
    num_fewshot: int | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    device: str = "cpu",
    dtype: str = "float32",
    seed: int = 0,
) -> Scores:
    """Scores of ``model`` on lm-eval ``tasks``: ``{task: {metric: value}}`` (groups' aggregates included).

    ``include_path``: extra task YAML configs (a folder or a file). ``limit``: the first N documents of each task
    (lm-eval's testing option). The model runs in ``dtype`` on ``device``; lm-eval's seeds are all ``seed``.
    Raises :class:`DamError` when lm-eval is missing, the model is not found or a task name is unknown.
    """
    lm_eval = _import_lm_eval()
    manager = check_lm_eval_tasks(tasks, include_path)
    path = resolve_model_path(model)  # a missing model or a damaged GGUF is a DamError here, before lm-eval runs
    model_args = {"pretrained": str(path), "dtype": dtype}
    reference, adapter = split_reference(model)
    gguf = gguf_source(reference)
    if gguf is not None:  # lm-eval loads the file itself: transformers' GGUF loading, its dequantized weights and
        # tokenizer (the cache folder above holds no weights)
        model_args = {"pretrained": str(gguf.parent), "gguf_file": gguf.name, "dtype": dtype}
    if adapter is not None:  # MODEL+LORA: lm-eval's own PEFT loading
        model_args["peft"] = str(resolve_folder(adapter))
    output = lm_eval.simple_evaluate(
        model="hf",
        model_args=model_args,
        tasks=list(tasks),
        num_fewshot=num_fewshot,
        batch_size=batch_size,
        device=device,
        limit=limit,
        task_manager=manager,
        log_samples=False,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    return scores_from_results(output["results"])


def format_scores(model: str, scores: Scores) -> str:
    """A plain table: one row per task and metric."""
    rows = [(task, metric, value) for task, metrics in scores.items() for metric, value in metrics.items()]
    width = max([len("task"), *(len(t) for t, _, _ in rows)])
    mwidth = max([len("metric"), *(len(m) for _, m, _ in rows)])
    lines = [f"lm-eval: {model}", f"{'task':<{width}}  {'metric':<{mwidth}}  value"]
    for task, metric, value in rows:
        lines.append(f"{task:<{width}}  {metric:<{mwidth}}  {value:.4f}")
    return "\n".join(lines)


__all__ = ["Scores", "evaluate_lm_eval", "format_scores", "scores_from_results"]
