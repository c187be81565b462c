"""`dam merge` end to end: success, --dry-run, and every bad input giving one error line, exit 1 and no OUT."""

import re
import shutil
import subprocess
import sys

import pytest
from safetensors.torch import load_file, save_file

import dam.merge.engine as engine
from dam.cli import main
from dam.testing import make_family


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny Llamas (vocab 128, hidden 32, 2 layers) plus broken or mismatched variants of one source."""
    root = tmp_path_factory.mktemp("cli")
    base, sources = make_family(root / "llama", 3)
    paths = {"base": base, "s0": sources[0], "s1": sources[1], "s2": sources[2]}
    paths["qwen"] = make_family(root / "qwen", 0, arch="qwen2")[0]
    paths["vocab130"] = make_family(root / "vocab", 0, vocab_size=130)[0]
    paths["hidden48"] = make_family(root / "hidden", 0, hidden_size=48, num_heads=4, num_kv_heads=2)[0]

    def variant(name, edit):
        folder = root / name
        shutil.copytree(sources[1], folder)
        tensors = load_file(folder / "model.safetensors")
        edit(tensors)
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        paths[name] = folder

    variant("missing", lambda t: t.pop("model.layers.1.mlp.down_proj.weight"))
    variant("nan", lambda t: t["model.layers.0.self_attn.o_proj.weight"].view(-1).__setitem__(5, float("nan")))
    paths["truncated"] = shutil.copytree(sources[1], root / "truncated")
    data = (paths["truncated"] / "model.safetensors").read_bytes()
    (paths["truncated"] / "model.safetensors").write_bytes(data[: len(data) // 2])
    paths["corrupt"] = shutil.copytree(sources[1], root / "corrupt")
    (paths["corrupt"] / "model.safetensors").write_bytes(b"\x00\x01garbage" * 100)
    return paths


def _write(tmp_path, text, models):
    config = tmp_path / "merge.yaml"
    config.write_text(text.format(**{k: str(v) for k, v in models.items()}))
    return config


def _run(capsys, *argv):
    code = main(["merge", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


TIES = """
merge_method: ties
base_model: {base}
models:
  - {{model: {s0}, parameters: {{weight: 0.5, density: 0.5}}}}
  - {{model: {OTHER}, parameters: {{weight: 0.5, density: 0.5}}}}
