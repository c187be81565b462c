"""A new user's first hour (issue 21): the small wounds, each mended and kept so.

``dam demo run train.max_steps=10`` trains; ``dam eval --split valid`` names the split; a mistyped local model folder
is not sent to the Hub; ``dam train`` with a missing dataset leaves no run folder; plain-template data warns; the
demo config is in ``configs/dam/``; the dev extra opens the notebook; ``accelerate launch --quiet`` ends in one line.
"""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path

import pytest
from tiny_run import TINY, tiny_overrides

from dam.cli import main
from dam.demo.paths import CONFIG_DIR
from dam.demo.run import dam_config
from dam.errors import DamError

ROOT = Path(__file__).resolve().parent.parent


def test_short_demo_runs_get_a_short_warmup(tmp_path: Path) -> None:
    assert dam_config(tmp_path, tmp_path / "out").train.warmup_steps == 20  # the config's
    short = dam_config(tmp_path, tmp_path / "out", overrides=["train.max_steps=10"])
    assert (short.train.max_steps, short.train.warmup_steps) == (10, 1)
    assert dam_config(tmp_path, tmp_path / "out", overrides=["--train.max_steps=5"]).train.warmup_steps == 0
    kept = dam_config(tmp_path, tmp_path / "out", overrides=["train.max_steps=10", "train.warmup_steps=3"])
    assert kept.train.warmup_steps == 3  # the user's own warm-up is theirs
    assert dam_config(tmp_path, tmp_path / "out", overrides=["train.max_steps=300"]).train.warmup_steps == 20


def test_eval_names_an_unknown_split(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["eval", "m", "--tasks", "sort", "--split", "valid"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--split: invalid choice: 'valid'" in err and "'validation'" in err


def test_a_mistyped_local_folder_is_not_looked_up_on_the_hub(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "runs" / "merged").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)

    def no_hub(*args: object, **kwargs: object) -> None:
        raise AssertionError("a local path went to the Hub")

    monkeypatch.setattr("huggingface_hub.snapshot_download", no_hub)
    assert main(["eval", "runs/mergd", "--tasks", "sort", "--data-dir", str(ROOT / "data" / "demo")]) == 1
    err = capsys.readouterr().err.strip()
    assert err == "error: model 'runs/mergd': folder not found (did you mean runs/merged?)"


def test_train_with_a_missing_dataset_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    missing = tmp_path / "data" / "missing.jsonl"
    overrides = tiny_overrides(tmp_path / "base", [tmp_path / f"s{i}" for i in range(3)], run)
    assert main(["train", str(TINY), *overrides, f"models.1.dataset={missing}"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"error: dataset {str(missing)!r} (for model 'reverse'): not found"
    assert not run.exists()


def test_plain_template_data_warns_unless_the_template_is_set(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from dam.testing import make_family
    from dam.training.config import load_config
    from dam.training.data import load_tokenizer, source_renderings

    base, sources = make_family(tmp_path / "family", 3)  # char tokenizers without a chat template
    config = load_config(TINY, tiny_overrides(base, sources, None))
    with caplog.at_level(logging.WARNING, logger="dam.training.data"):
        source_renderings(load_tokenizer(base), config.models, config.data)
    assert "rendered with the default data.template '{prompt}\\n{response}'" in caplog.text
    assert "configs/dam/demo.yaml" in caplog.text
    caplog.clear()
    config = load_config(TINY, [*tiny_overrides(base, sources, None), "data.template={prompt}{response}"])
    with caplog.at_level(logging.WARNING, logger="dam.training.data"):
        source_renderings(load_tokenizer(base), config.models, config.data)
    assert caplog.text == ""


def test_the_demo_config_is_in_configs() -> None:
    demo = ROOT / "configs" / "dam" / "demo.yaml"
    assert demo.resolve() == (CONFIG_DIR / "dam.yaml").resolve()  # one file, not a copy that drifts
    assert 'template: "{prompt}{response}"' in demo.read_text()


def test_the_dev_extra_opens_the_notebook() -> None:
    tomllib = pytest.importorskip("tomllib")
    dev = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["dev"]
    names = {d.split(">")[0].split("=")[0].split("[")[0].strip() for d in dev}
    assert {"notebook", "ipykernel", "nbformat"} <= names  # a front end (jupyter notebook), its kernel


@pytest.mark.slow
def test_accelerate_launch_quiet_ends_in_dams_one_line(tmp_path: Path) -> None:
    """Without --quiet accelerate re-raises the child's exit as its own 20-line traceback; with it, dam's line is
    the last word (the way train_dam.py and the configs' headers say to launch)."""
    result = subprocess.run(
        ["accelerate", "launch", "--quiet", "--cpu", "--num_processes", "1", "train_dam.py", str(tmp_path / "x.yaml")],
        cwd=ROOT,
        env={**os.environ, "WANDB_MODE": "disabled"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1] == f"error: config file {tmp_path / 'x.yaml'} not found" and "Traceback" not in result.stderr


def test_search_configs_name_the_valid_keys(tmp_path: Path) -> None:
    from dam.search.config import EvolveConfig, SoupConfig, load_search_config

    soup = tmp_path / "soup.yaml"
    soup.write_text("models: [a, b]\nfitness: {tasks: [sort], data_dir: d, limt: 3}\nwandb: {projct: x}\nsead: 1\n")
    with pytest.raises(DamError) as error:
        load_search_config(soup, SoupConfig)
    message = str(error.value)
    assert "fitness.limt: unknown key; valid: " in message and "limit" in message
    assert "wandb.projct: unknown key; valid: " in message and "sead: unknown key; valid: " in message
    evolve = tmp_path / "evolve.yaml"
    evolve.write_text("base_model: b\nmodels: [a, b]\nfitness: {tasks: [sort]}\nbudgt: {evaluations: 2}\n")
    with pytest.raises(DamError, match=r"budgt: unknown key; valid: .*budget"):
        load_search_config(evolve, EvolveConfig)
