"""Merge configs: validation messages, parameter resolution (gradients, filters, precedence, defaults), and
every example in configs/merge/ parsed and run on tiny models."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from dam.errors import DamError
from dam.io.paths import portable_reference
from dam.merge.config import (
    ConditionalParameter,
    evaluate_setting,
    load_merge_config,
    parse_merge_config,
    resolve_parameters,
)
from dam.merge.engine import run_merge
from dam.merge.registry import METHODS
from dam.testing import make_family

EXAMPLES = sorted((Path(__file__).parent.parent / "configs" / "merge").glob("*.yaml"))


def _parse(text: str):
    return parse_merge_config(yaml.safe_load(text), text)


def _float(x):
    return float(x)


@pytest.mark.parametrize(
    "setting,t,expected",
    [
        (0.3, 0.7, 0.3),
        ([0.0, 1.0], 0.25, 0.25),
        ([0.0, 0.5, 0.3, 0.7, 1.0], 0.0, 0.0),
        ([0.0, 0.5, 0.3, 0.7, 1.0], 1.0, 1.0),
        # s = 4/3: between values[1] = 0.5 and values[2] = 0.3, a third of the way
        ([0.0, 0.5, 0.3, 0.7, 1.0], 1 / 3, (1 - 1 / 3) * 0.5 + (1 / 3) * 0.3),
        ([2, 4, 8], 0.75, 6.0),
        (["1e-1", 0.5], 0.5, 0.3),  # numeric strings are numbers, as in mergekit
        ([], 0.5, None),
    ],
)
def test_gradient_interpolation(setting, t, expected):
    value = evaluate_setting(setting, tensor_name="x", t=t, convert=_float)
    if expected is None:
        assert value is None
    else:
        assert value == pytest.approx(expected, abs=1e-15)


def test_boolean_gradient_picks_a_value():
    def as_bool(v):
        return bool(v)

    assert evaluate_setting([True, False], tensor_name="x", t=0.4, convert=as_bool) is True
    assert evaluate_setting([True, False], tensor_name="x", t=1.0, convert=as_bool) is False


def test_filters_first_substring_match_and_fallthrough():
    setting = [
        ConditionalParameter(filter="self_attn", value=0.1),
        ConditionalParameter(filter="q_proj", value=0.2),  # never reached for q_proj: self_attn matches first
        ConditionalParameter(filter="mlp", value=[0.0, 1.0]),
    ]
    name = "model.layers.0.self_attn.q_proj.weight"
    assert evaluate_setting(setting, tensor_name=name, t=0.0, convert=_float) == 0.1
    assert evaluate_setting(setting, tensor_name="model.layers.3.mlp.up_proj.weight", t=0.5, convert=_float) == 0.5
    assert evaluate_setting(setting, tensor_name="model.norm.weight", t=0.0, convert=_float) is None
    star = [ConditionalParameter(filter="*", value=0.7)]
    assert evaluate_setting(star, tensor_name="lm_head.weight", t=0.0, convert=_float) == 0.7
    single = ConditionalParameter(value=0.9)  # one conditional without a filter applies to everything
    assert evaluate_setting(single, tensor_name="anything", t=0.0, convert=_float) == 0.9


PRECEDENCE = """
merge_method: ties
base_model: base
slices:
  - sources:
      - model: base
        layer_range: [0, 2]
      - model: a
        layer_range: [2, 4]
        parameters:
          weight: 0.9
          density: [{filter: mlp, value: 0.2}]
      - model: b
        layer_range: [0, 2]
    parameters:
      weight: 0.4
      lambda: 0.5
parameters:
  weight: 0.1
  density: 0.8
  normalize: false
  lambda: 2.0
"""


def test_precedence_source_over_slice_over_top_level():
    config = _parse(PRECEDENCE)
    slice_ = config.slices[0]
    inputs = ["model.layers.1.mlp.up_proj.weight", "model.layers.3.mlp.up_proj.weight", "model.layers.1.mlp.x"]
    params, per_model = resolve_parameters(
        config, slice_, tensor_name="model.layers.1.mlp.up_proj.weight", input_names=inputs, t=1.0, base_index=0
    )
    assert params == {"int8_mask": False, "normalize": False, "rescale": False, "lambda": 0.5}
    assert per_model[1] == {"weight": 0.9, "density": 0.2}  # the source's own values
    assert per_model[2] == {"weight": 0.4, "density": 0.8}  # slice weight, top-level density
    # a filter list with no match falls through to the next scope: a's density on attention is the top level's
    _, per_model = resolve_parameters(
        config, slice_, tensor_name="o", input_names=["o", "model.layers.2.self_attn.o", "o"], t=0.0, base_index=0
    )
    assert per_model[1]["density"] == 0.8


def test_per_model_filters_match_the_input_name_and_globals_the_output_name():
    config = _parse(
        """
