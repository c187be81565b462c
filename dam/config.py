"""Configuration models. ``DAMOptions``: what the DAM wrapper learns; ``LossConfig``: the training objective.

Both are pydantic v2 models with ``extra="forbid"``, so a misspelt key fails loudly with its name. The docstring
under each field is its description (``use_attribute_docstrings``) and shows up in ``model_json_schema()``.
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

    init: str | list[float] = "uniform"
    """Starting coefficients. ``"uniform"``: 1/N for each of the N sources, so the wrapper starts as the plain
    average. A list of N numbers: one weight per source, used as is (``[0.5, 0.3, 0.2]`` starts at that weighted
    sum). A path to a mergekit-style YAML (``*.yml``/``*.yaml``) whose ``merge_method`` is ``linear`` (weights
    normalised to sum 1 unless ``parameters.normalize: false``) or ``task_arithmetic`` (``base + lambda *
    sum_i w_i (x_i - base)`` written over the sources, which must then include the base unless the base's share
    ``1 - lambda * sum_i w_i`` is 0); only scalar per-model ``weight`` parameters (or a top-level ``weight``)
    are read."""

    transform: Literal["none", "tanh", "sigmoid", "softmax"] = "none"
    """Map from the trained raw values to the merge coefficients: identity, ``tanh``, ``sigmoid``, or a
    ``softmax`` across sources (coefficients positive and summing to 1 per column). The raw init is the inverse
    transform of the init coefficients (e.g. ``atanh(1/N)``), so every transform starts at the requested merge."""

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
    def _init_form(cls, v: str | list[float]) -> str | list[float]:
        if isinstance(v, str) and v != "uniform" and not v.endswith((".yml", ".yaml")):
            raise ValueError(f"{v!r}: expected 'uniform', a list of per-source weights, or a merge YAML path")
        if isinstance(v, list) and not v:
            raise ValueError("the list of per-source weights is empty")
        return v


class LossConfig(BaseModel):
    """The DAM objective: distillation from the source teachers plus coefficient regularisers. 0 disables a term."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    temperature: float = Field(2.0, gt=0)
    """Softmax temperature T of the distillation KL; the KL is multiplied by T^2 to keep gradient scales."""

    kl: float = Field(1.0, ge=0)
    """Weight of KL(teacher || student), averaged over non-padding tokens."""

    similarity: float = Field(0.01, ge=0)
    """Weight of the mean pairwise cosine similarity of the per-source coefficient vectors, summed over modules
    (minimised, so the sources' coefficients move apart)."""

    l1: float = Field(0.0, ge=0)
    """Weight of the L1 penalty on the coefficients (see ``regularize_toward``)."""

    l2: float = Field(0.0, ge=0)
    """Weight of the squared L2 penalty on the coefficients (see ``regularize_toward``)."""

    regularize_toward: Literal["zero", "init"] = "zero"
    """Target of the L1/L2 penalties: ``zero`` penalises the coefficients themselves, ``init`` their distance from
    the starting merge."""

    top_k: int | None = Field(None, ge=1)
    """Teacher logits cached as the top-K logits and indices per token (typically 50 to 128); ``None`` uses full
    teacher logits. See :func:`dam.losses.topk_kl_divergence` for the approximation."""


class DataConfig(BaseModel):
    """Training data: how each model's dataset is read, rendered, sampled and paired with teachers (``dam.data``)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    text_field: str = "text"
    """Column of ready-to-train text, used for datasets that lack the prompt/response columns."""

    prompt_field: str = "prompt"
    """Column of the user prompt. A dataset with both prompt and response columns is read as prompt/response."""

    response_field: str = "response"
    """Column of the assistant response."""

    use_chat_template: bool = True
    """Render prompt/response as a user/assistant conversation with the base tokenizer's chat template when it has
    one; without one (or when false) use ``template``."""

    template: str = "{prompt}\n{response}"
    """Plain template for prompt/response data when no chat template is used: ``{prompt}`` then ``{response}``
    once each (``{{``/``}}`` for literal braces). The tokenizer's BOS (if it adds one) goes before it, EOS after."""

    response_only_loss: bool = False
    """Distil on the response tokens only (prompt tokens get label -100). Text data always counts every token."""

    split: str = "train"
    """Split read from Hub datasets and saved ``DatasetDict`` folders (local data files are read whole)."""

    num_examples: int | None = Field(None, ge=1)
    """Examples sampled from each dataset after the seeded shuffle (the paper's code used 1729); ``None`` keeps
    them all."""

    seed: int = 0
    """Seed of the shuffle that samples each dataset and of the shuffle that interleaves the sources."""

    max_length: int = Field(2048, ge=2)
    """Tokens per sequence: longer examples are truncated on the right; with ``packing``, the block length."""

    packing: bool = False
    """Concatenate each dataset's examples, EOS-separated, into blocks of exactly ``max_length`` tokens (the last
    may be shorter); a block is one causal sequence (see ``dam.data.pack_dataset``)."""

    pairing: Literal["own", "all"] = "own"
    """Which teacher supervises which data: ``own``, source k's teacher on source k's dataset (the paper's
    default); ``all``, every teacher on every example, the distillation loss averaged over the teachers."""

    teacher_logits: Literal["on_the_fly", "cached"] = "on_the_fly"
    """``on_the_fly``: teacher forwards at every step; ``cached``: top-``loss.top_k`` teacher log-probabilities
    precomputed once by ``dam cache-logits CONFIG`` into ``cache_dir`` and read from there."""

    cache_dir: str | None = None
    """Folder of the teacher-logit cache (needed for ``teacher_logits: cached``). It records the models, data and
    settings it came from: a stale cache is refused, a matching one is reused across runs and sweeps."""

    @field_validator("template")
    @classmethod
    def _template_fields(cls, v: str) -> str:
        import string

        fields = [f for _, f, _, _ in string.Formatter().parse(v) if f is not None]
        if fields != ["prompt", "response"]:
            raise ValueError(f"must contain {{prompt}} then {{response}} once each, found fields {fields}")
        return v

    @model_validator(mode="after")
    def _cache_dir_for_cached(self) -> DataConfig:
        if self.teacher_logits == "cached" and not self.cache_dir:
            raise ValueError("teacher_logits: cached needs cache_dir (the folder `dam cache-logits` writes)")
        return self
