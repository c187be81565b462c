"""Configs of the searches over merges (``dam soup``, ``dam evolve``): pydantic models, loading, one-line errors.

A soup config names candidate fine-tunes of one base and a fitness; an evolve config adds the base, the strategy
(``cmaes`` over a classic method's parameters, or ``kinship_greedy``), its section and a budget. Every key is
checked before any model is read and before anything is written: unknown keys fail with the valid ones listed;
every number must be finite and inside its domain (integers are YAML integers; budgets positive; search ranges
inside the searched parameter's domain, :data:`DOMAINS`; fixed merge parameters, ``search.method_parameters`` and
``kinship_greedy.parameters``, pass the merge registry's own checks, run on tiny stand-in tensors).
"""

from __future__ import annotations

import math
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dam.errors import DamError
from dam.training.config import WandbConfig

SEARCHABLE = {  # classic method -> its parameters a search may tune (mergekit-evolve's genotype)
    "linear": ("weight",),
    "task_arithmetic": ("weight",),
    "ties": ("weight", "density"),
    "dare_ties": ("weight", "density"),
    "slerp": ("t",),
}
DEFAULT_RANGES = {"weight": (0.0, 1.0), "density": (0.1, 1.0), "t": (0.0, 1.0)}
# the bounded domains of searched parameters, (low, high]: the registry's methods take a density (the kept fraction)
# in (0, 1]; a weight or slerp's t may be any finite number
DOMAINS: dict[str, tuple[float, float]] = {"density": (0.0, 1.0)}
MAX_SEED = 2**32 - 1  # optuna's samplers seed numpy, which takes 32-bit seeds
PAIR_DEFAULTS: dict[str, dict[str, Any]] = {  # kinship_greedy: how two models are merged, by default
    "slerp": {"t": 0.5},
    "linear": {"weight": 1.0},
    "task_arithmetic": {"weight": 1.0},
    "ties": {"weight": 1.0, "density": 0.5},
    "dare_ties": {"weight": 1.0, "density": 0.5},
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


def _finite(where: str, value: float) -> float:
    if not math.isfinite(value):
        raise ValueError(f"{where} must be a finite number, got {value}")
    return value


def check_method_parameters(method: str, parameters: dict[str, Any], n_models: int, where: str) -> None:
    """Run the registry's ``method`` once on 2x2 stand-in tensors (``n_models`` of them, and a base when the
    method needs one) with ``parameters``, mergekit's top-level ``parameters`` (a per-model key applies to every
    model): the registry's own checks of the names, types and ranges fail here, as a ``ValueError`` prefixed by
    ``where``, before any model is read. Gradient and filter lists are left to the merge plan."""
    import torch

    from dam.merge.registry import METHODS

    spec = METHODS[method]
    scalars = {k: v for k, v in parameters.items() if not isinstance(v, list | dict)}
    per_model = {k: v for k, v in scalars.items() if k in spec.model_params}
    shared = {k: v for k, v in scalars.items() if k not in spec.model_params}
    generator = torch.Generator().manual_seed(0)
    inputs = list(torch.randn(n_models + spec.requires_base, 2, 2, generator=generator))
    base = inputs.pop() if spec.requires_base else None
    try:
        spec.fn(inputs, base, None, [dict(per_model) for _ in inputs], shared, generator)
    except DamError as e:
        raise ValueError(f"{where}: {e}") from None


class LmEvalFitness(_Strict):
    """lm-evaluation-harness tasks as the fitness (``pip install 'dam[lm-eval]'``): the mean of ``metric`` over
    ``tasks``. Each candidate is written to a temporary folder that lm-eval loads."""

    tasks: list[str]
    """lm-eval task names (lm-eval's own, or defined by YAML files under ``include_path``)."""

    include_path: str | None = None
    """A folder or file of extra task YAML configs (lm-eval's ``--include_path``)."""

    metric: str = "acc"
    """The metric averaged over the tasks (lm-eval's name without the ``,none`` filter: ``acc``, ``acc_norm``...)."""

    num_fewshot: int | None = Field(default=None, ge=0, strict=True)
    """Few-shot examples (lm-eval's default when unset)."""

    limit: int | None = Field(default=None, ge=1, strict=True)
    """The first ``limit`` documents of each task."""

    batch_size: int = Field(default=8, ge=1, strict=True)
    """lm-eval's batch size."""

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("fitness.lm_eval.tasks is empty")
        return value


class FitnessConfig(_Strict):
    """How a candidate is scored (higher is better): ``dam eval`` tasks, lm-eval tasks, or a user callable."""

    tasks: list[str] = Field(default_factory=list)
    """``dam eval`` tasks: names under ``data_dir`` (file ``<data_dir>/<task>/<split>.jsonl``) or jsonl paths."""

    data_dir: str = "data/demo"
    """Where task names are looked up."""

    split: str = "validation"
    """The held-out split the search selects on (never the split a comparison is reported on)."""

    metric: Literal["accuracy", "loss"] = "accuracy"
    """``accuracy``: mean exact-match accuracy over the tasks (%); ``loss``: minus the mean response NLL."""

    limit: int | None = Field(default=None, ge=1, strict=True)
    """Score each task on its first ``limit`` examples."""

    batch_size: int = Field(default=32, ge=1, strict=True)
    """Examples per forward / generate call."""

    callable: str | None = None
    """``module:function`` called as ``function(model, tokenizer)``, returning a finite number or a mapping with a
    ``score`` (higher is better; other numeric entries are logged). Instead of ``tasks``. A call that raises, or
    returns anything else (NaN, inf...), fails that candidate (see ``budget.max_failures_in_a_row``)."""

    lm_eval: LmEvalFitness | None = None
    """lm-evaluation-harness tasks, instead of ``tasks``."""

    device: str = "cpu"
    """Device the candidates are evaluated on."""

    @model_validator(mode="after")
    def _one_kind(self) -> FitnessConfig:
        if bool(self.tasks) + (self.callable is not None) + (self.lm_eval is not None) != 1:
            raise ValueError(
                "fitness needs exactly one of `tasks` (dam eval tasks), `lm_eval` (lm-evaluation-harness tasks) or "
                "`callable` (module:function)"
            )
        if self.callable is not None and (":" not in self.callable or self.callable.count(":") != 1):
            raise ValueError(f"fitness.callable must be 'module:function', got {self.callable!r}")
        return self


class Budget(_Strict):
    """When a search stops: after ``evaluations`` candidates, or ``seconds`` of evaluation time, whichever first.
    A candidate that fails (its merge or its fitness raises a user error, or the fitness is not a finite number)
    counts as evaluated, with the time it took; the search stops with an error when the start fails (``cmaes``:
    candidate 0; ``kinship_greedy``: an input model) or ``max_failures_in_a_row`` candidates fail one after
    another."""

    evaluations: int | None = Field(default=None, strict=True)
    """Candidates evaluated in all, failed ones included (a resumed search counts the ones already done)."""

    seconds: float | None = None
    """Evaluation wall time in all, summed over the candidates (a resumed search counts the time already spent)."""

    max_failures_in_a_row: int = Field(default=5, strict=True)
    """Stop with an error once this many candidates in a row have failed (counted by each worker from its start):
    a broken fitness stops here rather than spending the budget; a candidate failing now and then is logged as a
    warning, recorded with its reason, and the search goes on."""

    @model_validator(mode="after")
    def _positive(self) -> Budget:
        if self.evaluations is None and self.seconds is None:
            raise ValueError("budget needs `evaluations` or `seconds`")
        for key in ("evaluations", "seconds", "max_failures_in_a_row"):
            value = getattr(self, key)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"budget.{key} must be a finite number > 0, got {value}")
        return self