merge_method: ties
base_model: base
slices:
  - sources:
      - {model: base, layer_range: [0, 1]}
      - {model: a, layer_range: [5, 6], parameters: {weight: [{filter: layers.5., value: 0.3}, {value: 0.6}]}}
parameters:
  lambda: [{filter: layers.0., value: 3.0}, {value: 1.0}]
"""
    )
    params, per_model = resolve_parameters(
        config,
        config.slices[0],
        tensor_name="model.layers.0.mlp.weight",
        input_names=["model.layers.0.mlp.weight", "model.layers.5.mlp.weight"],
        t=1.0,
        base_index=0,
    )
    assert per_model[1]["weight"] == 0.3 and params["lambda"] == 3.0


@pytest.mark.parametrize(
    "method,normalize,rescale",
    [
        ("ties", True, False),
        ("task_arithmetic", False, False),
        ("dare_ties", False, True),
        ("dare_linear", False, True),
        ("della", True, True),
        ("della_linear", False, True),
        ("breadcrumbs", False, False),
    ],
)
def test_defaults_come_from_the_registry(method, normalize, rescale):
    config = _parse(f"merge_method: {method}\nbase_model: base\nmodels: [{{model: a, parameters: {{weight: 1}}}}]")
    slice_ = config.output_slices(lambda m: 2)[0]
    assert [s.model for s in slice_.sources] == ["a", "base"]  # the unlisted base is appended, as in mergekit
    params, per_model = resolve_parameters(config, slice_, tensor_name="w", input_names=["w", "w"], t=0, base_index=1)
    assert (params["normalize"], params["rescale"]) == (normalize, rescale)
    assert per_model[0]["density"] == 1.0 and per_model[1] == {"density": 1.0} | (
        {"gamma": 0.01} if "breadcrumbs" in method else {"epsilon": 0.15} if "della" in method else {}
    )


def test_missing_required_parameter_names_the_model():
    config = _parse("merge_method: linear\nmodels: [{model: a, parameters: {weight: 1}}, {model: b}]")
    slice_ = config.output_slices(lambda m: 2)[0]
    with pytest.raises(DamError, match="model 'b': parameter 'weight' is required"):
        resolve_parameters(config, slice_, tensor_name="w", input_names=["w", "w"], t=0, base_index=None)


def test_bad_parameter_value_type():
    config = _parse("merge_method: ties\nbase_model: base\nmodels: [{model: a, parameters: {weight: heavy}}]")
    slice_ = config.output_slices(lambda m: 2)[0]
    with pytest.raises(DamError, match="'weight' must be a number, got 'heavy'"):
        resolve_parameters(config, slice_, tensor_name="w", input_names=["w", "w"], t=0, base_index=1)


@pytest.mark.parametrize(
    "text,match",
    [
        (
            "merge_method: magic\nmodels: [{model: a}]",
            r"merge_method 'magic' is unknown; valid methods: linear, slerp",
        ),
        (
            "merge_method: ties\nbase_model: b\nmodels: [{model: a, parameters: {weight: 1, densty: 0.5}}]",
            r"models\[0\].parameters.densty: unknown parameter for ties; valid: density, int8_mask, lambda",
        ),
        (
            "merge_method: ties\nbase_model: b\nmodels: [{model: a, parameters: {weight: 1, normalize: true}}]",
            r"models\[0\].parameters.normalize: 'normalize' is a method-level parameter",
        ),
        ("merge_method: linear\nmodels: [{model: a}]\nmodules: {}", r"modules: unknown key \(valid: merge_method"),
        ("merge_method: linear\nmodels: [{model: a, paramters: {}}]", r"models\[0\].paramters: unknown key"),
        ("merge_method: linear\nmodels: [{model: a, parameters: {weight: {a: 1}}}]", r"weight: not a valid setting"),
        ("merge_method: linear", "exactly one of `models` or `slices`"),
        ("merge_method: linear\nmodels: []", "nothing to merge"),
        ("merge_method: ties\nmodels: [{model: a}]", "ties needs base_model"),
        (
            "merge_method: slerp\nbase_model: a\nmodels: [{model: a}, {model: b}, {model: c}]\nparameters: {t: 0.5}",
            "slerp merges exactly 2 model",
        ),
        ("merge_method: linear\nmodels: [{model: a}, {model: a}]", "model 'a' is listed twice"),
        ("merge_method: linear\nmodels: [{model: a}]\ndtype: float7", "dtype/out_dtype: unknown dtype 'float7'"),
        (
            "merge_method: passthrough\nslices: [{sources: [{model: a, layer_range: [4, 2]}]}]",
            r"slices\[0\].sources\[0\].layer_range: layer_range \[4, 2\] must be",
        ),
        (
            "merge_method: linear\nslices: [{sources: [{model: a, layer_range: [0, 2]}, "
            "{model: b, layer_range: [0, 3]}]}]",
            "same number of layers",
        ),
        ("- just a list", "expected a YAML mapping"),
    ],
)
def test_config_errors_are_one_line_and_name_the_key(text, match):
    with pytest.raises(DamError, match=match) as info:
        parse_merge_config(yaml.safe_load(text), text)
    assert "\n" not in str(info.value)


def test_load_merge_config_file_errors(tmp_path):
    with pytest.raises(DamError, match="cannot read it"):
        load_merge_config(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("merge_method: linear\nmodels: [{model: a\n")
    with pytest.raises(DamError, match="invalid YAML at line"):
        load_merge_config(bad)
    good = tmp_path / "good.yaml"
    good.write_text("# a comment kept verbatim\nmerge_method: linear\nmodels: [{model: a, parameters: {weight: 1}}]\n")
    config = load_merge_config(good)
    assert config.source_text == good.read_text()
    assert config.referenced_models() == ["a"]


def test_every_registry_method_has_an_example():
    assert {p.stem for p in EXAMPLES} == set(METHODS)


def localize(data: dict, base: Path, sources: list[Path]) -> dict:
    """Point every model of an example config at tiny local models: base_model -> base, the others -> sources
    in order of first appearance."""
    text = yaml.safe_dump(data, sort_keys=False)
    names = []
    for m in [*data.get("models", []), *[s for sl in data.get("slices", []) for s in sl["sources"]]]:
        if m["model"] != data.get("base_model") and m["model"] not in names:
            names.append(m["model"])
    mapping = {name: str(path) for name, path in zip(names, sources[: len(names)], strict=True)}
    if data.get("base_model"):
        mapping[data["base_model"]] = str(base)
    localized = yaml.safe_load(text)
    for m in [*localized.get("models", []), *[s for sl in localized.get("slices", []) for s in sl["sources"]]]:
        m["model"] = mapping[m["model"]]
    if localized.get("base_model"):
        localized["base_model"] = mapping[localized["base_model"]]
    return localized


def example_layers() -> int:
    ends = [4]
    for path in EXAMPLES:
        data = yaml.safe_load(path.read_text())
        ends += [s["layer_range"][1] for sl in data.get("slices", []) for s in sl["sources"]]
    return max(ends)


@pytest.fixture(scope="module")
def example_family(tmp_path_factory):
    return make_family(tmp_path_factory.mktemp("examples"), 3, num_layers=example_layers(), hidden_size=16)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_config_parses_and_merges(path, example_family, tmp_path):
    text = path.read_text()
    config = load_merge_config(path)
    assert text.startswith("# ") and f"configs/merge/{path.name}" in text  # a header with the command to run it
    assert config.merge_method == path.stem
    base, sources = example_family
    local = tmp_path / "config.yaml"
    local.write_text(yaml.safe_dump(localize(yaml.safe_load(text), base, sources), sort_keys=False))
    summary = run_merge(local, tmp_path / "out", progress=False)
    out = tmp_path / "out"
    tensors = load_file(out / "model.safetensors")
    assert len(tensors) == summary.num_tensors
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())  # every example asks for bfloat16
    written = json.loads((out / "config.json").read_text())
    assert written["dtype"] == "bfloat16"
    layers = {int(k.split(".")[2]) for k in tensors if k.startswith("model.layers.")}
    assert layers == set(range(written["num_hidden_layers"]))
    # saved with the local models relative to the output folder (no absolute path of this machine)
    relative = localize(
        yaml.safe_load(text), Path(portable_reference(base, out)), [Path(portable_reference(s, out)) for s in sources]
    )
    assert yaml.safe_load((out / "mergekit_config.yml").read_text()) == relative
