"""Fitness of merge candidates: a held-out score (higher is better), its wall time and forward tokens.

A :class:`Fitness` scores a loaded model: ``dam eval`` tasks (mean exact-match accuracy, or minus the mean
response loss; :mod:`dam.evaluation.evaluate`), or a user callable ``module:function`` called as
``function(model, tokenizer)``; or a model folder: the mean of one metric over lm-evaluation-harness tasks
(:mod:`dam.evaluation.lm_eval`; candidates are then streamed to a temporary folder, which lm-eval loads).
Tasks and callable are resolved when the :class:`Fitness` is built, before any model is loaded.

A :class:`CandidateEvaluator` holds one model of the family's architecture. A candidate merge is computed by the
streaming engine (:func:`dam.merge.engine.merged_tensors`, the registry's math) straight into that model's
parameters, scored and overwritten by the next one: nothing is written to disk. A model on disk is read into it
the same way. It counts the compute every evaluation took:

- **seconds**: wall time of the merge (or read) and the scoring;
- **forward tokens**: tokens passed through the model. For a ``dam eval`` task, each example's prompt and
  response (the loss forward) plus its prompt and reference response again (greedy generation: the prompt's
  prefill and one step per generated token; exact when the model answers right, which ends the generation, an
  estimate otherwise). A callable reports its own (``forward_tokens`` in its mapping) or none.

An evaluation fails with a one-line :class:`~dam.errors.DamError` (which the searches count as a failed candidate)
when the merge fails, the user callable raises, or the score is not a finite number.
"""

from __future__ import annotations

import importlib
import math
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dam.errors import DamError
from dam.evaluation.evaluate import encode_example, evaluate_loaded, load_model, load_tasks
from dam.io.checkpoint import CheckpointReader
from dam.merge.config import MergeConfig
from dam.merge.engine import merged_tensors, run_merge
from dam.search.config import FitnessConfig


@dataclass(frozen=True)
class Score:
    """One evaluation: the fitness (higher is better), what it is made of, and what it cost."""

    score: float
    metrics: dict[str, float]
    seconds: float
    tokens: int | None

    def to_dict(self) -> dict[str, Any]:
        return {"score": self.score, "metrics": self.metrics, "seconds": self.seconds, "forward_tokens": self.tokens}


