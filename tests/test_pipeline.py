"""dam demo run end to end on a tiny demo family (``quick``): table, results.json, plots, reuse and refusal."""

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from dam.cli import main
from dam.demo.paths import CONFIG_DIR, rebase
from dam.demo.run import (
    CLASSIC_METHODS,
    FAMILY_FILE,
    LEARNED_BASELINES,
    MERGE_CONFIG_DIR,
    dam_config,
    merge_config_text,
    run_demo,
)
from dam.errors import DamError
from dam.merge.config import parse_merge_config


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, monkeypatch_module):
    root = tmp_path_factory.mktemp("demo")
    out = root / "run"
    monkeypatch_module.setenv("WANDB_MODE", "disabled")
    return root, out, run_demo(root, out, quick=True, full=True)


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_rebase_moves_only_the_demo_folder(tmp_path):
    assert rebase("./data/demo/models/base", tmp_path) == str(tmp_path / "models" / "base")
    assert rebase("data/demo/sort/train.jsonl", "x") == "x/sort/train.jsonl"
    assert rebase("data/other/m", tmp_path) == "data/other/m"


def test_configs_point_at_the_root(tmp_path):
    config = dam_config(tmp_path, tmp_path / "out", seed=3, overrides=["train.lr=0.5"])
    assert config.base_model == str(tmp_path / "models" / "base")
    assert all(m.model.startswith(str(tmp_path)) and m.dataset.startswith(str(tmp_path)) for m in config.models)
    assert (config.train.seed, config.data.seed, config.train.lr) == (3, 3, 0.5)
    for method in CLASSIC_METHODS:
        text = merge_config_text(method, tmp_path, 0)
        merge = parse_merge_config(yaml.safe_load(text), text, origin=str(MERGE_CONFIG_DIR / f"{method}.yaml"))
        assert merge.merge_method == method
        assert all(m.startswith(str(tmp_path)) for m in merge.referenced_models())


# the module fixture builds a tiny family and trains DAM: ~9 s on 2 idle cores (50 s when they are shared)
def test_run_writes_table_results_and_plots(demo_run):
    root, out, summary = demo_run
    # the default granularity is the dam row; the other one is a learned baseline beside RegMean and AdaMerging
    others = [m for m in LEARNED_BASELINES if m != f"dam_{summary['dam_options']['granularity']}"]
    models = ["base", "reverse", "sort", "shift", *CLASSIC_METHODS, "regmean", *others, "dam"]
    tasks = ["generic", "reverse", "sort", "shift"]
    assert summary["dam_status"] == "trained"
    # the toy family trains DAM in a child while this process merges and evaluates the models that need no DAM
    assert summary["beside_dam"] and list(summary["seconds"])[:4] == ["family", "dam", "merges", "eval"]
    lines = summary["table"].splitlines()
    assert lines[0].split()[-6:-4] == ["skills", "mean"] and [line.split()[0] for line in lines[1:]] == models
    saved = json.loads((out / "results.json").read_text())
    assert list(saved["accuracy"]) == models and saved["tasks"] == tasks
    assert all(set(saved["accuracy"][m]) == set(tasks) for m in models)
    assert list(saved["validation_accuracy"]) == models
    assert all(r["tasks"][t]["n"] == 20 for r in saved["models"] + saved["validation_models"] for t in tasks)
    assert set(saved["goals"]["retention"]) == {"reverse", "sort", "shift"}
    assert set(saved["goals"]["worst_retention"]) == {"regmean", *others, "dam"}
    for m in [*CLASSIC_METHODS, "regmean", *others, "dam"]:  # every merge measured in its own child process
        assert saved["costs"][m]["seconds"] > 0 and saved["costs"][m]["peak_rss_mib"] > 50, m
    assert lines[0].split()[-4:] == ["time", "s", "peak", "MiB"]
    ada = (out / "learned" / "adamerging" / "config.yaml").read_text()
    assert "granularity: tensor" in ada and "objective: entropy" in ada and "transform: task_vector" in ada
    assert (out / "merges" / "regmean" / "regmean.json").is_file()
    for png in ("results.png", "coefficients.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert all((out / "merges" / m / "mergekit_config.yml").is_file() for m in CLASSIC_METHODS)


def test_rerun_reuses_and_other_config_is_refused(demo_run, capsys):
    root, out, _ = demo_run
    assert main(["demo", "run", "--root", str(root), "--out", str(out), "--quick", "--full"]) == 0
    assert "DAM run reused" in capsys.readouterr().out
    before = (out / "dam_coefficients.safetensors").read_bytes()
    with pytest.raises(DamError, match="another config"):
        run_demo(root, out, quick=True, dam_overrides=["train.lr=0.5"])
    with pytest.raises(DamError, match="another config"):
        run_demo(root, out, quick=True, seed=1)
    assert (out / "dam_coefficients.safetensors").read_bytes() == before
    # a run trained on another build of the family is not reused as if it were this build's (the paths match)
    report = root / "models" / "build_report.json"
    saved_report = report.read_bytes()
    try:
        report.write_bytes(saved_report + b"\n")  # a rebuild writes another report
        with pytest.raises(DamError, match="another build of the family"):
            run_demo(root, out, quick=True, full=True)
    finally:
        report.write_bytes(saved_report)
    recorded = (out / FAMILY_FILE).read_bytes()
    try:
        (out / FAMILY_FILE).unlink()  # a run from before the record, or one `dam train` wrote
        with pytest.raises(DamError, match="does not record"):
            run_demo(root, out, quick=True, full=True)
    finally:
        (out / FAMILY_FILE).write_bytes(recorded)
    assert (out / "dam_coefficients.safetensors").read_bytes() == before
    (root / "other").mkdir()
    (root / "other" / "notes.txt").write_text("keep me")
    with pytest.raises(DamError, match="not a DAM run"):
        run_demo(root, root / "other", quick=True)
    assert (root / "other" / "notes.txt").read_text() == "keep me"


# a subprocess from a folder outside the repository: ~15 s on 2 idle cores (it builds a tiny family)
@pytest.mark.slow
def test_demo_runs_from_any_working_directory(tmp_path):
    """`dam demo run` reads its configs from the installed package, not from a checkout in the working directory."""
    env = {**os.environ, "WANDB_MODE": "disabled"}
    result = subprocess.run(
        [sys.executable, "-m", "dam.cli", "demo", "run", "--quick"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resource_tracker" not in result.stderr and "leaked" not in result.stderr, result.stderr[-2000:]
    assert "demo: training DAM into runs/demo" in result.stderr  # a line per phase in a log
    assert "Loading weights" not in result.stderr and "it/s]" not in result.stderr  # and no library's bars
    assert not (tmp_path / "dam").exists() and not (tmp_path / "configs").exists()
    saved = json.loads((tmp_path / "runs" / "demo" / "results.json").read_text())
    assert saved["dam_status"] == "trained" and "dam" in saved["accuracy"]


@pytest.mark.slow
def test_wheel_ships_the_demo_configs(tmp_path):
    """A user who installs the package (not the repository) gets the demo's configs as package data."""
    root = Path(__file__).resolve().parent.parent
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(root),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("dam-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {f"dam/demo/configs/{p.relative_to(CONFIG_DIR).as_posix()}" for p in CONFIG_DIR.rglob("*.yaml")}
    assert "dam/demo/configs/dam.yaml" in shipped
    assert shipped <= names, sorted(shipped - names)
