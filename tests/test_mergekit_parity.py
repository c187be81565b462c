"""Parity with mergekit 0.1.5: the same configs through `mergekit-yaml` and `dam merge` give the same tensors.

Tiny random Llamas (untied lm_head, non-trivial norm weights) are built once per module. mergekit runs every
config in one subprocess (its import alone takes seconds), dam in-process. Deterministic methods must agree to
1e-6 in float32 on every tensor, with the same tensor names and layer count; DARE and DELLA draw different
random numbers, so they are compared by their statistics. Skipped when mergekit is not installed.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from dam.merge.engine import run_merge
from dam.merge.multi import run_merge_file
from dam.testing import make_family

pytest.importorskip("mergekit")
pytestmark = pytest.mark.slow  # one mergekit subprocess runs ~30 merges (about 30 s on 2 cores)

EXAMPLES = sorted((Path(__file__).parent.parent / "configs" / "merge").glob("*.yaml"))
RANDOM_METHODS = {"dare_linear", "dare_ties", "della", "della_linear"}

MERGEKIT_BATCH = """
import json, sys, yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions

for job in json.loads(open(sys.argv[1]).read()):
    text = open(job["config"]).read()
    options = MergeOptions(random_seed=job["seed"], write_model_card=False, quiet=True)
    run_merge(MergeConfiguration.model_validate(yaml.safe_load(text)), job["out"], options=options, config_source=text)
"""

# {base}, {s0}, {s1}, {s2}: the tiny family's folders. Every config computes in float32.
CASES = {
    "linear_gradients": """
merge_method: linear
models:
  - model: {s0}
    parameters:
      weight: [{{filter: self_attn, value: [0.1, 0.9]}}, {{filter: mlp, value: [1.0, 0.2, 0.6]}}, {{value: 0.5}}]
  - model: {s1}
    parameters: {{weight: [0.3, 0.7, 0.2]}}
  - model: {s2}
parameters: {{weight: 0.25, normalize: true}}
dtype: float32
""",
    "linear_unlisted_base_out_bf16": """
merge_method: linear
base_model: {base}
models:
  - model: {s0}
    parameters: {{weight: 0.6}}
  - model: {s1}
    parameters: {{weight: 0.3}}
parameters: {{weight: 0.1, normalize: false}}
dtype: float32
out_dtype: bfloat16
""",
    "slerp_filters": """
merge_method: slerp
base_model: {s0}
models: [{{model: {s0}}}, {{model: {s1}}}]
parameters:
  t:
    - {{filter: self_attn, value: [0, 0.5, 0.3, 0.7, 1]}}
    - {{filter: mlp, value: [1, 0.5, 0.7, 0.3, 0]}}
    - {{value: 0.4}}
dtype: float32
""",
    "slerp_two_slices": """
merge_method: slerp
base_model: {base}
slices:
  - sources:
      - {{model: {base}, layer_range: [0, 2]}}
      - {{model: {s0}, layer_range: [0, 2]}}
    parameters: {{t: [0.2, 0.8]}}
  - sources:
      - {{model: {base}, layer_range: [2, 4]}}
      - {{model: {s1}, layer_range: [2, 4]}}
parameters: {{t: [{{filter: mlp, value: 0.9}}, {{value: [0.0, 1.0]}}]}}
dtype: float32
""",
    "nuslerp_base_rowwise": """
merge_method: nuslerp
base_model: {base}
models:
  - {{model: {s0}, parameters: {{weight: [1.0, 0.2]}}}}
  - {{model: {s1}, parameters: {{weight: 0.6}}}}
parameters: {{nuslerp_row_wise: true, nuslerp_flatten: false}}
dtype: float32
""",
    "nuslerp_no_base": """
merge_method: nuslerp
models:
  - {{model: {s0}, parameters: {{weight: 0.3}}}}
  - {{model: {s2}, parameters: {{weight: 0.7}}}}
dtype: float32
""",
    "task_arithmetic": """
merge_method: task_arithmetic
base_model: {base}
models:
  - {{model: {s0}, parameters: {{weight: 0.5}}}}
  - {{model: {s1}, parameters: {{weight: [0.1, 0.9, 0.3]}}}}
  - {{model: {s2}, parameters: {{weight: [{{filter: embed, value: 0.0}}]}}}}