"""


def test_merge_prints_a_summary_and_writes_the_model(models, tmp_path, capsys):
    config = _write(tmp_path, TIES.replace("OTHER", "s1"), models)
    code, out, _ = _run(capsys, config, tmp_path / "dry", "--dry-run")
    assert code == 0 and "method:      ties" in out and "nothing was written" in out
    assert not (tmp_path / "dry").exists()
    code, out, _ = _run(capsys, config, tmp_path / "out", "--shard-size", "20kB", "--seed", "3", "--quiet")
    assert code == 0 and "model.safetensors.index.json" in out
    assert len(list((tmp_path / "out").glob("model-0000*-of-*.safetensors"))) > 1
    code, _, err = _run(capsys, config, tmp_path / "out")  # exists, not empty: refused without --force
    assert code == 1 and "is not empty; pass --force" in err.strip().splitlines()[-1]
    assert _run(capsys, config, tmp_path / "out", "--force")[0] == 0
    assert (tmp_path / "out" / "model.safetensors").exists() and not list((tmp_path / "out").glob("model-0*"))


UNKNOWN_PARAM = TIES.replace("OTHER", "s1").replace("density: 0.5}}}}\n", "density: 0.5, dense: 1}}}}\n", 1)
SLERP3 = "merge_method: slerp\nbase_model: {base}\nmodels: [{{model: {s0}}}, {{model: {s1}}}]\nparameters: {{t: 0.5}}"
BAD_INPUTS = {
    "missing model folder": (TIES.replace("{OTHER}", "{base}/../nowhere"), "nowhere': folder not found"),
    "different architectures": (
        TIES.replace("OTHER", "qwen"),
        r"model '.*qwen/base' has architectures \['Qwen2ForCausalLM'\] but model '.*llama/base'",
    ),
    "different shapes": (TIES.replace("OTHER", "hidden48"), r"'model.embed_tokens.weight' has shape \[128, 48\]"),
    "vocab-size mismatch": (TIES.replace("OTHER", "vocab130"), "vocab size mismatch: model '.*' has vocab_size 130"),
    "tensor missing in one model": (
        TIES.replace("OTHER", "missing"),
        "tensor 'model.layers.1.mlp.down_proj.weight' is missing in model '.*missing'",
    ),
    "unknown method": (
        "merge_method: magic\nmodels: [{{model: {s0}}}]",
        "merge_method 'magic' is unknown; valid methods: linear, slerp, nuslerp, task_arithmetic, ties, dare_linear",
    ),
    "unknown parameter": (
        UNKNOWN_PARAM,
        "dense: unknown parameter for ties; valid: density, int8_mask, lambda, normalize, rescale, weight",
    ),
    "density above 1": (
        TIES.replace("OTHER", "s1").replace("density: 0.5", "density: 1.5", 1),
        r"model '.*source0': density=1.5 is outside \(0, 1\]",
    ),
    "density zero": (
        TIES.replace("OTHER", "s1").replace("density: 0.5", "density: [0.5, 0]", 1),
        r"tensor 'model.layers.1.*density=0.0 is outside \(0, 1\]",
    ),
    "slerp with three models": (SLERP3, "slerp merges exactly 2 model.*got 3"),
    "NaN in an input": (
        TIES.replace("OTHER", "nan"),
        "model '.*nan': tensor 'model.layers.0.self_attn.o_proj.weight' contains NaN or Inf",
    ),
    "truncated safetensors": (
        TIES.replace("OTHER", "truncated"),
        "truncated/model.safetensors: truncated safetensors",
    ),
    "corrupt safetensors": (TIES.replace("OTHER", "corrupt"), "corrupt/model.safetensors: not a valid safetensors"),
    "unknown config key": (TIES.replace("OTHER", "s1") + "modules: {{}}\n", r"modules: unknown key \(valid: merge_"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_exit_1_and_nothing_written(models, tmp_path, capsys, case):
    text, match = BAD_INPUTS[case]
    config = _write(tmp_path, text, models)
    out = tmp_path / "out"
    code, _, err = _run(capsys, config, out)
    lines = err.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert code == 1 and len(errors) == 1 and lines[-1] == errors[0], err
    assert re.search(match, errors[0]), errors[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merge.yaml"]  # no OUT, no temporary folder


def test_failure_leaves_an_existing_out_unchanged(models, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("previous merge")
    config = _write(tmp_path, TIES.replace("OTHER", "nan"), models)
    code, _, err = _run(capsys, config, out, "--force")
    assert code == 1 and "contains NaN or Inf" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "previous merge"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merge.yaml", "out"]


def test_ctrl_c_mid_merge_exits_130_and_leaves_nothing(models, tmp_path, capsys, monkeypatch):
    calls = []
    merge_task = engine._merge_task

    def interrupt_after_five(*args, **kwargs):
        calls.append(1)
        if len(calls) > 5:
            raise KeyboardInterrupt
        return merge_task(*args, **kwargs)

    monkeypatch.setattr(engine, "_merge_task", interrupt_after_five)
    config = _write(tmp_path, TIES.replace("OTHER", "s1"), models)
    code, _, err = _run(capsys, config, tmp_path / "out")
    assert code == 130 and 6 <= len(calls) <= 7 and "interrupted" in err  # the other worker may have begun one more
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merge.yaml"]


def test_merge_path_does_not_import_transformers(models, tmp_path):
    """`dam merge` stays lean: no transformers/accelerate import (they cost seconds of start-up)."""
    config = _write(tmp_path, TIES.replace("OTHER", "s1"), models)
    code = (
        "import sys; from dam.cli import main; "
        f"assert main(['merge', {str(config)!r}, {str(tmp_path / 'out')!r}, '--quiet']) == 0; "
        "heavy = [m for m in ('transformers', 'accelerate', 'datasets', 'wandb') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "model.safetensors").exists()
