"""Classic merge methods as pure tensor functions, keyed by their mergekit names.

The registry contract (the merge engine relies on it)
-----------------------------------------------------
``METHODS[name]`` is a :class:`MergeMethod`. Its ``fn`` merges one tensor::

    fn(tensors, base, base_index, model_params, params, generator) -> Tensor

- ``tensors``: one tensor per entry of the config's ``models:`` list, in config order, all of one shape, float32
  on the compute device (the engine upcasts before and casts the result to the output dtype after).
- ``base``: the base model's tensor when ``base_model`` is set (loaded even if the base is not listed in
  ``models``), else None. ``base_index``: the base's position in ``tensors`` when it is listed, else None.
- ``model_params[i]``: the resolved per-model parameters of ``tensors[i]`` for this tensor (gradients, filters
  and precedence already applied), e.g. ``{"weight": 0.5, "density": 0.7}``. ``params``: the resolved global
  parameters, e.g. ``{"normalize": True, "lambda": 1.0}``, or ``{"t": 0.3}`` for slerp.
- ``generator``: random methods (``random=True``) draw only from it, so a seed makes a run reproducible;
  None uses torch's global RNG.

``fn`` fills in missing parameters from the declared defaults (``REQUIRED`` ones must be given), rejects unknown
parameter names and values of the wrong type or range, and checks the inputs' structure, all with a
:class:`~dam.errors.DamError` naming the parameter and model (``models[i]``) before any tensor work. The
engine adds the tensor name. For methods that merge task vectors (the task-arithmetic family, nuslerp,
model_stock, slerp, multislerp) the base's own entry of ``model_params`` is ignored, as in mergekit.

``num_models`` counts distinct inputs the way mergekit 0.1.5 does: the listed models plus an unlisted
``base_model`` (mergekit appends an unlisted base to every method's inputs). So slerp's 2 is "the base and one
other model", whether the base is listed or not. Because of that appending, mergekit's ``linear`` averages an
unlisted base in too, with the top-level ``weight``; ``linear`` here refuses an unlisted base rather than
differ silently: the engine reproduces mergekit by passing the base as one more tensor (with ``base_index``
pointing at it and its resolved parameters), which every method here accepts.

Every method reproduces mergekit 0.1.5's arithmetic (parity to 1e-6 in float32 is tested) except where the
docstrings say otherwise: a zero weight sum in normalised ``linear`` is an error (mergekit writes inf/NaN), and
DELLA on a one-column tensor uses ``p = density`` (mergekit fails). ``karcher`` averages every input, an
unlisted base too, as mergekit 0.1.5 does (its base policy is "ignored"). ``arcee_fusion`` is marked random:
on tensors over 1M entries it estimates quartiles from a sample (drawn from the generator here, from torch's
global RNG in mergekit); smaller tensors are deterministic. ``int8_mask`` is accepted for
compatibility; it only changes mergekit's mask storage, never the result, and the masks here are bool.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor

from dam.errors import DamError
from dam.merge.methods.arcee_fusion import merge_arcee_fusion
from dam.merge.methods.hypersphere import merge_karcher, merge_multislerp
from dam.merge.methods.linear import merge_linear
from dam.merge.methods.model_stock import merge_model_stock
from dam.merge.methods.nearswap import merge_nearswap
from dam.merge.methods.passthrough import merge_passthrough
from dam.merge.methods.ram import merge_ram
from dam.merge.methods.sce import merge_sce
from dam.merge.methods.slerp import merge_nuslerp, merge_slerp
from dam.merge.methods.task_arithmetic import VARIANTS, merge_task_arithmetic

__all__ = ["METHODS", "REQUIRED", "MergeMethod", "describe_methods", "get_method"]


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()  # sentinel default: the parameter has no default and must be given


@dataclass(frozen=True)
class MergeMethod:
    """One merge method: its mergekit key, tensor function, parameters with defaults, and input needs."""

    name: str  # mergekit's key, e.g. "dare_ties"
    fn: Callable[..., Tensor]  # fn(tensors, base, base_index, model_params, params, generator) -> Tensor
    model_params: dict[str, Any]  # per-model parameters and their defaults (REQUIRED = no default)
    global_params: dict[str, Any]  # method-level parameters and their defaults
    requires_base: bool  # a base_model must be given
    random: bool  # uses the generator (DARE, DELLA)
    num_models: int | None = None  # exact number of inputs, counting an unlisted base (slerp: 2); None = any >= 1


_BOOL_PARAMS = {
    "normalize",
    "rescale",
    "int8_mask",
    "filter_wise",
    "nuslerp_row_wise",
    "nuslerp_flatten",
    "normalize_weights",
}
_OPTIONAL_NUMBER_PARAMS = {"scale"}  # a number or None


def _check_value(method: str, where: str, key: str, value: Any) -> Any:
    """Type-check one parameter value; numbers come back as float."""
    if key in _BOOL_PARAMS:
        if not isinstance(value, bool):
            raise DamError(f"{method}: {where}parameter {key!r} must be true or false, got {value!r}")
        return value
    if value is None and key in _OPTIONAL_NUMBER_PARAMS:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DamError(f"{method}: {where}parameter {key!r} must be a finite number, got {value!r}")
    return float(value)


def _resolve(method: str, where: str, declared: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """Declared defaults overlaid with ``given``; unknown, missing required or ill-typed values raise."""
    unknown = sorted(set(given) - set(declared))
    if unknown:
        valid = ", ".join(declared) or "none"
        raise DamError(f"{method}: {where}unknown parameter(s) {', '.join(unknown)} (valid: {valid})")
    resolved = {}
    for key, default in declared.items():
        value = given.get(key, default)
        if value is REQUIRED:
            raise DamError(f"{method}: {where}missing required parameter {key!r}")
        resolved[key] = _check_value(method, where, key, value)
    return resolved


def _checked(
    kernel: Callable[..., Tensor],
    name: str,
    model_params: dict[str, Any],
    global_params: dict[str, Any],
    *,
    requires_base: bool,
    num_models: int | None,
    base_has_params: bool,
) -> Callable[..., Tensor]:
    """Wrap a kernel with the registry contract's structural and parameter checks (see the module docstring)."""

    def fn(
        tensors: list[Tensor],
        base: Tensor | None,
        base_index: int | None,
        model_params_: list[dict[str, Any]],
        params: dict[str, Any],
        generator: torch.Generator | None = None,
    ) -> Tensor:
        if not tensors:
            raise DamError(f"{name}: no models to merge")
        if len(model_params_) != len(tensors):
            raise DamError(f"{name}: {len(tensors)} models but {len(model_params_)} per-model parameter sets")
        if base_index is not None and not 0 <= base_index < len(tensors):
            raise DamError(f"{name}: base_index {base_index} is not a position in models (0..{len(tensors) - 1})")
        if base_index is not None and base is None:
            base = tensors[base_index]
        if requires_base and base is None:
            raise DamError(f"{name} needs base_model")
        shapes = [tuple(x.shape) for x in tensors] + ([tuple(base.shape)] if base is not None else [])
        if len(set(shapes)) > 1:
            raise DamError(f"{name}: input shapes differ: {shapes} (models in order, then the base)")
        inputs = len(tensors) + (base is not None and base_index is None)
        if num_models is not None and inputs != num_models:
            raise DamError(
                f"{name} merges exactly {num_models} model(s) (counting base_model); got {inputs}"
                + (" (the base and the listed models)" if base is not None and base_index is None else "")
            )
        resolved_models = [
            p if i == base_index and not base_has_params else _resolve(name, f"models[{i}]: ", model_params, p)
            for i, p in enumerate(model_params_)
        ]
        resolved = _resolve(name, "", global_params, params)
        try:
            return kernel(tensors, base, base_index, resolved_models, resolved, generator)
        except ValueError as e:  # the pure-math kernels (torch and stdlib only) report bad input as ValueError
            raise DamError(str(e)) from e

    fn.__name__ = fn.__qualname__ = f"{name}_fn"
    fn.__doc__ = kernel.__doc__
    return fn