def import_callable(spec: str) -> Any:
    """The function named by ``module:function`` (the working directory is importable, as for ``python -m``)."""
    module_name, _, name = spec.partition(":")
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise DamError(f"fitness.callable {spec!r}: cannot import module {module_name!r} ({e})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise DamError(f"fitness.callable {spec!r}: module {module_name!r} has no function {name!r}")
    return fn


class Fitness:
    """The fitness of :class:`~dam.search.config.FitnessConfig`, ready to score loaded models."""

    def __init__(self, config: FitnessConfig):
        self.config = config
        self.fn = import_callable(config.callable) if config.callable is not None else None
        if config.lm_eval is not None:
            from dam.evaluation.lm_eval import check_lm_eval_tasks

            try:
                check_lm_eval_tasks(config.lm_eval.tasks, config.lm_eval.include_path)
            except DamError as e:
                raise DamError(f"fitness.lm_eval: {e}") from None
        try:
            self.tasks = load_tasks(config.tasks, data_dir=config.data_dir, split=config.split, limit=config.limit)
        except DamError as e:
            raise DamError(f"fitness: {e}") from None

    @property
    def needs_folder(self) -> bool:
        """lm-eval loads models from folders: candidates are written to a temporary one."""
        return self.config.lm_eval is not None

    def describe(self) -> str:
        if self.fn is not None:
            return f"callable {self.config.callable}"
        if self.config.lm_eval is not None:
            return f"lm-eval {self.config.lm_eval.metric} on {', '.join(self.config.lm_eval.tasks)}"
        names = ", ".join(t.name for t in self.tasks)
        return f"{self.config.metric} on {names} ({self.config.split} split, {len(self.tasks[0].examples)} examples)"

    def __call__(self, model: Any, tokenizer: Any) -> tuple[float, dict[str, float], int | None]:
        """``(score, metrics, forward tokens)`` of a loaded model."""
        if self.fn is not None:
            spec = self.config.callable or ""
            try:
                value = self.fn(model, tokenizer)
            except DamError:
                raise
            except Exception as e:  # the user's code: its failure fails this candidate, in one line
                detail = " ".join(str(e).split())
                message = f"fitness.callable {spec!r} raised {type(e).__name__}" + (f": {detail}" if detail else "")
                raise DamError(message) from e
            return _callable_result(spec, value)
        result = evaluate_loaded(model, tokenizer, self.tasks, batch_size=self.config.batch_size)
        metrics = {}
        for t in result.tasks:
            metrics[f"{t.task}/accuracy"] = t.accuracy
            metrics[f"{t.task}/loss"] = t.loss
        metrics["mean/accuracy"], metrics["mean/loss"] = result.mean_accuracy, result.mean_loss
        score = result.mean_accuracy if self.config.metric == "accuracy" else -result.mean_loss
        return score, metrics, self._task_tokens(tokenizer)

    def score_folder(self, path: str | Path) -> tuple[float, dict[str, float], int | None]:
        """``(score, metrics, None)`` of the model saved at ``path`` on the lm-eval tasks (no token count)."""
        from dam.evaluation.lm_eval import evaluate_lm_eval

        c = self.config.lm_eval
        assert c is not None
        scores = evaluate_lm_eval(
            path,
            c.tasks,
            include_path=c.include_path,
            num_fewshot=c.num_fewshot,
            limit=c.limit,
            batch_size=c.batch_size,
            device=self.config.device,
        )
        metrics = {f"{task}/{name}": value for task, values in scores.items() for name, value in values.items()}
        missing = [t for t in c.tasks if c.metric not in scores.get(t, {})]
        if missing:
            raise DamError(f"fitness.lm_eval: task {missing[0]!r} reports no metric {c.metric!r}")
        values = [scores[t][c.metric] for t in c.tasks]
        return sum(values) / len(values), metrics, None

    def _task_tokens(self, tokenizer: Any) -> int:
        total = 0
        for task in self.tasks:
            for ex in task.examples:
                prompt, response = encode_example(tokenizer, ex["prompt"], ex["response"])
                total += 2 * (len(prompt) + len(response))  # the loss forward, then the generation
        return total


def _callable_result(spec: str, value: Any) -> tuple[float, dict[str, float], int | None]:
    if isinstance(value, Mapping):
        if "score" not in value:
            raise DamError(f"fitness.callable {spec!r} returned a mapping without a 'score' entry")
        metrics = {str(k): float(v) for k, v in value.items() if k not in ("score", "forward_tokens")}
        tokens = value.get("forward_tokens")
        value = value["score"]
    else:
        metrics, tokens = {}, None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise DamError(f"fitness.callable {spec!r} returned {value!r}; expected a finite number (higher is better)")
    return float(value), metrics, None if tokens is None else int(tokens)


def _finite(result: tuple[float, dict[str, float], int | None]) -> tuple[float, dict[str, float], int | None]:
    """``result`` when its score is a finite number (a model giving NaN logits has a NaN loss): a search cannot
    order a NaN, so that candidate fails."""
    if not math.isfinite(result[0]):
        raise DamError(f"the fitness is {result[0]} (not a finite number): the candidate's outputs are not finite")
    return result


@dataclass
class CandidateEvaluator:
    """One model of the family in memory; candidates are merged (or read) into it and scored. Totals the cost."""

    fitness: Fitness
    template: str | Path
    seed: int = 0
    evaluations: int = 0
    seconds: float = 0.0
    tokens: int = 0
    _model: Any = field(default=None, repr=False)
    _tokenizer: Any = field(default=None, repr=False)

    def _loaded(self) -> tuple[Any, Any]:
        if self._model is None:
            self._model, self._tokenizer = load_model(self.template, device=self.fitness.config.device)
        return self._model, self._tokenizer

    @torch.no_grad()
    def _assign(self, tensors: Iterable[tuple[str, torch.Tensor]], origin: str) -> None:
        """Copy every named tensor into the model's parameters; every parameter must receive one (tied ones
        through the tensor they share)."""
        model, _ = self._loaded()
        state = model.state_dict()
        filled: set[int] = set()
        for name, tensor in tensors:
            if name not in state:
                raise DamError(f"{origin}: tensor {name!r} is not a parameter of {self.template}'s architecture")
            state[name].copy_(tensor)
            filled.add(state[name].data_ptr())
        missing = [n for n, p in state.items() if p.data_ptr() not in filled and p.is_floating_point()]
        if missing:
            raise DamError(f"{origin}: no tensor {missing[0]!r}")

    def _score(self, started: float) -> Score:
        model, tokenizer = self._loaded()
        score, metrics, tokens = _finite(self.fitness(model, tokenizer))
        elapsed = time.perf_counter() - started
        self.evaluations += 1
        self.seconds += elapsed
        self.tokens += tokens or 0
        return Score(score, metrics, elapsed, tokens)

    def _score_folder(self, path: str | Path, started: float) -> Score:
        score, metrics, tokens = _finite(self.fitness.score_folder(path))
        elapsed = time.perf_counter() - started
        self.evaluations += 1
        self.seconds += elapsed
        return Score(score, metrics, elapsed, tokens)

    def merge(self, config: MergeConfig) -> Score:
        """Score the merge of ``config``, computed in memory (DARE's drop seeded with ``seed``), or streamed to a
        temporary folder when the fitness loads folders (lm-eval)."""
        started = time.perf_counter()
        if self.fitness.needs_folder:
            with tempfile.TemporaryDirectory(prefix="dam-candidate-") as tmp:
                run_merge(config, Path(tmp) / "candidate", seed=self.seed, progress=False)
                return self._score_folder(Path(tmp) / "candidate", started)
        self._assign(merged_tensors(config, seed=self.seed), f"merge of {', '.join(config.referenced_models())}")
        return self._score(started)

    def model(self, path: str | Path) -> Score:
        """Score the model saved at ``path``."""
        started = time.perf_counter()
        if self.fitness.needs_folder:
            return self._score_folder(path, started)
        with CheckpointReader(path) as reader:
            self._assign(((n, reader.get(n)) for n in reader.names), f"model {str(path)!r}")
        return self._score(started)
