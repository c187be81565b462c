"""``DAMOptions``: what the DAM wrapper learns (targets, granularity, init, transform, coefficient dtype, biases).

A pydantic v2 model with ``extra="forbid"``; the docstring under each field is its description.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Target = Literal["linear", "embedding", "norm"]


class DAMOptions(BaseModel):
    """Which modules carry coefficients, how they start and how they are parameterised."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    targets: list[Target] = Field(default_factory=lambda: ["linear", "embedding", "norm"])
    """Module kinds whose coefficients train: ``linear`` (every ``nn.Linear``, ``lm_head`` included when untied),
    ``embedding`` (token embeddings; a tied ``lm_head`` is the embedding, so it follows this entry) and ``norm``
    (RMSNorm/LayerNorm weights). Modules of other kinds are still merged, with their coefficients frozen at the
    init."""

    granularity: Literal["column", "row_column", "tensor"] = "column"
    """Shape of each source's coefficients on a tensor (:mod:`dam.adaptive.layers` has the equations).
    ``column`` (the paper's): one per input column of a linear weight ``W = sum_i W_i diag(c_i)``, per hidden
    dimension of the embedding, per element of a norm weight. ``row_column``: also one per output row,
    ``W = sum_i diag(r_i) W_i diag(c_i)`` with the row scales starting at 1 and left out of the transform (norm
    weights stay per element); twice the coefficients of ``column`` on square layers, still kilobytes per layer.
    ``tensor``: one scalar per source and tensor, ``W = sum_i c_i W_i`` (with ``transform: task_vector`` and
    ``loss.objective: entropy``, layer-wise AdaMerging). Biases follow ``bias``."""

    init: str | list[float] | float = "uniform"
    """Starting coefficients. ``"uniform"``: 1/N for each of the N sources, so the wrapper starts as the plain
    average. A list of N numbers: one weight per source, used as is (``[0.5, 0.3, 0.2]`` starts at that weighted
    sum). A path to a mergekit-style YAML (``*.yml``/``*.yaml``) whose ``merge_method`` is ``linear`` (weights
    normalised to sum 1 unless ``parameters.normalize: false``) or ``task_arithmetic`` (``base + lambda *
    sum_i w_i (x_i - base)`` written over the sources, which must then include the base unless the base's share
    ``1 - lambda * sum_i w_i`` is 0); only scalar per-model ``weight`` parameters (or a top-level ``weight``)
    are read. A number ``lambda``: task arithmetic's start, every source but the base at ``lambda`` and the base
    (which must be a source) at ``1 - (N - 1) * lambda``, i.e. ``base + lambda * sum_k tau_k``. Default
    ``"uniform"``, or ``0.3`` (AdaMerging's) with ``transform: task_vector``."""

    transform: Literal["none", "tanh", "sigmoid", "softmax", "task_vector"] = "none"
    """Map from the trained raw values to the merge coefficients: identity, ``tanh``, ``sigmoid``, a
    ``softmax`` across sources (coefficients positive and summing to 1 per column), or ``task_vector``:
    AdaMerging's ``W = W_base + sum_k lambda_k (W_k - W_base)``, where the base model must be one of the sources
    (the one whose ``model`` is ``base_model``), its coefficient is ``1 - sum_k lambda_k`` (derived, never
    trained) and every other source's is ``lambda_k = clamp(raw_k, 0, 1)``; not with ``granularity:
    row_column``. The raw init is the inverse transform of the init coefficients (e.g. ``atanh(1/N)``), so every
    transform starts at the requested merge."""

    basis: Literal["weights", "task_vectors"] = "weights"
    """What each source's coefficients multiply. ``weights`` (the paper's): its own weight, ``W = sum_i diag(r_i)
    W_i diag(c_i)``. ``task_vectors``: the base's coefficients its own weight and every other source's its task
    vector ``tau_k = W_k - W_base``, ``W = diag(r_b) W_base diag(c_b) + sum_k diag(r_k) tau_k diag(c_k)``; the
    base must be one of the sources (the one whose ``model`` is ``base_model``) and ``transform`` is ``none``.
    ``dam.init`` still names the merge in the weights' terms (``[-2, 1, 1, 1]``, task arithmetic at lambda 1,
    starts the base's coefficients at 1, the sum of all, and each task vector's at its own 1). Under ``column``
    and ``tensor`` granularities the two bases span the same merges, but the optimizer sees them apart: in the
    weights basis the sources' gradients differ only by their task vectors (~1% of the weights), so Adam moves
    every source's coefficients alike and their sum, the base's scale, N times as far; here the base's scale has
    its own coefficients and each task vector's weights follow their own gradient. Under ``row_column`` the base's
    rescaling is one rank-one factor instead of N. ``train_base: false`` keeps the base's coefficients at the
    init, so only the task vectors' weights train (an unclamped, row_column-capable AdaMerging form)."""

    train_base: bool = True
    """Whether the base source's coefficients train. ``false`` keeps them at the init (their gradient is zeroed;
    with ``basis: task_vectors`` and the default init the base's weight stays exactly ``W_base``); the base must be
    a source, and AdamW's weight decay (``train.weight_decay``) must be 0, which would move them anyway."""

    coefficient_dtype: Literal["float32", "float64"] = "float32"
    """Storage dtype of the coefficients (the trained master copy), independent of the frozen weights' dtype:
    bf16/fp16 coefficients would lose every update smaller than one ulp."""

    bias: Literal["per_output", "scalar", "frozen"] = "per_output"
    """Biases (Qwen2's q/k/v, LayerNorm biases): merged bias ``sum_i b_i * beta_i`` with ``beta_i`` a learned
    vector over output features (``per_output``), one learned scalar per source (``scalar``), or fixed at the init
    (``frozen``). ``beta_i`` starts at the init coefficient of source i (1/N for uniform: the average bias)."""

    @field_validator("targets")
    @classmethod
    def _targets_unique(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("at least one of linear, embedding, norm is needed")
        if len(set(v)) != len(v):
            raise ValueError(f"duplicate entries in {v}")
        return v

    @field_validator("init")
    @classmethod
    def _init_form(cls, v: str | list[float] | float) -> str | list[float] | float:
        if isinstance(v, str) and v != "uniform" and not v.endswith((".yml", ".yaml")):
            raise ValueError(
                f"{v!r}: expected 'uniform', a list of per-source weights, a number (lambda) or a merge YAML path"
            )
        if isinstance(v, list) and not v:
            raise ValueError("the list of per-source weights is empty")
        return v

    @model_validator(mode="after")
    def _task_vector_form(self) -> DAMOptions:
        if self.basis == "task_vectors" and self.transform != "none":
            raise ValueError(
                f"dam.basis: task_vectors takes the coefficients as they are (transform none), not {self.transform!r}"
            )
        if self.transform != "task_vector":
            return self
        if self.granularity == "row_column":
            raise ValueError(
                "dam.transform: task_vector keeps the base's weight at 1, which row scales (dam.granularity: "
                "row_column) would rescale: use granularity tensor (layer-wise AdaMerging) or column"
            )
        if "init" not in self.model_fields_set:
            self.init = 0.3  # AdaMerging's start: every task vector at 0.3
        return self