def _method(
    name: str,
    kernel: Callable[..., Tensor],
    model_params: dict[str, Any],
    global_params: dict[str, Any],
    *,
    requires_base: bool = False,
    random: bool = False,
    num_models: int | None = None,
    base_has_params: bool = False,
) -> MergeMethod:
    fn = _checked(
        kernel,
        name,
        model_params,
        global_params,
        requires_base=requires_base,
        num_models=num_models,
        base_has_params=base_has_params,
    )
    return MergeMethod(name, fn, model_params, global_params, requires_base, random, num_models)


def _task_arithmetic_methods() -> list[MergeMethod]:
    methods = []
    for name, variant in VARIANTS.items():
        model_params: dict[str, Any] = {"weight": REQUIRED, "density": 1.0}
        if variant.sparsification == "breadcrumbs":
            model_params["gamma"] = 0.01
        if variant.sparsification == "della":
            model_params["epsilon"] = 0.15
        global_params = {
            "int8_mask": False,
            "normalize": variant.normalize,
            "rescale": variant.rescale,
            "lambda": 1.0,
        }
        kernel = partial(merge_task_arithmetic, variant=variant)
        kernel.__doc__ = merge_task_arithmetic.__doc__
        random = variant.sparsification in ("random", "della")
        methods.append(_method(name, kernel, model_params, global_params, requires_base=True, random=random))
    return methods


