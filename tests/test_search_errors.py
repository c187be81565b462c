"""The searches' bad-input catalogue: ``dam soup`` and ``dam evolve`` (cmaes, kinship_greedy) given a bad config, a
missing model or a fitness that fails end with exit status 1, exactly one ``error:`` line on stderr, no traceback,
and nothing left at OUT (absent, or the empty folder or missing parents it was before).

Every case runs the real command line (:func:`dam.cli.main`, its logging set up as on a terminal) with stderr
captured at the file-descriptor level, so that a traceback logged by optuna or anything else is seen. To keep the
catalogue fast, the cases share one Python process (one import of torch and transformers for all): a driver runs
them in turn, each in its own stderr file and under a 300-second alarm (the old code looped forever on a failing
fitness; such a case reports "timeout").
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from dam.testing import make_family

CASE_SECONDS = 300  # one case's limit in the driver (each takes about a second on an idle machine)

# runs each case with fd 2 redirected to the case's file; logging and optuna's handler write to sys.stderr, whose
# descriptor is 2, so everything a case prints lands in its file
DRIVER = """
import json, os, signal, sys, traceback
from dam.cli import main

class Timeout(BaseException):
    pass

def alarm(signum, frame):
    raise Timeout()

signal.signal(signal.SIGALRM, alarm)
cases = json.loads(open(sys.argv[1]).read())
terminal = os.dup(2)
results = {}
for case in cases:
    os.chdir(case["cwd"])
    sys.stderr.flush()
    fd = os.open(case["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 2)
    os.close(fd)
    signal.alarm(case["seconds"])
    try:
        rc = main(case["argv"])
    except Timeout:
        rc = "timeout"
    except SystemExit as e:
        rc = e.code
    except BaseException:
        traceback.print_exc()
        rc = "exception"
    finally:
        signal.alarm(0)
        sys.stderr.flush()
        os.dup2(terminal, 2)
    results[case["id"]] = rc
open(sys.argv[2], "w").write(json.dumps(results))
"""

FITNESS_MODULE = """
import math


def ok(model, tokenizer):
    return float(model.lm_head.weight.detach().sum())


def nan(model, tokenizer):
    return math.nan


def crash(model, tokenizer):
    raise RuntimeError("the scorer crashed")
"""


@dataclass
class Case:
    """One bad input: the command, its config (a mapping, or raw text), what the error line must say, and what OUT
    was before (``absent``; ``empty``: an empty folder; ``nested``: OUT two levels below a missing folder)."""

    id: str
    command: str
    config: dict[str, Any] | str
    message: str
    before: str = "absent"
    warning: str | None = None  # a failed candidate: the one warning line naming it and why


def _soup(**change: Any) -> dict[str, Any]:
    return {"models": ["SOURCE0", "SOURCE1"], "fitness": {"callable": "fit_catalogue:ok"}, **change}


def _evolve(**change: Any) -> dict[str, Any]:
    config = {
        "base_model": "BASE",
        "models": ["SOURCE0", "SOURCE1"],
        "search": {"method": "ties"},
        "fitness": {"callable": "fit_catalogue:ok"},
        "budget": {"evaluations": 3},
    }
    return {**config, **change}


def _kinship(**change: Any) -> dict[str, Any]:
    config = {
        "base_model": "BASE",
        "models": ["SOURCE0", "SOURCE1"],
        "strategy": "kinship_greedy",
        "kinship_greedy": {"k": 2, "max_generations": 1},
        "fitness": {"callable": "fit_catalogue:ok"},
        "budget": {"evaluations": 3},
    }
    return {**config, **change}


NAN = {"callable": "fit_catalogue:nan"}
CRASH = {"callable": "fit_catalogue:crash"}
NAN_SAYS = "fitness.callable 'fit_catalogue:nan' returned nan; expected a finite number"
CRASH_SAYS = "fitness.callable 'fit_catalogue:crash' raised RuntimeError: the scorer crashed"
MALFORMED = "models: [SOURCE0, SOURCE1\nfitness: {callable: 'fit_catalogue:ok'\n"

CASES = [
    # dam soup
    Case("soup-unknown-key", "soup", _soup(strcit=True), "strcit: unknown key; valid: models, fitness, dtype, strict"),
    Case(
        "soup-unknown-fitness-key",
        "soup",
        _soup(fitness={"callable": "fit_catalogue:ok", "limt": 3}),
        "fitness.limt: unknown key; valid: tasks, data_dir, split, metric, limit",
    ),
    Case("soup-missing-model", "soup", _soup(models=["SOURCE0", "MISSING"]), "/missing': folder not found"),
    Case("soup-malformed-yaml", "soup", MALFORMED, "is not valid YAML"),
    Case("soup-nan-fitness", "soup", _soup(fitness=NAN), "soup: candidate SOURCE0 failed, so the soup stops and "),
    Case("soup-failing-fitness", "soup", _soup(fitness=CRASH), CRASH_SAYS, before="nested"),
    # dam evolve, cmaes
    Case(
        "evolve-infinite-weight-range",
        "evolve",
        _evolve(search={"method": "ties", "ranges": {"weight": [0, float("inf")]}}),
        "search.ranges.weight: [0.0, inf] must be finite numbers",
    ),
    Case(
        "evolve-density-out-of-domain",
        "evolve",
        _evolve(search={"method": "ties", "ranges": {"density": [-0.5, 0.5]}}),
        "search.ranges.density: [-0.5, 0.5] is outside density's domain (0, 1]",
    ),
    Case(
        "evolve-infinite-lambda",
        "evolve",
        _evolve(search={"method": "ties", "method_parameters": {"lambda": float("inf")}}),
        "search.method_parameters: ties: parameter 'lambda' must be a finite number, got inf",
    ),
    Case(
        "evolve-nan-budget",
        "evolve",
        _evolve(budget={"seconds": float("nan")}),
        "budget.seconds must be a finite number > 0, got nan",
        before="empty",
    ),
    Case(
        "evolve-nan-fitness",
        "evolve",
        _evolve(fitness=NAN),
        "evolve: the start (candidate 0) failed, so the search stops and leaves nothing in",
        warning=f"evolve: candidate 0 failed (1 in a row): {NAN_SAYS}",
    ),
    Case(
        "evolve-failing-fitness",
        "evolve",
        _evolve(fitness=CRASH),
        CRASH_SAYS,
        before="empty",
        warning=f"evolve: candidate 0 failed (1 in a row): {CRASH_SAYS}",
    ),
    Case(
        "evolve-failing-fitness-nested-out",
        "evolve",
        _evolve(fitness=CRASH),
        "evolve: the start (candidate 0) failed",
        before="nested",
        warning="evolve: candidate 0 failed (1 in a row)",
    ),
    Case(
        "evolve-unknown-key",
        "evolve",
        _evolve(search={"method": "ties", "filter": ["mlp"]}),
        "search.filter: unknown key; valid: method, parameters, layer_groups, filters, ranges, method_parameters",
    ),
    Case("evolve-missing-model", "evolve", _evolve(base_model="MISSING"), "/missing': folder not found"),
    Case("evolve-malformed-yaml", "evolve", MALFORMED, "is not valid YAML"),
    Case(
        "evolve-unusable-storage",
        "evolve",
        _evolve(storage="sqlite:////nonexistent-dam-folder/study.db"),
        "storage 'sqlite:////nonexistent-dam-folder/study.db'",
    ),
    # dam evolve, kinship_greedy
    Case(
        "kinship-infinite-weight",
        "evolve",
        _kinship(kinship_greedy={"method": "linear", "parameters": {"weight": float("inf")}}),
        "kinship_greedy.parameters: linear: models[0]: parameter 'weight' must be a finite number, got inf",
    ),
    Case(
        "kinship-density-out-of-domain",
        "evolve",
        _kinship(kinship_greedy={"method": "ties", "parameters": {"weight": 1.0, "density": 1.5}}),
        "kinship_greedy.parameters: models[0]: density=1.5 is outside (0, 1]",
    ),
    Case(
        "kinship-nan-stop-kinship",
        "evolve",
        _kinship(kinship_greedy={"stop_kinship": float("nan")}),
        "kinship_greedy.stop_kinship must be a number in [-1, 1], got nan",
    ),
    Case(
        "kinship-nan-budget",
        "evolve",
        _kinship(budget={"evaluations": 3, "seconds": float("nan")}),
        "budget.seconds must be a finite number > 0, got nan",
    ),
    Case(
        "kinship-nan-fitness",
        "evolve",
        _kinship(fitness=NAN),
        "kinship_greedy: input model 'SOURCE0' failed, so the search stops and leaves nothing in",
        before="nested",
    ),
    Case("kinship-failing-fitness", "evolve", _kinship(fitness=CRASH), CRASH_SAYS, before="empty"),
    Case(
        "kinship-unknown-key",
        "evolve",
        _kinship(kinship_greedy={"kk": 2}),
        "kinship_greedy.kk: unknown key; valid: k, method, parameters, measure, stop_kinship, exploration",
    ),
    Case("kinship-missing-model", "evolve", _kinship(models=["SOURCE0", "MISSING"]), "/missing': folder not found"),
]


def _out(root: Path, case: Case) -> Path:
    return root / "outs" / case.id / ("missing/deeper" if case.before == "nested" else "out")


def _fill(text: str, names: dict[str, str]) -> str:
    for name, path in names.items():
        text = text.replace(name, path)
    return text


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """Every case run by the driver in one process: the root folder and each case's exit status (or "timeout")."""
    root = tmp_path_factory.mktemp("search_errors")
    base, sources = make_family(root / "family", 2, num_layers=2, scale=0.05)
    (root / "fit_catalogue.py").write_text(FITNESS_MODULE)
    names = {"SOURCE0": str(sources[0]), "SOURCE1": str(sources[1]), "BASE": str(base)}
    names["MISSING"] = str(root / "family" / "missing")
    runs = []
    for case in CASES:
        folder = root / "outs" / case.id
        folder.mkdir(parents=True)
        if case.before == "empty":
            _out(root, case).mkdir()
        text = case.config if isinstance(case.config, str) else yaml.safe_dump(case.config, sort_keys=False)
        config = folder / "config.yaml"
        config.write_text(_fill(text, names))
        argv = [case.command, str(config), str(_out(root, case))] + (["--quiet"] if case.command == "evolve" else [])
        runs.append(
            {"id": case.id, "argv": argv, "cwd": str(root), "stderr": str(folder / "stderr"), "seconds": CASE_SECONDS}
        )
    (root / "cases.json").write_text(json.dumps(runs))
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
        "WANDB_MODE": "disabled",
        "HF_HUB_OFFLINE": "1",
    }
    subprocess.run(
        [sys.executable, "-c", DRIVER, str(root / "cases.json"), str(root / "results.json")],
        cwd=root,
        env=env,
        check=True,
        timeout=CASE_SECONDS * len(CASES),
    )
    return root, json.loads((root / "results.json").read_text())


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_search_input_fails_in_one_line_and_leaves_nothing(outcomes: tuple[Path, dict], case: Case) -> None:
    root, results = outcomes
    err = (root / "outs" / case.id / "stderr").read_text()
    assert results[case.id] == 1, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err[-3000:]
    names = {"SOURCE0": str(root / "family" / "source0"), "MISSING": str(root / "family" / "missing")}
    assert _fill(case.message, names) in errors[0]
    if case.warning is not None:  # one warning line for the failed candidate, naming why
        warnings = [line for line in err.splitlines() if line.startswith("WARNING")]
        assert len(warnings) == 1 and _fill(case.warning, names) in warnings[0], err[-3000:]
    out = _out(root, case)
    if case.before == "empty":
        assert out.is_dir() and not any(out.iterdir()), sorted(p.name for p in out.iterdir())
    else:
        assert not out.exists()
        assert sorted(p.name for p in (root / "outs" / case.id).iterdir()) == ["config.yaml", "stderr"]
