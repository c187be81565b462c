"""mergekit-compatible merge configs: pydantic models, loading, and per-tensor parameter resolution.

A config is mergekit 0.1.5's YAML (``merge_method``, ``models`` or ``slices``, ``base_model``, ``parameters``,
``dtype``, ``out_dtype``, ``tokenizer_source``, ``chat_template``: see :mod:`dam.merge.chat_template`). A model
is a folder, a Hub id or ``MODEL+LORA`` (:mod:`dam.io.lora`). Unknown keys, methods and parameters fail with the
valid ones listed.

How a parameter gets its value for one tensor (mergekit's rules, reproduced exactly):

- **Scopes**, highest precedence first: the model's own ``parameters`` (``models[i]`` or a slice source), the
  slice's ``parameters``, the top-level ``parameters``. The first scope that yields a value wins; otherwise the
  method's default applies, and a parameter without a default is an error. Method-level ("global") parameters
  such as ``normalize`` or ``t`` only read the slice and top-level scopes.
- **Filters**: a list ``[{filter: self_attn, value: ...}, ..., {value: ...}]`` takes the first entry whose
  ``filter`` is a substring of the tensor name (no filter, or ``"*"``, matches every tensor). When no entry
  matches, the scope yields nothing and the next scope is asked. Per-model parameters match the *input* tensor
  name (the source's own layer index), global ones the *output* name.
- **Gradients**: a list of numbers is a piecewise-linear curve over the layers of a slice. Layer ``i`` of an
  ``n``-layer slice sits at ``t = i / (n - 1)`` (``t = 1`` for a one-layer slice); embeddings, ``lm_head``, the
  final norm and every other tensor outside the layer stack sit at ``t = 0``. With values ``v_0..v_{m-1}``,
  ``s = t (m - 1)``, ``k = int(s)``: the value is ``(1 - (s - k)) v_k + (s - k) v_{min(k + 1, m - 1)}``. A list
  of booleans or strings picks ``v_{int(t (m - 1))}`` instead.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, PrivateAttr, TypeAdapter, ValidationError, field_validator, model_validator

from dam.errors import DamError
from dam.io.checkpoint import parse_dtype
from dam.io.paths import portable_reference, resolve_reference
from dam.merge.registry import METHODS, REQUIRED, MergeMethod

logger = logging.getLogger(__name__)

ScalarParameter = bool | int | float | str
ScalarOrGradient = ScalarParameter | list[ScalarParameter]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ConditionalParameter(_Strict):
    """One entry of a filter list: ``value`` applies to tensors whose name contains ``filter``."""

    value: ScalarOrGradient
    filter: str | None = None


ParameterSetting = ConditionalParameter | list[ConditionalParameter] | ScalarOrGradient
Parameters = dict[str, ParameterSetting]


class InputModel(_Strict):
    """An entry of ``models:``: a local folder or Hub id, with its own parameters."""

    model: str
    parameters: Parameters | None = None


class InputSlice(_Strict):
    """A source of an output slice: layers ``[start, end)`` of ``model``."""

    model: str
    layer_range: tuple[int, int]
    parameters: Parameters | None = None

    @field_validator("layer_range")
    @classmethod
    def _check_range(cls, value: tuple[int, int]) -> tuple[int, int]:
        if not 0 <= value[0] < value[1]:
            raise ValueError(f"layer_range {list(value)} must be [start, end) with 0 <= start < end")
        return value


class OutputSlice(_Strict):
    """An entry of ``slices:``: a run of output layers merged from the same number of layers of each source."""

    sources: list[InputSlice]
    base_model: str | None = None
    parameters: Parameters | None = None

    @field_validator("sources")
    @classmethod
    def _check_sources(cls, value: list[InputSlice]) -> list[InputSlice]:
        if not value:
            raise ValueError("a slice needs at least one source")
        lengths = {s.layer_range[1] - s.layer_range[0] for s in value}
        if len(lengths) > 1:
            raise ValueError(f"all sources of a slice must span the same number of layers, got {sorted(lengths)}")
        return value


class ModelTokenEmbedding(_Strict):
    """A token override's source: the row of ``token`` (or ``token_id``) in ``model``."""

    kind: Literal["model_token"]
    model: str
    token_id: int | None = None
    token: str | None = None

    @model_validator(mode="after")
    def _one_of(self) -> ModelTokenEmbedding:
        if (self.token_id is None) == (self.token is None):
            raise ValueError("give exactly one of token_id or token")
        return self


