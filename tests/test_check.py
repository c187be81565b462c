"""`dam check`: a family that passes, one that warns (a source whose task vector is another's negative), ones that
are refused (a forward-config difference, a NaN); the JSON form, the exit codes, and `dam merge` / `dam train`
refusing the incompatible family before any heavy work."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file, save_file
from tiny_run import tiny_config

from dam.cli import main
from dam.evaluation.check import GROUPS, check_config, conflict_chance, layer_group
from dam.testing import make_family
from dam.training.config import config_to_dict

TIES = """merge_method: ties
base_model: {base}
models:
  - {{model: {a}, parameters: {{weight: 0.5, density: 0.5}}}}
  - {{model: {b}, parameters: {{weight: 0.5, density: 0.5}}}}
"""


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """base, source0, source1 of one tiny Llama; ``negated``: base - (source0 - base); ``heads``: source1 under a
    config.json with other head counts (every shape unchanged); ``nan``: source1 with one NaN."""
    root = tmp_path_factory.mktemp("check")
    base, (s0, s1) = make_family(root, 2, num_layers=2)
    paths = {"base": base, "source0": s0, "source1": s1}
    b, a = load_file(base / "model.safetensors"), load_file(s0 / "model.safetensors")
    paths["negated"] = Path(shutil.copytree(s1, root / "negated"))
    save_file({k: 2 * b[k] - a[k] for k in b}, paths["negated"] / "model.safetensors", metadata={"format": "pt"})
    paths["heads"] = Path(shutil.copytree(s1, root / "heads"))
    config = json.loads((paths["heads"] / "config.json").read_text())
    config.update(num_attention_heads=8, num_key_value_heads=4)  # q/k/v/o keep their shapes: only config differs
    (paths["heads"] / "config.json").write_text(json.dumps(config))
    paths["nan"] = Path(shutil.copytree(s1, root / "nan"))
    tensors = load_file(paths["nan"] / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][2, 3] = float("nan")
    save_file(tensors, paths["nan"] / "model.safetensors", metadata={"format": "pt"})
    return paths


def _merge_yaml(tmp_path: Path, family: dict[str, Path], other: str) -> Path:
    path = tmp_path / f"{other}.yaml"
    path.write_text(TIES.format(base=family["base"], a=family["source0"], b=family[other]))
    return path


def _run(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_conflict_chance_and_groups() -> None:
    assert conflict_chance(1) == 0.0 and conflict_chance(2) == 0.5 and conflict_chance(3) == 0.75
    names = {
        "model.embed_tokens.weight": "embeddings",
        "lm_head.weight": "embeddings",
        "model.layers.0.self_attn.q_proj.weight": "attention",
        "model.layers.0.post_attention_layernorm.weight": "norms",
        "model.layers.1.mlp.down_proj.weight": "mlp",
        "model.norm.weight": "norms",
        "model.rotary.inv_freq": "other",
    }
    assert {n: layer_group(n) for n in names} == names and set(names.values()) <= set(GROUPS)


def test_a_compatible_family_is_ok_with_json(family, tmp_path, capsys) -> None:
    code, out, _ = _run(capsys, "check", _merge_yaml(tmp_path, family, "source1"), "--json")
    report = json.loads(out)
    assert code == 0 and report["verdict"] == "ok" and report["reasons"] == []
    assert (report["kind"], report["command"]) == ("merge", "merge")
    (target,) = report["targets"]
    assert set(target) == {"name", "skipped", "models", "task_vectors", "estimate"}
    assert [m["role"] for m in target["models"]] == ["base", "source", "source"]
    model = target["models"][1]
    assert model["vocab_size"] == model["embedding_rows"] == 128 and model["tie_word_embeddings"] is False
    assert model["dtypes"] == ["float32"] and model["nonfinite"] == [] and model["disk_bytes"] > 0
    assert model["tokenizer_vocab"] <= 128
    tv = target["task_vectors"]
    assert abs(tv["kinship"][0]["cosine"]) < 0.2 and set(tv["kinship"][0]["by_group"]) == {
        "embeddings",
        "attention",
        "mlp",
        "norms",
    }
    conflicts = tv["sign_conflicts"]
    assert conflicts["chance"] == 0.5 and 0.4 < conflicts["overall"] < 0.6 and set(conflicts["by_layer"]) == {"0", "1"}
    estimate = target["estimate"]
    assert estimate["command"] == "merge" and estimate["disk_bytes"] == 4 * target["models"][0]["parameters"]
    assert estimate["peak_memory_bytes"] > 3 * 10**8


def test_negated_task_vectors_warn(family, tmp_path, capsys) -> None:
    report = check_config(_merge_yaml(tmp_path, family, "negated"))
    assert report.verdict == "warn"
    assert [r.check for r in report.reasons] == ["sign_conflicts", "kinship"]
    tv = report.targets[0].task_vectors
    assert tv is not None and tv.sign_conflicts["overall"] == 1.0 and tv.kinship[0]["cosine"] < -0.99
    code, out, _ = _run(capsys, "check", _merge_yaml(tmp_path, family, "negated"))
    assert code == 0 and "verdict: warn" in out and "near-opposite" in out and "sign conflicts: 100%" in out


def test_a_forward_config_difference_is_refused_with_exit_2(family, tmp_path, capsys) -> None:
    code, out, err = _run(capsys, "check", _merge_yaml(tmp_path, family, "heads"))
    assert code == 2 and err == "" and "verdict: refuse" in out
    assert "refuse: model '" in out and "heads' has num_attention_heads 8 but model '" in out
    assert "[compatibility]" in out


def test_a_nan_tensor_is_refused(family, tmp_path) -> None:
    report = check_config(_merge_yaml(tmp_path, family, "nan"))
    assert report.verdict == "refuse" and [r.check for r in report.reasons] == ["nonfinite"]
    assert "tensor 'model.layers.1.mlp.up_proj.weight' contains NaN or Inf" in report.reasons[0].message
    assert report.targets[0].models[2].nonfinite == ["model.layers.1.mlp.up_proj.weight"]


def test_dam_merge_refuses_the_config_difference_before_writing(family, tmp_path, capsys) -> None:
    out = tmp_path / "merged"
    code, _, err = _run(capsys, "merge", _merge_yaml(tmp_path, family, "heads"), out)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 1 and len(errors) == 1 and "has num_attention_heads 8 but model" in errors[0], err
    assert not out.exists()


def _dam_yaml(tmp_path: Path, family: dict[str, Path], second: str) -> tuple[Path, Path]:
    run = tmp_path / "run"
    config = tiny_config(family["base"], [family["source0"], family[second], family["source1"]], run)
    path = tmp_path / "dam.yaml"
    path.write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
    return path, run


def test_a_dam_config_is_checked_for_training_and_as_a_merge(family, tmp_path) -> None:
    path, _ = _dam_yaml(tmp_path, family, "negated")
    report = check_config(path)
    assert (report.kind, report.command) == ("train", "train") and report.verdict == "warn"
    estimate = report.targets[0].estimate
    params = report.targets[0].models[0].parameters
    assert estimate is not None and estimate.command == "train" and estimate.disk_bytes == 4 * params  # dtype float32
    tv = report.targets[0].task_vectors
    assert tv is not None and len(tv.sources) == 3 and tv.sign_conflicts["chance"] == 0.75
    as_merge = check_config(path, "merge")
    assert as_merge.command == "merge" and as_merge.targets[0].estimate.command == "merge"


def test_dam_train_refuses_the_config_difference_before_the_run_folder(family, tmp_path, capsys) -> None:
    path, run = _dam_yaml(tmp_path, family, "heads")
    assert check_config(path).verdict == "refuse"
    code, _, err = _run(capsys, "train", path)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 1 and len(errors) == 1 and "Traceback" not in err, err
    assert "has num_attention_heads 8 but base" in errors[0] and not run.exists()


def test_a_recipe_skips_documents_whose_inputs_are_not_built(family, tmp_path) -> None:
    recipe = tmp_path / "recipe.yaml"
    first = TIES.format(base=family["base"], a=family["source0"], b=family["source1"])
    recipe.write_text(
        f"name: first\n{first}---\nmerge_method: linear\nparameters: {{weight: 0.5}}\n"
        f"models:\n  - {{model: first}}\n  - {{model: {family['base']}}}\n"
    )
    report = check_config(recipe, intermediate_dir=tmp_path / "parts")
    assert [t.name for t in report.targets] == ["first", None] and report.verdict == "ok"
    assert report.targets[0].skipped is None and "not built yet" in (report.targets[1].skipped or "")