parameters: {{weight: 0.2, lambda: 0.8}}
dtype: float32
""",
    "ties_gradients": """
merge_method: ties
base_model: {base}
models:
  - model: {s0}
    parameters: {{weight: [0.2, 0.8], density: [0.3, 0.9]}}
  - model: {s1}
    parameters: {{weight: [{{filter: mlp, value: 0.7}}], density: 0.5}}
  - model: {s2}
    parameters: {{weight: 0.4, density: {{filter: self_attn, value: 0.2}}}}
parameters: {{weight: 0.3, density: 0.6, normalize: true, lambda: 1.1, int8_mask: true}}
dtype: float32
""",
    "ties_slices_precedence": """
merge_method: ties
base_model: {base}
slices:
  - sources:
      - {{model: {base}, layer_range: [0, 4]}}
      - {{model: {s0}, layer_range: [0, 4], parameters: {{density: [{{filter: mlp, value: 0.25}}]}}}}
      - {{model: {s1}, layer_range: [0, 4], parameters: {{weight: 0.9}}}}
    parameters: {{weight: 0.5, density: 0.7, normalize: false}}
parameters: {{weight: 0.1, density: 0.3, normalize: true, lambda: [0.5, 1.5]}}
dtype: float32
""",
    "breadcrumbs": """
merge_method: breadcrumbs
base_model: {base}
models:
  - {{model: {s0}, parameters: {{weight: 0.5, density: 0.6, gamma: 0.05}}}}
  - {{model: {s1}, parameters: {{weight: 0.8, density: 0.4}}}}
dtype: float32
""",
    "breadcrumbs_ties": """
merge_method: breadcrumbs_ties
base_model: {base}
models:
  - {{model: {s0}, parameters: {{weight: 0.5, density: 0.6, gamma: 0.05}}}}
  - {{model: {s1}, parameters: {{weight: 0.8, density: [0.2, 0.9]}}}}
  - {{model: {s2}, parameters: {{weight: 0.3, density: 0.5, gamma: 0.1}}}}
parameters: {{normalize: true}}
dtype: float32
""",
    "model_stock": """
merge_method: model_stock
base_model: {base}
models: [{{model: {s0}}}, {{model: {s1}}}, {{model: {s2}}}]
dtype: float32
""",
    "model_stock_filter_wise": """
merge_method: model_stock
base_model: {base}
models: [{{model: {base}}}, {{model: {s0}}}, {{model: {s1}}}]
parameters: {{filter_wise: true}}
dtype: float32
""",
    "passthrough_slices": """
merge_method: passthrough
slices:
  - sources: [{{model: {s0}, layer_range: [0, 3]}}]
  - sources:
      - {{model: {s1}, layer_range: [1, 4], parameters: {{scale: [{{filter: o_proj, value: 0.5}}, {{value: 1.0}}]}}}}
  - sources: [{{model: {s2}, layer_range: [3, 4]}}]
dtype: float32
""",
    "multislerp_base_gradients": """
merge_method: multislerp
base_model: {base}
models:
  - {{model: {s0}, parameters: {{weight: [0.2, 0.8]}}}}
  - {{model: {s1}, parameters: {{weight: 0.5}}}}
  - {{model: {s2}, parameters: {{weight: [{{filter: mlp, value: 0.1}}, {{value: 0.3}}]}}}}
dtype: float32
""",
    "multislerp_no_base_unnormalized": """
merge_method: multislerp
models:
  - {{model: {s0}, parameters: {{weight: 0.3}}}}
  - {{model: {s1}, parameters: {{weight: 0.6}}}}
parameters: {{normalize_weights: false, eps: 1.0e-6}}
dtype: float32
""",
    "karcher_unlisted_base": """
merge_method: karcher
base_model: {base}
models: [{{model: {s0}}}, {{model: {s1}}}, {{model: {s2}}}]
parameters: {{max_iter: 20, tol: 1.0e-7}}
dtype: float32
""",
    "sce_topk": """