class SearchSpace(_Strict):
    """The parameters CMA-ES tunes: a classic method's per-model ``weight``/``density`` (or slerp's ``t``), one
    value per layer group, model and filter (mergekit-evolve's genotype)."""

    method: str
    """``linear``, ``task_arithmetic``, ``ties``, ``dare_ties`` or ``slerp``."""

    parameters: list[str] | None = None
    """Which of the method's parameters to search (default: all of them: ``weight`` and ``density`` for ties)."""

    layer_groups: int = Field(default=1, ge=1, strict=True)
    """Contiguous groups of layers with their own values (1: one value for the whole model; the number of
    layers: one per layer). Embeddings take the first group's values, the final norm and ``lm_head`` the last's."""

    filters: list[str] = Field(default_factory=list)
    """Tensor-name substrings with their own values, e.g. ``[self_attn, mlp]``; other tensors get a default."""

    ranges: dict[str, tuple[float, float]] = Field(default_factory=dict)
    """Search bounds per parameter (default weight [0, 1], density [0.1, 1], t [0, 1]): finite, inside the
    parameter's domain (a density in (0, 1]; a weight or t any finite number)."""

    method_parameters: dict[str, Any] = Field(default_factory=dict)
    """Fixed method-level parameters written in the config's top-level ``parameters`` (``normalize``,
    ``lambda``...), checked by the merge registry as any merge's."""

    @model_validator(mode="after")
    def _known(self) -> SearchSpace:
        if self.method not in SEARCHABLE:
            raise ValueError(f"search.method {self.method!r} cannot be searched; valid: {', '.join(SEARCHABLE)}")
        valid = SEARCHABLE[self.method]
        if self.parameters is not None:
            if not self.parameters:
                raise ValueError("search.parameters is empty: the search space has no dimension")
            unknown = [p for p in self.parameters if p not in valid]
            if unknown:
                raise ValueError(
                    f"search.parameters: {unknown[0]!r} is not a searchable parameter of {self.method}; "
                    f"valid: {', '.join(valid)}"
                )
        for key, (low, high) in self.ranges.items():
            if key not in valid:
                raise ValueError(
                    f"search.ranges.{key}: not a searchable parameter of {self.method}; valid: {', '.join(valid)}"
                )
            if not (math.isfinite(low) and math.isfinite(high)):
                raise ValueError(f"search.ranges.{key}: [{low}, {high}] must be finite numbers")
            if not low < high:
                raise ValueError(f"search.ranges.{key}: [{low}, {high}] is empty")
            bottom, top = DOMAINS.get(key, (-math.inf, math.inf))
            if not bottom < low or high > top:
                raise ValueError(
                    f"search.ranges.{key}: [{low}, {high}] is outside {key}'s domain ({bottom:g}, {top:g}]"
                )
        if len(set(self.filters)) != len(self.filters) or any(not f for f in self.filters):
            raise ValueError(f"search.filters must be distinct non-empty substrings, got {self.filters}")
        return self

    @property
    def searched(self) -> tuple[str, ...]:
        return tuple(self.parameters) if self.parameters is not None else SEARCHABLE[self.method]

    def bounds(self, name: str) -> tuple[float, float]:
        return tuple(self.ranges.get(name, DEFAULT_RANGES[name]))  # type: ignore[return-value]


