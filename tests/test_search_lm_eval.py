"""dam soup with an lm-evaluation-harness fitness over a task defined here (offline): candidates written to a
temporary folder score what lm-eval gives the same merge written by dam merge."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

pytest.importorskip("lm_eval")

from test_lm_eval import write_tasks  # noqa: E402  (the locally defined multiple-choice task)

from dam.cli import main  # noqa: E402
from dam.evaluation.lm_eval import evaluate_lm_eval  # noqa: E402
from dam.io.paths import portable_reference  # noqa: E402
from dam.testing import make_family  # noqa: E402


@pytest.mark.slow  # lm-eval runs 6 + 2 times (seconds each)
def test_soup_with_an_lm_eval_fitness(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, sources = make_family(tmp_path / "family", 2, num_layers=2, scale=0.5)
    tasks = write_tasks(tmp_path, "soupeval")
    fitness = {"lm_eval": {"tasks": ["soupeval_mc"], "include_path": str(tasks), "metric": "acc", "batch_size": 2}}
    config = tmp_path / "soup.yaml"
    config.write_text(yaml.safe_dump({"models": [str(s) for s in sources], "fitness": fitness}))
    out = tmp_path / "soup"
    assert main(["soup", str(config), str(out)]) == 0, capsys.readouterr().err
    summary = json.loads((out / "soup.json").read_text())
    for source in sources:
        expected = evaluate_lm_eval(source, ["soupeval_mc"], include_path=tasks, batch_size=2)["soupeval_mc"]["acc"]
        assert summary["candidates"][portable_reference(source, out)]["score"] == expected
    uniform = evaluate_lm_eval(out / "uniform", ["soupeval_mc"], include_path=tasks, batch_size=2)
    assert summary["uniform"]["score"] == uniform["soupeval_mc"]["acc"]
    assert summary["uniform"]["metrics"]["soupeval_mc/acc"] == uniform["soupeval_mc"]["acc"]


@pytest.mark.slow  # an unknown name is looked up in lm-eval's full index of tasks (10-30 s to build)
def test_an_unknown_lm_eval_task_fails_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fitness = {"lm_eval": {"tasks": ["nope_task"], "include_path": str(tmp_path)}}
    config = tmp_path / "soup.yaml"
    config.write_text(yaml.safe_dump({"models": ["a", "b"], "fitness": fitness}))
    assert main(["soup", str(config), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: fitness.lm_eval: lm-eval task 'nope_task' is unknown") and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()