merge_method: sce
base_model: {base}
models: [{{model: {base}}}, {{model: {s0}}}, {{model: {s1}}}, {{model: {s2}}}]
parameters: {{select_topk: [0.3, 0.8], int8_mask: true}}
dtype: float32
""",
    "sce_all": """
merge_method: sce
base_model: {base}
models: [{{model: {s0}}}, {{model: {s1}}}]
dtype: float32
""",
    "nearswap": """
merge_method: nearswap
base_model: {base}
models: [{{model: {s1}}}]
parameters: {{t: [{{filter: mlp, value: 0.03}}, {{value: [0.001, 0.02]}}]}}
dtype: float32
""",
    "arcee_fusion": """
merge_method: arcee_fusion
base_model: {base}
models: [{{model: {base}}}, {{model: {s2}}}]
dtype: float32
""",
    "ram_overlaps": """
merge_method: ram
base_model: {base}
models: [{{model: {s0}}}, {{model: {s1}}}, {{model: {s2}}}]
parameters: {{epsilon: 0.02}}
dtype: float32
""",
    "ramplus_tl": """
merge_method: ramplus_tl
base_model: {base}
models: [{{model: {base}}}, {{model: {s0}}}, {{model: {s1}}}]
parameters: {{r: 0.5, alpha: [0.1, 0.9], epsilon: 0.015}}
dtype: float32
""",
}

# Random methods: one model, weight 1, so out - base is the sparsified task vector of source 0.
RANDOM_CASES = {
    "dare_linear_kept": ("dare_linear", 0.3, "rescale: false"),
    "dare_linear_rescaled": ("dare_linear", 0.3, "rescale: true"),
    "della_linear_kept": ("della_linear", 0.4, "rescale: false"),
    "della_linear_rescaled": ("della_linear", 0.4, "rescale: true"),
}
RANDOM_TEMPLATE = """
merge_method: {method}
base_model: {{base}}
models: [{{{{model: {{s0}}, parameters: {{{{weight: 1.0, density: {density}, epsilon: 0.1}}}}}}}}]
parameters: {{{{{params}}}}}
dtype: float32
"""
DARE_TIES = """
merge_method: dare_ties
base_model: {base}
models:
  - {{model: {s0}, parameters: {{weight: 0.5, density: 0.5}}}}
  - {{model: {s1}, parameters: {{weight: 0.3, density: 0.5}}}}
  - {{model: {s2}, parameters: {{weight: 0.4, density: 0.5}}}}