class KinshipGreedy(_Strict):
    """Top-k greedy merging with model kinship (Hu et al., 2024): see :mod:`dam.search.kinship_greedy`."""

    k: int = Field(default=3, ge=2, strict=True)
    """How many of the best models each generation merges pairwise."""

    method: str = "slerp"
    """How two models are merged: ``slerp`` (from the better one toward the other by ``t``), ``linear``, or a
    task-arithmetic method over the family's base."""

    parameters: dict[str, Any] | None = None
    """The pair merge's top-level mergekit ``parameters`` (default per method: :data:`PAIR_DEFAULTS`), checked by
    the merge registry as any merge's (names, finite numbers, a density in (0, 1]...)."""

    measure: Literal["cosine", "pearson"] = "cosine"
    """Kinship measure of two models' task vectors against the base (as ``dam kinship`` computes it)."""

    stop_kinship: float = 0.9
    """Stop once the mean pairwise kinship of the top-k models exceeds this (they have become one model). Both
    measures lie in [-1, 1]: 1 never stops on kinship."""

    exploration: bool = True
    """Each generation also merges the best model with the one least related to it by kinship."""

    max_generations: int = Field(default=5, ge=1, strict=True)
    """Generations at most (the budget may stop the search earlier)."""

    @field_validator("method")
    @classmethod
    def _method(cls, value: str) -> str:
        if value not in PAIR_DEFAULTS:
            raise ValueError(f"kinship_greedy.method {value!r} is unknown; valid: {', '.join(PAIR_DEFAULTS)}")
        return value

    @model_validator(mode="after")
    def _numbers(self) -> KinshipGreedy:
        if not (math.isfinite(self.stop_kinship) and -1 <= self.stop_kinship <= 1):
            raise ValueError(f"kinship_greedy.stop_kinship must be a number in [-1, 1], got {self.stop_kinship}")
        if self.parameters is not None:  # slerp: the better model is the base, the other the one model
            pair = 1 if self.method == "slerp" else 2
            check_method_parameters(self.method, self.parameters, pair, "kinship_greedy.parameters")
        return self


class SoupConfig(_Strict):
    """``dam soup``: uniform and greedy soups of candidate fine-tunes of one base."""

    models: list[str]
    """Candidate models (folders or Hub ids), fine-tunes of one base."""

    fitness: FitnessConfig
    """The held-out score that orders the candidates and decides each addition."""

    dtype: str | None = None
    """dtype the kept soup is written in (mergekit's ``dtype``; default: the candidates')."""

    strict: bool = False
    """Greedy soup's rule: ``false`` (the paper's, Wortsman et al. 2022) keeps a candidate when the soup's held-out
    score does not drop (>=), which matters on small validation sets where ties are common; ``true`` keeps it only
    when the score strictly improves (>)."""

    wandb: WandbConfig | None = None
    """wandb logging of every evaluation (off when absent)."""

    @field_validator("models")
    @classmethod
    def _models(cls, value: list[str]) -> list[str]:
        if len(value) < 2:
            raise ValueError(f"a soup needs at least 2 candidate models, got {len(value)}")
        if len(set(value)) != len(value):
            raise ValueError("models: a candidate is listed twice")
        return value