METHODS: dict[str, MergeMethod] = {
    m.name: m
    for m in [
        _method("linear", merge_linear, {"weight": REQUIRED}, {"normalize": True}, base_has_params=True),
        _method("slerp", merge_slerp, {}, {"t": REQUIRED}, requires_base=True, num_models=2),
        _method("nuslerp", merge_nuslerp, {"weight": REQUIRED}, {"nuslerp_row_wise": False, "nuslerp_flatten": True}),
        *_task_arithmetic_methods(),
        _method("model_stock", merge_model_stock, {}, {"filter_wise": False}, requires_base=True),
        _method("passthrough", merge_passthrough, {"scale": None}, {}, num_models=1, base_has_params=True),
        _method("multislerp", merge_multislerp, {"weight": REQUIRED}, {"normalize_weights": True, "eps": 1e-8}),
        _method("karcher", merge_karcher, {}, {"max_iter": 10, "tol": 1e-5}),
        _method("sce", merge_sce, {}, {"int8_mask": False, "select_topk": 1.0}, requires_base=True),
        _method("nearswap", merge_nearswap, {}, {"t": REQUIRED}, requires_base=True, num_models=2),
        _method("arcee_fusion", merge_arcee_fusion, {}, {}, requires_base=True, random=True, num_models=2),
        _method("ram", merge_ram, {}, {"epsilon": 1e-5}, requires_base=True),
        _method("ramplus_tl", merge_ram, {}, {"r": 0.1, "alpha": 0.2, "epsilon": 1e-5}, requires_base=True),
    ]
}


def _format_params(params: dict[str, Any]) -> str:
    if not params:
        return "-"
    shown = (k if v is REQUIRED else f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in params.items())
    return ", ".join(shown)


def describe_methods() -> str:
    """One line per method: name, per-model and global parameters (``=default``; bare = required), needs."""
    width = max(map(len, METHODS))
    lines = []
    for m in METHODS.values():
        needs = [s for s, on in [("needs base_model", m.requires_base), ("random", m.random)] if on]
        if m.num_models is not None:
            needs.append(f"exactly {m.num_models} model{'s' if m.num_models > 1 else ''}")
        per_model, shared = _format_params(m.model_params), _format_params(m.global_params)
        line = f"{m.name:<{width}}  per model: {per_model}; global: {shared}"
        lines.append(line + (f" ({', '.join(needs)})" if needs else ""))
    return "\n".join(lines)


def get_method(name: str) -> MergeMethod:
    """The registered method ``name``; a :class:`DamError` listing the valid methods otherwise."""
    if name not in METHODS:
        raise DamError(f"unknown merge_method {name!r}; valid: {', '.join(METHODS)} (see `dam merge --help`)")
    return METHODS[name]