dtype: float32
"""


def _random_case(method: str, density: float, params: str) -> str:
    text = RANDOM_TEMPLATE.format(method=method, density=density, params=params)
    if "della" not in method:
        text = text.replace(", epsilon: 0.1", "")
    return text


def localize(data: dict, base: Path, sources: list[Path]) -> dict:
    """base_model -> base; every other model -> sources, in order of first appearance."""
    entries = [*data.get("models", []), *[s for sl in data.get("slices", []) for s in sl["sources"]]]
    names = list(dict.fromkeys(e["model"] for e in entries if e["model"] != data.get("base_model")))
    mapping = {name: str(path) for name, path in zip(names, sources[: len(names)], strict=True)}
    if data.get("base_model"):
        mapping[data["base_model"]] = str(base)
        data["base_model"] = str(base)
    for e in entries:
        e["model"] = mapping[e["model"]]
    return data


def _run_mergekit(jobs: list[dict], workdir: Path) -> None:
    (workdir / "jobs.json").write_text(json.dumps(jobs))
    (workdir / "run_mergekit.py").write_text(MERGEKIT_BATCH)
    result = subprocess.run(
        [sys.executable, str(workdir / "run_mergekit.py"), str(workdir / "jobs.json")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """Every config merged by both tools: {case: (mergekit_out, dam_out, family)}."""
    root = tmp_path_factory.mktemp("parity")
    small = make_family(root / "small", 3, num_layers=4, seed=1)
    ranges = [
        s["layer_range"]
        for p in EXAMPLES
        for sl in yaml.safe_load(p.read_text()).get("slices", [])
        for s in sl["sources"]
    ]
    tall_layers = max([4] + [end for _, end in ranges])
    tall = make_family(root / "tall", 3, num_layers=tall_layers, hidden_size=16, seed=2)
    configs: dict[str, tuple[str, tuple]] = {}
    for name, template in CASES.items():
        configs[name] = (template, small)
    for name, (method, density, params) in RANDOM_CASES.items():
        configs[name] = (_random_case(method, density, params), small)
    configs["dare_ties"] = (DARE_TIES, small)
    for path in EXAMPLES:  # on the small family, except sliced ones that need the layers they name
        data = yaml.safe_load(path.read_text())
        data["dtype"] = "float32"
        data.pop("out_dtype", None)
        family = tall if "slices" in data else small
        configs[f"example_{path.stem}"] = (yaml.safe_dump(localize(data, *family), sort_keys=False), family)
    jobs, results = [], {}
    for name, (template, (base, sources)) in configs.items():
        text = template
        if not name.startswith("example_"):
            text = template.format(base=base, s0=sources[0], s1=sources[1], s2=sources[2])
        config = root / f"{name}.yaml"
        config.write_text(text)
        mk_out, dam_out = root / "mergekit" / name, root / "dam" / name
        jobs.append({"config": str(config), "out": str(mk_out), "seed": 0})
        run_merge(config, dam_out, progress=False)
        results[name] = (mk_out, dam_out, (base, sources))
    _run_mergekit(jobs, root)
    return results


def _deterministic_cases() -> list[str]:
    examples = [f"example_{p.stem}" for p in EXAMPLES if p.stem not in RANDOM_METHODS]
    return list(CASES) + examples


@pytest.mark.parametrize("case", _deterministic_cases())
def test_deterministic_methods_match_mergekit(outputs, case):
    mk_out, dam_out, _ = outputs[case]
    ours, theirs = load_file(dam_out / "model.safetensors"), load_file(mk_out / "model.safetensors")
    assert sorted(ours) == sorted(theirs)
    for name, expected in theirs.items():
        assert ours[name].dtype == expected.dtype, name
        diff = (ours[name].float() - expected.float()).abs().max().item()
        assert diff <= 1e-6, f"{case}: {name} differs by {diff}"
    ours_cfg, theirs_cfg = (json.loads((d / "config.json").read_text()) for d in (dam_out, mk_out))
    assert ours_cfg["num_hidden_layers"] == theirs_cfg["num_hidden_layers"]
    assert ours_cfg["vocab_size"] == theirs_cfg["vocab_size"]
    for file in ("tokenizer.json", "generation_config.json"):
        assert (dam_out / file).read_bytes() == (mk_out / file).read_bytes(), file


def _deltas(out: Path, family) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(merged - base, source0 - base) for every floating tensor."""
    base, sources = family
    merged, b, s0 = (load_file(p / "model.safetensors") for p in (out, base, sources[0]))
    names = sorted(merged)
    return [merged[n] - b[n] for n in names], [s0[n] - b[n] for n in names]


