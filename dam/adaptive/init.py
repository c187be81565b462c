"""Starting coefficients (``dam.init``): uniform, a list of per-source weights, a task-arithmetic ``lambda``, or a
mergekit linear / task_arithmetic YAML rewritten as ``sum_i c_i x_i`` over the sources; and which source is the base
(:func:`find_base_source`, for ``dam.transform: task_vector``, ``dam.basis: task_vectors`` and ``dam.train_base:
false``), and the init in the task-vector basis (:func:`basis_weights`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import yaml

from dam.adaptive.coefficients import model_label
from dam.errors import DamError


def _same_model(a: str, b: str) -> bool:
    return a == b or model_label(a) == model_label(b)


def find_base_source(base_model: str, sources: list[str], key: str) -> int:
    """Index of the source that is ``base_model`` (same string or same local folder); DamError naming ``key``
    (the option that needs it) when no source, or more than one, is the base."""
    found = [i for i, s in enumerate(sources) if _same_model(base_model, s)]
    if len(found) != 1:
        what = "is not one of the sources" if not found else f"is listed {len(found)} times among the sources"
        raise DamError(
            f"{key}: the base model {base_model!r} {what}; {key.split(':')[0]} needs it exactly once as a source "
            "(the model the task vectors are taken from)"
        )
    return found[0]


def base_source_key(options: Any) -> str | None:
    """The first option of ``options`` (a :class:`DAMOptions` or its dumped mapping) that needs the base among the
    sources, as ``key: value`` for error messages, or None when none does."""
    get = options.get if isinstance(options, dict) else lambda k, d=None: getattr(options, k, d)
    if get("transform") == "task_vector":
        return "dam.transform: task_vector"
    if get("basis", "weights") == "task_vectors":
        return "dam.basis: task_vectors"
    if not get("train_base", True):
        return "dam.train_base: false"
    return None


def base_index(metadata: dict[str, Any]) -> int | None:
    """The base source's index in a coefficients file's ``metadata`` when its options need one
    (:func:`base_source_key`), else None."""
    key = base_source_key(metadata["options"])
    return None if key is None else find_base_source(metadata["base_model"], metadata["sources"], key)


def relative_to(metadata: dict[str, Any]) -> int | None:
    """The base source's index when a coefficients file's run used ``dam.basis: task_vectors`` (its other sources
    enter the merge as task vectors), else None (files from before the option: the weights basis)."""
    return base_index(metadata) if metadata["options"].get("basis", "weights") == "task_vectors" else None


def basis_weights(weights: list[float], basis: str, base: int | None) -> list[float]:
    """Per-source init coefficients in ``basis``: as given for ``weights``; for ``task_vectors`` the base's is the
    sum of all (``sum_i w_i W_i = (sum_i w_i) W_base + sum_k w_k tau_k``) and every other source's its own."""
    if basis == "weights":
        return list(weights)
    assert base is not None, "the task-vector basis needs the base's index"
    out = list(weights)
    out[base] = math.fsum(weights)
    return out


def task_vector_base(metadata: dict[str, Any]) -> int | None:
    """The base source's index in a coefficients file's ``metadata`` when its run used ``dam.transform:
    task_vector`` (the wrapper's rule, :func:`find_base_source`, over the recorded base and sources), else None."""
    if metadata["options"]["transform"] != "task_vector":
        return None
    return find_base_source(metadata["base_model"], metadata["sources"], "dam.transform: task_vector")


def resolve_init_weights(init: str | list[float] | float, base_model: str, sources: list[str]) -> list[float]:
    """Per-source init coefficients from ``DAMOptions.init`` (see its docstring). Errors name ``dam.init``."""
    n = len(sources)
    if init == "uniform":
        return [1.0 / n] * n
    if isinstance(init, float | int):
        value = _number(init, "a task-arithmetic lambda")
        weights = [value] * n
        base = find_base_source(base_model, sources, f"dam.init: {value:g}")
        weights[base] = 1.0 - value * (n - 1)
        return weights
    if isinstance(init, list):
        if len(init) != n:
            raise DamError(f"dam.init: {len(init)} weights given for {n} sources")
        if not all(math.isfinite(w) for w in init):
            raise DamError(f"dam.init: weights must be finite numbers, got {init}")
        return [float(w) for w in init]
    return _init_from_merge_yaml(Path(init), base_model, sources)


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise DamError(f"dam.init: {what} must be a plain number (no gradients or filters), got {value!r}")
    return float(value)


def _init_from_merge_yaml(path: Path, base_model: str, sources: list[str]) -> list[float]:
    """Coefficients that reproduce a mergekit ``linear`` or ``task_arithmetic`` merge as ``sum_i c_i x_i``."""
    if not path.is_file():
        raise DamError(f"dam.init: merge config {path} not found")
    try:
        cfg = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise DamError(f"dam.init: {path} is not valid YAML: {e}") from e
    if not isinstance(cfg, dict) or not isinstance(cfg.get("models"), list):
        raise DamError(f"dam.init: {path} needs a top-level 'models' list (slices are not supported for init)")
    method = cfg.get("merge_method")
    if method not in ("linear", "task_arithmetic"):
        raise DamError(f"dam.init: {path}: merge_method {method!r} cannot give an init; use linear or task_arithmetic")
    params = cfg.get("parameters") or {}
    merge_base = cfg.get("base_model")
    weights = [0.0] * len(sources)
    listed: list[tuple[int, float]] = []
    for entry in cfg["models"]:
        name = str(entry.get("model")) if isinstance(entry, dict) else str(entry)
        if method == "task_arithmetic" and merge_base is not None and _same_model(name, str(merge_base)):
            continue  # the base's task vector is zero
        idx = next((i for i, s in enumerate(sources) if _same_model(name, s)), None)
        if idx is None:
            raise DamError(f"dam.init: model {name!r} in {path} is not one of the sources")
        model_params = (entry.get("parameters") if isinstance(entry, dict) else None) or {}
        if "weight" not in model_params and "weight" not in params:
            raise DamError(f"dam.init: model {name!r} in {path} has no 'weight' parameter")
        listed.append((idx, _number(model_params.get("weight", params.get("weight")), f"weight of {name!r}")))
    if not listed:
        raise DamError(f"dam.init: {path} lists no source models")
    total = sum(w for _, w in listed)
    normalize = params.get("normalize", method == "linear")
    if normalize:
        if total == 0:
            raise DamError(f"dam.init: the weights in {path} sum to 0 and cannot be normalised")
        listed = [(i, w / total) for i, w in listed]
    scale = _number(params.get("lambda", 1.0), "lambda") if method == "task_arithmetic" else 1.0
    for i, w in listed:
        weights[i] += scale * w
    if method == "task_arithmetic":
        base_share = 1.0 - sum(weights)
        base_name = str(merge_base) if merge_base is not None else base_model
        base_idx = next((i for i, s in enumerate(sources) if _same_model(base_name, s)), None)
        if base_idx is None and abs(base_share) > 1e-12:
            raise DamError(
                f"dam.init: task_arithmetic in {path} gives the base {base_name!r} a share of {base_share:g}; "
                "add the base to the sources"
            )
        if base_idx is not None:
            weights[base_idx] += base_share
    return weights
