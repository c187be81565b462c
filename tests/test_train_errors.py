"""`dam train` on bad input: one `error:` line naming the culprit, exit status 1, no traceback, nothing at merged/."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file
from tiny_run import TINY, tiny_overrides

from dam.cli import main
from dam.testing import make_family


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    return make_family(tmp_path_factory.mktemp("family"), 3)


def _copy(source: Path, folder: Path) -> Path:
    return Path(shutil.copytree(source, folder))


def _nan_source(source: Path, folder: Path) -> Path:
    copy = _copy(source, folder)
    tensors = load_file(copy / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][3, 4] = float("inf")
    save_file(tensors, copy / "model.safetensors", metadata={"format": "pt"})
    return copy


def _rope_source(source: Path, folder: Path) -> Path:
    copy = _copy(source, folder)
    config = json.loads((copy / "config.json").read_text())
    if "rope_parameters" in config:  # transformers 5
        config["rope_parameters"] = {**config["rope_parameters"], "rope_theta": 1e6}
    else:
        config["rope_theta"] = 1e6
    (copy / "config.json").write_text(json.dumps(config))
    return copy


def _case(name: str, base: Path, sources: list[Path], tmp: Path) -> tuple[Path, list[Path], Path, list[str]]:
    """(base, sources, output_dir, extra overrides) of one bad run."""
    out = tmp / "run"
    if name == "output_dir is a file":
        out.write_text("not a folder\n")
    elif name == "NaN/Inf weights":
        sources = [sources[0], _nan_source(sources[1], tmp / "nan"), sources[2]]
    elif name == "config differs in a forward field":
        sources = [sources[0], sources[1], _rope_source(sources[2], tmp / "rope")]
    elif name == "source listed twice":
        sources = [sources[0], sources[1], sources[0].parent / ".." / sources[0].parent.name / "source0"]
    elif name == "base folder missing":
        base = tmp / "no_such_base"
    elif name == "base config unreadable":
        base = _copy(base, tmp / "broken_base")
        (base / "config.json").write_text("{not json")
    elif name == "empty dataset file":
        (tmp / "empty.jsonl").write_text("")
        return base, sources, out, [f"models.1.dataset={tmp / 'empty.jsonl'}"]
    elif name == "max_length too short for any response token":
        return base, sources, out, ["data.max_length=3", "data.response_only_loss=true"]
    return base, sources, out, []


CASES = {
    "output_dir is a file": r"output_dir '.*run' is a file, not a folder",
    "NaN/Inf weights": r"source '.*nan': tensor 'model.layers.1.mlp.up_proj.weight' contains NaN or Inf",
    "config differs in a forward field": r"source '.*rope' has rope_(parameters .*|theta )1000000.0.* but base",
    "source listed twice": r"models 'arithmetic' and 'counting' are the same model \('.*/\.\./.*source0'\)",
    "base folder missing": r"model '.*no_such_base': folder not found",
    "base config unreadable": r"base '.*broken_base': cannot read config.json",
    "empty dataset file": r"dataset '.*empty.jsonl' \(for model 'reverse'\): the file is empty",
    "max_length too short for any response token": (
        r"dataset for model 'arithmetic': no example has a token to learn from \(is data.max_length=3 shorter"
    ),
}


@pytest.mark.parametrize("name", CASES)
def test_bad_training_input_is_one_error_line(
    family: tuple[Path, list[Path]], tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    base, sources, out, extra = _case(name, *family, tmp_path)
    code = main(["train", str(TINY), *tiny_overrides(base, sources, out, *extra)])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 1 and len(errors) == 1 and "Traceback" not in err, err[-2000:]
    assert re.search(CASES[name], errors[0]), errors[0]
    assert not (out / "merged").exists()