@pytest.mark.parametrize("tool", [0, 1], ids=["mergekit", "dam"])
@pytest.mark.parametrize("case,density", [("dare_linear_kept", 0.3), ("della_linear_kept", 0.4)])
def test_random_methods_keep_density_fraction(outputs, case, density, tool):
    out, family = outputs[case][tool], outputs[case][2]
    merged, full = _deltas(out, family)
    kept = sum(int((m != 0).sum()) for m in merged) / sum(d.numel() for d in full)
    assert abs(kept - density) < 0.01
    for m, d in zip(merged, full, strict=True):  # survivors are the task vector's own entries (no rescale)
        torch.testing.assert_close(m[m != 0], d[m != 0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("tool", [0, 1], ids=["mergekit", "dam"])
@pytest.mark.parametrize("case", ["dare_linear_rescaled", "della_linear_rescaled"])
def test_random_methods_l1_rescale_identity(outputs, case, tool):
    out, family = outputs[case][tool], outputs[case][2]
    merged, full = _deltas(out, family)
    for m, d in zip(merged, full, strict=True):
        assert m.abs().sum().item() == pytest.approx(d.abs().sum().item(), rel=1e-4)
        assert (m != 0).float().mean() < 0.7  # it was sparsified, not copied


def test_dare_ties_statistics_match_mergekit(outputs):
    mk_out, dam_out, family = outputs["dare_ties"]
    base = load_file(family[0] / "model.safetensors")
    stats = []
    for out in (mk_out, dam_out):
        merged = load_file(out / "model.safetensors")
        unchanged = sum(int((merged[n] == base[n]).sum()) for n in merged) / sum(t.numel() for t in merged.values())
        mean_abs = sum(float((merged[n] - base[n]).abs().sum()) for n in merged) / sum(
            t.numel() for t in merged.values()
        )
        stats.append((unchanged, mean_abs))
    (mk_unchanged, mk_abs), (dam_unchanged, dam_abs) = stats
    assert abs(mk_unchanged - dam_unchanged) < 0.01
    assert dam_abs == pytest.approx(mk_abs, rel=0.02)


@pytest.mark.parametrize("case", ["dare_ties", "della_linear_rescaled", "example_della"])
def test_random_methods_same_seed_same_output_other_seed_differs(outputs, case, tmp_path):
    mk_out, dam_out, _ = outputs[case]
    config = mk_out.parent.parent / f"{case}.yaml"
    first = load_file(dam_out / "model.safetensors")  # merged with the default seed 0
    run_merge(config, tmp_path / "again", seed=0, progress=False)
    run_merge(config, tmp_path / "other", seed=1, progress=False)
    again, other = (load_file(tmp_path / d / "model.safetensors") for d in ("again", "other"))
    assert all(torch.equal(first[n], again[n]) for n in first)
    assert any(not torch.equal(first[n], other[n]) for n in first)


NEWER_METHODS = ["multislerp", "karcher", "sce", "nearswap", "arcee_fusion", "ram", "ramplus_tl"]


@pytest.mark.parametrize("name", NEWER_METHODS)
def test_newer_methods_declare_mergekit_parameters_and_defaults(name):
    from mergekit.merge_methods import registry as mergekit_registry
    from mergekit.merge_methods.base import BasePolicy, ParameterScope

    from dam.merge.registry import METHODS, REQUIRED

    spec, ours = mergekit_registry.get(name).spec, METHODS[name]
    theirs = {p.name: (REQUIRED if p.required else p.default, p.scope) for p in spec.parameters}
    per_model = {k: d for k, (d, scope) in theirs.items() if scope != ParameterScope.SHARED}
    shared = {k: d for k, (d, scope) in theirs.items() if scope == ParameterScope.SHARED}
    assert ours.model_params == per_model
    assert ours.global_params == shared
    assert ours.requires_base == (spec.contract.base == BasePolicy.REQUIRED)
    exact = spec.contract.max_inputs if spec.contract.max_inputs == spec.contract.min_inputs else None
    assert ours.num_models == exact


def test_multi_document_recipe_matches_mergekit_multimerge(tmp_path):
    """The same three-document recipe through `mergekit-multimerge` and `dam merge --intermediate-dir`."""
    from test_merge_multi import RECIPE

    base, sources = make_family(tmp_path / "family", 3, seed=3)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.format(base=base, s0=sources[0], s1=sources[1], s2=sources[2]))
    mergekit = [sys.executable, "-m", "mergekit.scripts.multimerge", str(recipe), "--intermediate-dir"]
    mergekit += [str(tmp_path / "mk_mid"), "--out-path", str(tmp_path / "mk_out"), "--no-write-model-card"]
    result = subprocess.run(mergekit, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run_merge_file(recipe, tmp_path / "dam_out", intermediate_dir=tmp_path / "dam_mid", progress=False)
    for theirs_dir, ours_dir in [
        ("mk_mid/pair", "dam_mid/pair"),
        ("mk_mid/soup", "dam_mid/soup"),
        ("mk_out", "dam_out"),
    ]:
        theirs = load_file(tmp_path / theirs_dir / "model.safetensors")
        ours = load_file(tmp_path / ours_dir / "model.safetensors")
        assert sorted(ours) == sorted(theirs)
        for name, expected in theirs.items():
            diff = (ours[name] - expected).abs().max().item()
            assert diff <= 1e-6, f"{ours_dir}: {name} differs by {diff}"  # float32 parity, as for single merges