class EvolveConfig(_Strict):
    """``dam evolve``: a search over merges of ``models`` (fine-tunes of ``base_model``)."""

    base_model: str
    """The base the candidates were fine-tuned from."""

    models: list[str]
    """The fine-tunes to merge."""

    strategy: Literal["cmaes", "kinship_greedy"] = "cmaes"
    """``cmaes``: CMA-ES over the ``search`` space; ``kinship_greedy``: the ``kinship_greedy`` loop."""

    search: SearchSpace | None = None
    """The space of the ``cmaes`` strategy."""

    kinship_greedy: KinshipGreedy | None = None
    """Settings of the ``kinship_greedy`` strategy (defaults when absent)."""

    fitness: FitnessConfig
    """The held-out score to maximise."""

    budget: Budget
    """When the search stops."""

    seed: int = Field(default=0, ge=0, le=MAX_SEED, strict=True)
    """Seed of the sampler and of DARE's random drops (0 to 2**32 - 1)."""

    storage: str | None = None
    """optuna storage URL shared by the workers of one study (default ``sqlite:///OUT/study.db``); a database
    server URL (``postgresql://...``) lets workers on several machines share the study."""

    dtype: str | None = None
    """dtype of the merges (mergekit's ``dtype``; default: the models')."""

    wandb: WandbConfig | None = None
    """wandb logging of every candidate (off when absent)."""

    @model_validator(mode="after")
    def _sections(self) -> EvolveConfig:
        if not self.models:
            raise ValueError("models is empty: nothing to merge")
        if len(set(self.models)) != len(self.models) or self.base_model in self.models:
            raise ValueError("models: a model is listed twice (or is the base)")
        if self.strategy == "cmaes" and self.search is None:
            raise ValueError("strategy cmaes needs a `search` section (method, parameters, layer_groups, filters)")
        if self.strategy == "kinship_greedy":
            if self.search is not None:
                raise ValueError("`search` is the cmaes strategy's section; kinship_greedy uses `kinship_greedy`")
            if len(self.models) < 2:
                raise ValueError("kinship_greedy needs at least 2 models")
            if self.kinship_greedy is None:
                self.kinship_greedy = KinshipGreedy()
        elif self.kinship_greedy is not None:
            raise ValueError("`kinship_greedy` is set but strategy is cmaes")
        if self.search is not None:
            space = self.search
            if space.method == "slerp" and len(self.models) != 1:
                raise ValueError(
                    f"search.method slerp merges the base with exactly one model; models has {len(self.models)}"
                )
            start = {"weight": 1.0 / len(self.models), "density": 1.0, "t": 0.5}  # any value of the ranges does
            fixed = {**space.method_parameters, **{p: start[p] for p in space.searched}}
            check_method_parameters(space.method, fixed, len(self.models), "search.method_parameters")
        return self


def _location(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model a field holds (itself, or inside ``X | None``, ``list[X]``...), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        if (found := _model_in(arg)) is not None:
            return found
    return None


def _valid_keys(schema: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The keys of the section holding the key at ``loc`` (empty when the path leaves the models)."""
    model: type[BaseModel] | None = schema
    for part in loc[:-1]:
        if isinstance(part, int):  # a list item: the same model
            continue
        field = model.model_fields.get(part) if model is not None else None
        model = _model_in(field.annotation) if field is not None else None
    return list(model.model_fields) if model is not None else []


def _format(error: ValidationError, schema: type[BaseModel]) -> str:
    messages = []
    for err in error.errors():
        where = _location(tuple(err["loc"]))
        if err["type"] == "extra_forbidden":
            valid = _valid_keys(schema, tuple(err["loc"]))
            messages.append(f"{where}: unknown key" + (f"; valid: {', '.join(valid)}" if valid else ""))
        elif err["type"] == "missing":
            messages.append(f"missing config key {where!r}")
        else:
            message = err["msg"].removeprefix("Value error, ")
            # a section's own check names its key already (``search.ranges.x: ...``)
            named = not where or message.startswith(f"{where}.") or message.startswith(f"{where} ")
            messages.append(message if named else f"{where}: {message}")
    return "; ".join(dict.fromkeys(messages))


def load_search_config(path: str | Path, schema: type[_Strict]) -> Any:
    """Read and validate a soup or evolve config YAML; every problem is one DamError line naming the key."""
    path = Path(path)
    if not path.is_file():
        raise DamError(f"config file {path} not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise DamError(f"config file {path} is not valid YAML: {e}".replace("\n", " ")) from None
    if not isinstance(data, dict):
        raise DamError(f"config file {path}: expected a mapping of config keys")
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        raise DamError(f"config {path}: {_format(e, schema)}") from None


def config_dict(config: BaseModel) -> dict[str, Any]:
    """The resolved config as plain data (saved beside the results; a resume compares it)."""
    return config.model_dump(mode="json")