class ZeroEmbedding(_Strict):
    """A token override's source: a row of zeros."""

    kind: Literal["zero"]


class TokenEmbedding(_Strict):
    """``tokenizer.tokens.<token>``: where the token's rows come from (a model name: its row of that token)."""

    source: ModelTokenEmbedding | ZeroEmbedding | str | None = None
    force: bool = False


class TokenizerSection(_Strict):
    """mergekit's ``tokenizer:`` section (see :mod:`dam.merge.vocabulary` for what dam supports)."""

    source: str = "union"
    tokens: dict[str, TokenEmbedding] | None = None
    pad_to_multiple_of: int | None = None

    @field_validator("pad_to_multiple_of")
    @classmethod
    def _positive(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError("pad_to_multiple_of must be a positive integer")
        return value


class MergeConfig(_Strict):
    """A mergekit 0.1.5 merge configuration (the subset dam supports; see the module docstring)."""

    merge_method: str
    models: list[InputModel] | None = None
    slices: list[OutputSlice] | None = None
    base_model: str | None = None
    parameters: Parameters | None = None
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    chat_template: str | None = None
    tokenizer: TokenizerSection | None = None

    _source_text: str | None = PrivateAttr(default=None)

    @field_validator("merge_method")
    @classmethod
    def _check_method(cls, value: str) -> str:
        if value not in METHODS:
            raise DamError(f"merge_method {value!r} is unknown; valid methods: {', '.join(METHODS)}")
        return value

    @field_validator("dtype", "out_dtype")
    @classmethod
    def _check_dtype(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                parse_dtype(value)
            except DamError as e:
                raise DamError(f"dtype/out_dtype: {e}") from None
        return value

    @model_validator(mode="after")
    def _check_structure(self) -> MergeConfig:
        if (self.models is None) == (self.slices is None):
            raise DamError("the config needs exactly one of `models` or `slices`")
        if not (self.models or self.slices):
            raise DamError("`models` / `slices` is empty: nothing to merge")
        method = self.method
        if method.requires_base and self.base_model is None:
            raise DamError(f"merge_method {method.name} needs base_model (it merges differences from the base)")
        self._check_parameter_names(method)
        groups = [[m.model for m in self.models]] if self.models is not None else []
        groups += [[s.model for s in sl.sources] for sl in self.slices or []]
        for where, group in zip(self._group_labels(), groups, strict=True):
            duplicates = sorted({m for m in group if group.count(m) > 1})
            if duplicates:
                raise DamError(f"{where}: model {duplicates[0]!r} is listed twice")
        if method.num_models is not None:
            self._check_model_count(method.num_models)
        return self

    def _group_labels(self) -> list[str]:
        if self.models is not None:
            return ["models"]
        return [f"slices[{i}].sources" for i in range(len(self.slices or []))]

    def _check_model_count(self, expected: int) -> None:
        if self.models is not None:
            names = [m.model for m in self.models]
            count = len(names) + (self.base_model is not None and self.base_model not in names)
            if count != expected:
                raise DamError(
                    f"merge_method {self.merge_method} merges exactly {expected} model(s), counting base_model; "
                    f"got {count}"
                )
        for i, sl in enumerate(self.slices or []):
            if len(sl.sources) != expected:
                raise DamError(
                    f"slices[{i}]: merge_method {self.merge_method} merges exactly {expected} source(s) per slice; "
                    f"got {len(sl.sources)}"
                )

    def _check_parameter_names(self, method: MergeMethod) -> None:
        every = {**method.model_params, **method.global_params}
        scopes: list[tuple[str, Parameters | None, dict[str, Any]]] = [("parameters", self.parameters, every)]
        for i, m in enumerate(self.models or []):
            scopes.append((f"models[{i}].parameters", m.parameters, method.model_params))
        for i, sl in enumerate(self.slices or []):
            scopes.append((f"slices[{i}].parameters", sl.parameters, every))
            for j, src in enumerate(sl.sources):
                scopes.append((f"slices[{i}].sources[{j}].parameters", src.parameters, method.model_params))
        for where, params, valid in scopes:
            for key in params or {}:
                if key in valid:
                    continue
                if key in method.global_params:
                    raise DamError(
                        f"{where}.{key}: {key!r} is a method-level parameter of {method.name}; set it in the "
                        "top-level or slice `parameters`"
                    )
                raise DamError(
                    f"{where}.{key}: unknown parameter for {method.name}; valid: {', '.join(sorted(every)) or 'none'}"
                )

    @property
    def method(self) -> MergeMethod:
        return METHODS[self.merge_method]

    @property
    def source_text(self) -> str:
        """The YAML this config was loaded from, or a dump of it when built in code."""
        if self._source_text is not None:
            return self._source_text
        return yaml.safe_dump(self.model_dump(exclude_none=True, mode="json"), sort_keys=False)

    def vocabulary_section(self) -> TokenizerSection | None:
        """The section that rebuilds the vocabulary (:mod:`dam.merge.vocabulary`): ``tokenizer:``, else, for the
        old ``tokenizer_source: union``, a ``tokenizer: {source: union}`` (as mergekit reads it). Other
        ``tokenizer_source`` values only pick the tokenizer files copied."""
        if self.tokenizer is None and self.tokenizer_source == "union":
            return TokenizerSection(source="union")
        return self.tokenizer

    def with_models(self, rename: Callable[[str], str]) -> MergeConfig:
        """A copy with every model reference (``base_model``, models, slice sources and bases, a
        ``tokenizer_source`` naming a model) replaced by ``rename(reference)``; its source text is a YAML dump."""
        data = self.model_dump(exclude_none=True, mode="json")
        for key in ("base_model", "tokenizer_source"):
            if key in data and data[key] not in ("base", "union"):
                data[key] = rename(data[key])
        for entry in data.get("models", []):
            entry["model"] = rename(entry["model"])
        for sl in data.get("slices", []):
            if "base_model" in sl:
                sl["base_model"] = rename(sl["base_model"])
            for src in sl["sources"]:
                src["model"] = rename(src["model"])
        section = data.get("tokenizer", {})
        if section.get("source", "union") not in ("base", "union"):
            section["source"] = rename(section["source"])
        for cfg in (section.get("tokens") or {}).values():
            if isinstance(cfg.get("source"), str):
                cfg["source"] = rename(cfg["source"])
            elif isinstance(cfg.get("source"), dict) and "model" in cfg["source"]:
                cfg["source"]["model"] = rename(cfg["source"]["model"])
        return parse_merge_config(data)

    def portable_text(self, folder: str | Path) -> str:
        """The config as written into ``folder`` (``mergekit_config.yml``, the model card): :attr:`source_text`
        when every model reference is a Hub id, else a YAML dump with local paths relative to ``folder``
        (``./m``, ``../m``; see :mod:`dam.io.paths`), so no absolute path of this machine is written."""
        portable = self.with_models(lambda ref: portable_reference(ref, folder))
        same = portable.model_dump(mode="json") == self.model_dump(mode="json")
        return self.source_text if same else portable.source_text

    def referenced_models(self) -> list[str]:
        """Every model the merge reads, base first, then in config order, without repeats."""
        names = [self.base_model] if self.base_model else []
        names += [m.model for m in self.models or []]
        for sl in self.slices or []:
            names += ([sl.base_model] if sl.base_model else []) + [s.model for s in sl.sources]
        return list(dict.fromkeys(names))

    def output_slices(self, num_layers: Callable[[str], int]) -> list[OutputSlice]:
        """The merge as slices, the way mergekit normalises it.

        ``models:`` becomes one slice whose sources span each model's ``num_layers(model)`` layers; an unlisted
        ``base_model`` is appended as a last source without parameters (mergekit 0.1.5 does the same, so every
        method sees it as one more input).
        """
        if self.slices is not None:
            return self.slices
        assert self.models is not None
        entries = [(m.model, m.parameters) for m in self.models]
        if self.base_model is not None and self.base_model not in [m for m, _ in entries]:
            entries.append((self.base_model, None))
        counts = {model: num_layers(model) for model, _ in entries}
        if len(set(counts.values())) > 1:
            detail = ", ".join(f"{model!r}: {n}" for model, n in counts.items())
            raise DamError(f"models have different numbers of layers ({detail}); use slices with layer_range")
        # built without validation: a model without numbered layers gives the empty range (0, 0)
        sources = [InputSlice.model_construct(model=m, layer_range=(0, counts[m]), parameters=p) for m, p in entries]
        return [OutputSlice.model_construct(sources=sources, base_model=None, parameters=None)]


def _converter(default: Any) -> Callable[[Any], Any]:
    """How a parameter's raw YAML values are read: booleans for boolean parameters, else numbers (None allowed
    where the default is None). Uses pydantic's lax rules, as mergekit does ("1e-3" is a number, "yes" true)."""
    if isinstance(default, bool):
        adapter: TypeAdapter[Any] = TypeAdapter(bool)
    elif default is None:
        adapter = TypeAdapter(float | None)
    else:
        adapter = TypeAdapter(float)
    return adapter.validate_python


def evaluate_setting(setting: ParameterSetting, *, tensor_name: str, t: float, convert: Callable[[Any], Any]) -> Any:
    """The value of one scope's setting for ``tensor_name`` at gradient position ``t``; None if it yields none."""
    if isinstance(setting, ConditionalParameter):
        setting = [setting]
    if not isinstance(setting, list):
        return convert(setting)
    if not setting:
        return None
    if all(isinstance(e, ConditionalParameter) for e in setting):
        for cond in setting:
            if cond.filter is None or cond.filter == "*" or (tensor_name and cond.filter in tensor_name):
                return evaluate_setting(cond.value, tensor_name=tensor_name, t=t, convert=convert)
        return None
    values = [convert(e) for e in setting]
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        return values[int(t * (len(values) - 1))]
    scaled = t * (len(values) - 1)
    i0 = int(scaled)
    i1 = min(len(values) - 1, i0 + 1)
    frac = scaled - i0
    return convert((1 - frac) * values[i0] + frac * values[i1])


def _resolve_one(
    key: str, default: Any, scopes: list[Parameters | None], *, tensor_name: str, t: float, where: str
) -> Any:
    convert = _converter(default)
    for scope in scopes:
        if scope is not None and key in scope:
            try:
                value = evaluate_setting(scope[key], tensor_name=tensor_name, t=t, convert=convert)
            except ValidationError:
                kind = "true or false" if isinstance(default, bool) else "a number"
                raise DamError(f"{where}parameter {key!r} must be {kind}, got {scope[key]!r}") from None
            if value is not None:
                return value
    return default


def resolve_parameters(
    config: MergeConfig,
    slice_: OutputSlice,
    *,
    tensor_name: str,
    input_names: list[str],
    t: float,
    base_index: int | None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Global and per-model parameters of one output tensor, in the registry's terms.

    ``input_names[i]`` is the tensor's name in ``slice_.sources[i]``. A parameter left at ``REQUIRED`` is omitted,
    so the method reports it missing; the base's own entry (``base_index``) may lack required parameters, since
    methods that merge task vectors never read it.
    """
    method = config.method
    shared_scopes = [slice_.parameters, config.parameters]
    params = {
        key: value
        for key, default in method.global_params.items()
        if (value := _resolve_one(key, default, shared_scopes, tensor_name=tensor_name, t=t, where="")) is not REQUIRED
    }
    model_params = []
    for i, (source, name) in enumerate(zip(slice_.sources, input_names, strict=True)):
        scopes = [source.parameters, *shared_scopes]
        resolved = {}
        for key, default in method.model_params.items():
            value = _resolve_one(key, default, scopes, tensor_name=name, t=t, where=f"model {source.model!r}: ")
            if value is not REQUIRED:
                resolved[key] = value
            elif i != base_index:
                raise DamError(
                    f"model {source.model!r}: parameter {key!r} is required by {method.name} and has no value for "
                    f"tensor {name!r}"
                )
        model_params.append(resolved)
    return params, model_params


def _error_location(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


_FIELDS_AT: dict[tuple[str, ...], type[BaseModel]] = {
    (): MergeConfig,
    ("models",): InputModel,
    ("slices",): OutputSlice,
    ("slices", "sources"): InputSlice,
}


def _format_validation_error(error: ValidationError) -> str:
    """pydantic's errors as one line: ``key.path: what is wrong`` per distinct location."""
    messages: dict[str, str] = {}
    for err in error.errors():
        loc = tuple(err["loc"])
        if "parameters" in loc:
            cut = loc.index("parameters") + 2
            where = _error_location(loc[:cut])
            msg = "not a valid setting (use a number, true/false, a list of numbers, or a list of {filter, value})"
        elif err["type"] == "extra_forbidden":
            where = _error_location(loc)
            parent = tuple(p for p in loc[:-1] if isinstance(p, str))
            fields = _FIELDS_AT.get(parent)
            valid = f" (valid: {', '.join(fields.model_fields)})" if fields else ""
            msg = f"unknown key{valid}"
        else:
            where = _error_location(loc) or "config"
            msg = err["msg"].removeprefix("Value error, ")
        messages.setdefault(where, f"{where}: {msg}")
    return "; ".join(messages.values())


def parse_merge_config(data: Any, source_text: str | None = None, *, origin: str = "config") -> MergeConfig:
    """Validate a parsed YAML mapping into a :class:`MergeConfig`; every problem is a one-line DamError."""
    if not isinstance(data, dict):
        raise DamError(f"{origin}: expected a YAML mapping with merge_method and models/slices")
    try:
        config = MergeConfig.model_validate(data)
    except ValidationError as e:
        raise DamError(f"{origin}: {_format_validation_error(e)}") from None
    except DamError as e:
        raise DamError(f"{origin}: {e}") from None
    config._source_text = source_text
    return config


def load_saved_merge_config(folder: str | Path) -> MergeConfig:
    """The ``mergekit_config.yml`` of a dam merge output, its local models (written relative to ``folder``)
    resolved to absolute paths."""
    folder = Path(folder)
    return load_merge_config(folder / "mergekit_config.yml").with_models(lambda ref: resolve_reference(ref, folder))


def load_merge_config(path: str | Path) -> MergeConfig:
    """Read and validate a mergekit YAML file; the text is kept to be saved beside the merged weights."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise DamError(f"config {str(path)!r}: cannot read it ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise DamError(
            f"config {str(path)!r}: not a text (UTF-8) file: byte {e.start} is {e.object[e.start]:#04x}"
        ) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise DamError(f"config {str(path)!r}: invalid YAML{at}: {first}") from None
    return parse_merge_config(data, text, origin=f"config {str(path)!r}")


__all__ = [
    "ConditionalParameter",
    "InputModel",
    "InputSlice",
    "MergeConfig",
    "TokenizerSection",
    "OutputSlice",
    "evaluate_setting",
    "load_merge_config",
    "load_saved_merge_config",
    "parse_merge_config",
    "resolve_parameters",
]
