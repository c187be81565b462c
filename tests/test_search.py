"""dam.search: soups, CMA-ES evolution and kinship-guided greedy merging on a tiny family, their fitnesses, resume,
and the one-line errors on bad input. Budgets are tiny (2-5 evaluations): these test the machinery, not search
quality."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from dam.cli import main
from dam.errors import DamError
from dam.evaluation.evaluate import evaluate_model
from dam.evaluation.kinship import model_kinship
from dam.io.checkpoint import CheckpointReader
from dam.io.paths import portable_reference, resolve_reference
from dam.merge.config import load_saved_merge_config, parse_merge_config
from dam.merge.engine import merged_tensors
from dam.search.config import EvolveConfig, FitnessConfig, SearchSpace, SoupConfig, load_search_config
from dam.search.evolve import candidate_config, genes, layer_groups, start_values
from dam.search.fitness import CandidateEvaluator, Fitness, Score
from dam.search.soup import greedy_soup
from dam.testing import make_family

WORDS = ["abc", "hello", "xyz", "merge", "soup"]

# the fitness of the fast tests: closeness of the lm_head to source1's (no generation, milliseconds)
FITNESS_MODULE = """
import torch
from dam.io.checkpoint import CheckpointReader

with CheckpointReader({target!r}) as reader:
    TARGET = reader.get("lm_head.weight")


def closeness(model, tokenizer):
    distance = (model.lm_head.weight.detach() - TARGET).pow(2).sum().item()
    return {{"score": -distance, "distance": distance}}
"""


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A base, three fine-tunes (4 layers), a copy task with a validation split, and the closeness callable."""
    root = tmp_path_factory.mktemp("search")
    base, sources = make_family(root / "family", 3, num_layers=4, scale=0.05)
    (root / "data" / "copy").mkdir(parents=True)
    rows = [{"prompt": f"copy {w}=", "response": w} for w in WORDS]
    (root / "data" / "copy" / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "fit_closeness.py").write_text(FITNESS_MODULE.format(target=str(sources[1])))
    return {"root": root, "base": str(base), "sources": [str(s) for s in sources]}


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _task_fitness(family: dict) -> dict:
    return {"tasks": ["copy"], "data_dir": str(family["root"] / "data"), "metric": "loss", "limit": 3}


def _closeness(family: dict, monkeypatch: pytest.MonkeyPatch) -> dict:
    monkeypatch.chdir(family["root"])  # module:function resolves from the working directory
    return {"callable": "fit_closeness:closeness"}


# ------------------------------------------------------------------------------------------- pure logic


def _soup_of(averages: dict[tuple[str, ...], float]) -> tuple[dict[str, Score], object]:
    own = {"a": 1.0, "b": 3.0, "c": 2.0, "d": 0.5}  # tried in the order b, c, a, d

    def evaluate(models: list[str]) -> Score:
        return Score(averages[tuple(models)], {}, 0.0, None)

    return {m: Score(s, {}, 0.0, None) for m, s in own.items()}, evaluate


def test_greedy_soup_keeps_a_candidate_when_the_score_does_not_drop() -> None:
    """The paper's rule (Wortsman et al. 2022, Recipe 1: keep if the held-out accuracy is >= the soup's): the tie
    of b + c + a with b + c keeps a; d, which lowers the score, is dropped."""
    candidates, evaluate = _soup_of({("b", "c"): 3.5, ("b", "c", "a"): 3.5, ("b", "c", "a", "d"): 3.0})
    kept, best, steps = greedy_soup(candidates, evaluate)
    assert kept == ["b", "c", "a"] and best == 3.5
    assert [(s["model"], s["kept"]) for s in steps] == [("b", True), ("c", True), ("a", True), ("d", False)]


def test_strict_greedy_soup_keeps_a_candidate_only_when_the_score_strictly_improves() -> None:
    candidates, evaluate = _soup_of({("b", "c"): 3.5, ("b", "c", "a"): 3.5, ("b", "c", "d"): 4.0})
    kept, best, steps = greedy_soup(candidates, evaluate, strict=True)
    assert kept == ["b", "c", "d"] and best == 4.0
    assert [(s["model"], s["kept"]) for s in steps] == [("b", True), ("c", True), ("a", False), ("d", True)]


def test_layer_groups_cover_the_layers_contiguously() -> None:
    assert layer_groups(4, 1) == [(0, 4)]
    assert layer_groups(5, 2) == [(0, 2), (2, 5)]
    assert layer_groups(4, 4) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    with pytest.raises(DamError, match="layer_groups is 5 but the models have 4 layers"):
        layer_groups(4, 5)


def test_genotype_becomes_a_mergekit_config_with_slices_and_filters(family: dict) -> None:
    config = EvolveConfig.model_validate(
        {
            "base_model": family["base"],
            "models": family["sources"][:2],
            "search": {"method": "ties", "layer_groups": 2, "filters": ["self_attn"]},
            "fitness": {"callable": "m:f"},
            "budget": {"evaluations": 1},
        }
    )
    groups = layer_groups(4, 2)
    genotype = genes(config.search, 2, 2)
    assert len(genotype) == 2 * 2 * 2 * 2  # groups x models x (filters + default) x (weight, density)
    values = {g.name: 0.1 * (i + 1) for i, g in enumerate(genotype)}
    merge = candidate_config(config, genotype, values, groups, "# header\n")
    data = yaml.safe_load(merge.source_text)
    assert [s["sources"][0]["layer_range"] for s in data["slices"]] == [[0, 2], [2, 4]]
    assert data["slices"][1]["sources"][-1] == {"model": family["base"], "layer_range": [2, 4]}
    weight = data["slices"][1]["sources"][0]["parameters"]["weight"]
    assert weight == [
        {"filter": "self_attn", "value": values["g1.m0.self_attn.weight"]},
        {"value": values["g1.m0.other.weight"]},
    ]
    assert merge.source_text.startswith("# header\n")


def test_a_one_hot_linear_genotype_merges_to_that_model(family: dict) -> None:
    """The genotype's config goes through the registry's linear merge: weight 1 on one model gives that model."""
    space = SearchSpace(method="linear", layer_groups=2, filters=["mlp"])
    config = EvolveConfig(
        base_model=family["base"],
        models=family["sources"],
        search=space,
        fitness=FitnessConfig(callable="m:f"),
        budget={"evaluations": 1},
    )
    genotype = genes(space, 3, 2)
    values = {g.name: 1.0 if g.model == 2 else 0.0 for g in genotype}
    merge = candidate_config(config, genotype, values, layer_groups(4, 2), "")
    with CheckpointReader(family["sources"][2]) as reader:
        for name, tensor in merged_tensors(merge):
            torch.testing.assert_close(tensor, reader.get(name), rtol=0, atol=0)


def test_start_values_are_mergekit_evolves_clipped_to_the_ranges() -> None:
    space = SearchSpace(method="ties", ranges={"density": [0.2, 0.8]})
    x0 = start_values(space, genes(space, 4, 1), 4)
    assert {k: v for k, v in x0.items() if k.endswith("weight")} == {f"g0.m{i}.other.weight": 0.25 for i in range(4)}
    assert {v for k, v in x0.items() if k.endswith("density")} == {0.8}


# ------------------------------------------------------------------------------------------- fitness


def test_in_memory_candidates_score_as_the_same_models_loaded_from_disk(family: dict, tmp_path: Path) -> None:
    """A candidate merged into the evaluator's model scores exactly as that merge written and evaluated by
    ``dam eval``'s code (same tokens, same float32 math), and a model read into it as the model itself."""
    fitness = Fitness(FitnessConfig(**_task_fitness(family)))
    evaluator = CandidateEvaluator(fitness, family["base"])
    text = yaml.safe_dump(
        {
            "merge_method": "ties",
            "base_model": family["base"],
            "models": [{"model": s, "parameters": {"weight": 0.7, "density": 0.6}} for s in family["sources"]],
        }
    )
    merge = parse_merge_config(yaml.safe_load(text), text)
    in_memory = evaluator.merge(merge)
    assert main(["merge", "--quiet", str(_yaml(tmp_path, text)), str(tmp_path / "m")]) == 0
    on_disk = evaluate_model(tmp_path / "m", fitness.tasks)
    assert in_memory.score == pytest.approx(-on_disk.mean_loss, abs=1e-6)  # float32 forwards of identical weights
    read = evaluator.model(family["sources"][0])
    assert read.score == pytest.approx(-evaluate_model(family["sources"][0], fitness.tasks).mean_loss, abs=1e-6)
    assert read.tokens == in_memory.tokens > 0 and evaluator.evaluations == 2


def _yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "merge.yaml"
    path.write_text(text)
    return path


def test_callable_fitness_errors_name_the_callable(family: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(family["root"])
    with pytest.raises(DamError, match="cannot import module 'no_such_module'"):
        Fitness(FitnessConfig(callable="no_such_module:f"))
    with pytest.raises(DamError, match="module 'fit_closeness' has no function 'nope'"):
        Fitness(FitnessConfig(callable="fit_closeness:nope"))
    fitness = Fitness(FitnessConfig(callable="fit_closeness:closeness"))
    score = CandidateEvaluator(fitness, family["base"]).model(family["sources"][1])
    assert score.score == 0.0 and score.metrics == {"distance": 0.0} and score.tokens is None


# ------------------------------------------------------------------------------------------- commands


def test_dam_soup_end_to_end(family: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = _write(tmp_path / "soup.yaml", {"models": family["sources"], "fitness": _task_fitness(family)})
    out = tmp_path / "soup"
    assert main(["soup", str(config), str(out)]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "soup.json").read_text())
    assert "greedy soup of" in printed and "uniform soup of 3" in printed
    steps = summary["greedy"]["steps"]
    named = [portable_reference(m, out) for m in family["sources"]]  # written relative to the soup folder
    assert [s["model"] for s in steps] == sorted(named, key=lambda m: -summary["candidates"][m]["score"])
    assert summary["greedy"]["models"] == [s["model"] for s in steps if s["kept"]]
    lines = (out / "evaluations.jsonl").read_text().splitlines()
    assert len(lines) == summary["compute"]["evaluations"] == 3 + 1 + 2
    assert summary["compute"]["forward_tokens"] > 0
    # the written greedy soup is its config's merge, and scores what the search measured
    kept = yaml.safe_load((out / "greedy.yaml").read_text())
    assert [m["model"] for m in kept["models"]] == summary["greedy"]["models"]
    tasks = Fitness(FitnessConfig(**_task_fitness(family))).tasks
    assert -evaluate_model(out / "greedy", tasks).mean_loss == pytest.approx(summary["greedy"]["score"], abs=1e-6)
    assert main(["soup", str(config), str(out)]) == 1  # never overwritten without --force
    assert "not empty" in capsys.readouterr().err


def _evolve_config(family: dict, monkeypatch: pytest.MonkeyPatch, **extra: object) -> dict:
    return {
        "base_model": family["base"],
        "models": family["sources"],
        "search": {"method": "ties", "layer_groups": 2, "filters": ["mlp"]},
        "fitness": _closeness(family, monkeypatch),
        "budget": {"evaluations": 3},
        **extra,
    }


def test_dam_evolve_cmaes_end_to_end_and_extends_its_budget(
    family: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _evolve_config(family, monkeypatch)
    path = _write(tmp_path / "evolve.yaml", config)
    out = tmp_path / "evolve"
    assert main(["evolve", str(path), str(out), "--quiet"]) == 0
    rows = [json.loads(line) for line in (out / "candidates.jsonl").read_text().splitlines()]
    assert [r["number"] for r in rows] == [0, 1, 2]
    assert set(rows[0]["params"].values()) == {1 / 3, 1.0}  # the first candidate is mergekit-evolve's start
    results = json.loads((out / "results.json").read_text())
    best = max(rows, key=lambda r: r["score"])
    assert results["best"]["score"] == best["score"] and results["compute"]["evaluations"] == 3
    assert (out / "fitness.png").stat().st_size > 0
    # best.yaml runs under dam merge (from its folder: its models are relative to it) and gives the written merge,
    # which scores what the search measured
    monkeypatch.chdir(out)
    assert main(["merge", "--quiet", str(out / "best.yaml"), str(tmp_path / "again")]) == 0
    with CheckpointReader(out / "merged") as a, CheckpointReader(tmp_path / "again") as b:
        assert all(torch.equal(a.get(n), b.get(n)) for n in a.names)
    fitness = Fitness(FitnessConfig(callable="fit_closeness:closeness"))
    assert CandidateEvaluator(fitness, family["base"]).model(out / "merged").score == pytest.approx(best["score"])
    # a larger budget continues the same study: the first candidates are kept, one more is evaluated
    _write(path, {**config, "budget": {"evaluations": 4}})
    assert main(["evolve", str(path), str(out), "--quiet"]) == 0
    again = [json.loads(line) for line in (out / "candidates.jsonl").read_text().splitlines()]
    assert again[:3] == rows and len(again) == 4
    # another search in the same folder is refused
    _write(path, {**config, "search": {"method": "linear"}})
    assert main(["evolve", str(path), str(out), "--quiet"]) == 1


@pytest.mark.slow
def test_a_killed_evolve_resumes_where_it_stopped(
    family: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGKILL after the first candidates: the rerun keeps them (same values, same scores) and finishes the
    budget; the candidate cut off mid-evaluation is dropped."""
    config = _evolve_config(family, monkeypatch, budget={"evaluations": 40})
    path = _write(tmp_path / "evolve.yaml", config)
    out = tmp_path / "evolve"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "WANDB_MODE": "disabled"}
    command = [sys.executable, "-m", "dam.cli", "evolve", str(path), str(out), "--quiet"]
    proc = subprocess.Popen(command, cwd=family["root"], env=env, stderr=subprocess.PIPE)
    candidates = out / "candidates.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if candidates.is_file() and len(candidates.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = [json.loads(line) for line in candidates.read_text().splitlines()]
    assert 3 <= len(before) < 40, "the search ended before it could be killed"
    _write(path, {**config, "budget": {"evaluations": len(before) + 2}})
    result = subprocess.run(command, cwd=family["root"], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    after = [json.loads(line) for line in candidates.read_text().splitlines()]
    assert after[: len(before)] == before and len(after) == len(before) + 2


# both workers of the several-workers test are inside an evaluation at once before either goes on, so that they
# share the study whatever the load (the first call of each waits for the other, at most a minute)
TOGETHER_MODULE = """
import os, time
from pathlib import Path

def closeness_together(model, tokenizer):
    ready = Path({ready!r})
    (ready / str(os.getpid())).touch()
    deadline = time.monotonic() + 60
    while len(list(ready.iterdir())) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    return closeness(model, tokenizer)
"""


@pytest.mark.slow
def test_two_workers_share_one_study(family: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two ``dam evolve`` processes on one storage file at the same time: the budget is counted once over both, no
    candidate is lost or evaluated twice, and best.yaml is written once, from every candidate."""
    import optuna
    from optuna.trial import TrialState

    from dam.search.evolve import STUDY_NAME

    (tmp_path / "ready").mkdir()
    module = FITNESS_MODULE.format(target=family["sources"][1]) + TOGETHER_MODULE.format(ready=str(tmp_path / "ready"))
    (tmp_path / "fit_together.py").write_text(module)
    config = _evolve_config(family, monkeypatch, budget={"evaluations": 10})
    path = _write(tmp_path / "evolve.yaml", {**config, "fitness": {"callable": "fit_together:closeness_together"}})
    out = tmp_path / "evolve"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "WANDB_MODE": "disabled"}
    command = [sys.executable, "-m", "dam.cli", "evolve", str(path), str(out), "--quiet"]
    workers = [subprocess.Popen(command, cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True) for _ in "ab"]
    try:
        logs = [w.communicate(timeout=600)[1] for w in workers]
    finally:
        for w in workers:
            w.kill()  # a no-op on a finished worker
    assert [w.returncode for w in workers] == [0, 0], "\n".join(log[-2000:] for log in logs)
    rows = [json.loads(line) for line in (out / "candidates.jsonl").read_text().splitlines()]
    assert len(rows) == 10 and len({r["number"] for r in rows}) == 10  # the budget, counted once over both
    assert len({r["worker"] for r in rows}) == 2  # both evaluated candidates
    assert len({json.dumps(r["params"], sort_keys=True) for r in rows}) == 10  # none evaluated twice
    assert sum(set(r["params"].values()) == {1 / 3, 1.0} for r in rows) == 1  # the start queued once
    study = optuna.load_study(study_name=STUDY_NAME, storage=f"sqlite:///{out / 'study.db'}")
    states = [t.state for t in study.trials]
    assert states.count(TrialState.COMPLETE) == 10, states  # none lost: every completed one is in candidates.jsonl
    assert TrialState.FAIL not in states and TrialState.RUNNING not in states, states
    # best.yaml: written by one worker, from all ten candidates, and it remakes the merge that scored best
    assert sum(log.count("evolve: wrote") for log in logs) == 1, logs
    best = max(rows, key=lambda r: r["score"])
    assert json.loads((out / "results.json").read_text())["best"]["candidate"] == best["number"]
    fitness = Fitness(FitnessConfig(callable="fit_closeness:closeness"))  # imported from the family's folder
    monkeypatch.chdir(out)  # best.yaml names its models relative to its folder
    assert main(["merge", "--quiet", str(out / "best.yaml"), str(tmp_path / "again")]) == 0
    with CheckpointReader(out / "merged") as a, CheckpointReader(tmp_path / "again") as b:
        assert all(torch.equal(a.get(n), b.get(n)) for n in a.names)
    assert CandidateEvaluator(fitness, family["base"]).model(out / "merged").score == pytest.approx(best["score"])


# the kinship-greedy run of the mergekit test: closeness to the sources' mean lm_head, which a merge of two sources
# is nearer to than any source (so its best is a merge and it writes best.yaml)
MEAN_FITNESS_MODULE = """
import torch
from dam.io.checkpoint import CheckpointReader

TARGET = 0
for source in {sources!r}:
    with CheckpointReader(source) as reader:
        TARGET = TARGET + reader.get("lm_head.weight") / len({sources!r})


def closeness(model, tokenizer):
    return -(model.lm_head.weight.detach() - TARGET).pow(2).sum().item()
"""


@pytest.mark.slow  # one mergekit subprocess for the four configs
def test_search_outputs_run_unchanged_under_mergekit(
    family: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The configs the searches write (dam evolve's best.yaml with slices and filter lists, the soups' greedy.yaml
    and uniform.yaml, kinship-greedy's best.yaml), run unchanged from their folder by mergekit 0.1.5 and by
    ``dam merge``, give the same tensors."""
    pytest.importorskip("mergekit")
    from mergekit_run import mergekit_merge

    evolve = _write(tmp_path / "evolve.yaml", _evolve_config(family, monkeypatch, budget={"evaluations": 2}))
    assert main(["evolve", str(evolve), str(tmp_path / "evolve"), "--quiet"]) == 0
    soup = _write(tmp_path / "soup.yaml", {"models": family["sources"], "fitness": _task_fitness(family)})
    assert main(["soup", str(soup), str(tmp_path / "soup")]) == 0
    (family["root"] / "fit_mean.py").write_text(MEAN_FITNESS_MODULE.format(sources=family["sources"]))
    kinship = {
        "base_model": family["base"],
        "models": family["sources"],
        "strategy": "kinship_greedy",
        "kinship_greedy": {"k": 2, "max_generations": 1},
        "fitness": {"callable": "fit_mean:closeness"},
        "budget": {"evaluations": 5},
    }
    assert main(["evolve", str(_write(tmp_path / "kg.yaml", kinship)), str(tmp_path / "kg")]) == 0
    configs = {
        "evolve": tmp_path / "evolve" / "best.yaml",
        "greedy_soup": tmp_path / "soup" / "greedy.yaml",
        "uniform_soup": tmp_path / "soup" / "uniform.yaml",
        "kinship_greedy": tmp_path / "kg" / "best.yaml",
    }
    assert "slices" in yaml.safe_load(configs["evolve"].read_text())  # the multi-group genotype, filter lists
    assert yaml.safe_load(configs["kinship_greedy"].read_text())["merge_method"] == "slerp"
    mergekit_merge({config: tmp_path / f"mk_{name}" for name, config in configs.items()})  # each from its folder
    for name, config in configs.items():
        monkeypatch.chdir(config.parent)  # the configs name local models relative to their folder
        assert main(["merge", "--quiet", str(config), str(tmp_path / f"dam_{name}")]) == 0
        mk = load_file(tmp_path / f"mk_{name}" / "model.safetensors")
        with CheckpointReader(tmp_path / f"dam_{name}") as ours:
            assert sorted(ours.names) == sorted(mk), name
            for tensor in ours.names:
                # both compute in float32 from the same float32 weights (~0.1); only the order of the additions
                # differs, a few float32 ulps (~1e-8 here): 1e-6, as in test_mergekit_parity.py
                torch.testing.assert_close(ours.get(tensor), mk[tensor], rtol=0, atol=1e-6, msg=f"{name} {tensor}")


def test_dam_evolve_kinship_greedy_end_to_end(family: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = {
        "base_model": family["base"],
        "models": family["sources"],
        "strategy": "kinship_greedy",
        "kinship_greedy": {"k": 2, "measure": "pearson", "max_generations": 2},
        "fitness": _closeness(family, monkeypatch),
        "budget": {"evaluations": 6},
    }
    path = _write(tmp_path / "kg.yaml", config)
    out = tmp_path / "kg"
    assert main(["evolve", str(path), str(out)]) == 0
    members = [json.loads(line) for line in (out / "members.jsonl").read_text().splitlines()]
    generations = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert [m["name"] for m in members[:3]] == ["input0", "input1", "input2"]
    assert members[1]["score"] == 0.0  # source1 is the closeness target
    first = generations[0]
    top = list(first["top"])
    assert top[0] == "input1" and len(top) == 2
    # the top pair's kinship is dam kinship's Pearson correlation of their task vectors
    by_name = {m["name"]: {**m, "path": resolve_reference(m["path"], out)} for m in members}  # written relative
    expected = model_kinship(by_name[top[0]]["path"], by_name[top[1]]["path"], family["base"]).overall.pearson
    assert first["kinship"][f"{top[0]}~{top[1]}"] == pytest.approx(expected)
    # generation 1: the top pair, then the best with the least related model outside the top
    (merge, exploration) = first["merges"]
    assert merge["parents"] == top and exploration["why"] == "exploration"
    assert exploration["parents"][0] == "input1" and exploration["parents"][1] not in top
    gen1 = load_saved_merge_config(out / "models" / merge["name"])  # models written relative to the folder
    assert gen1.merge_method == "slerp" and gen1.base_model == by_name[top[0]]["path"]
    results = json.loads((out / "results.json").read_text())
    assert results["compute"]["evaluations"] == len(members) <= 6
    assert results["stop"] in ("budget", "max_generations", "kinship", "no new pair")
    # run again: every member is replayed from the log, none re-evaluated
    log = (out / "members.jsonl").read_text()
    assert main(["evolve", str(path), str(out)]) == 0
    assert (out / "members.jsonl").read_text() == log
    assert json.loads((out / "results.json").read_text()) == results  # compute included: kinship times are logged


# ------------------------------------------------------------------------------------------- failing candidates

# a fitness that fails on the calls ``fails`` names (counted in this process; each test imports its own copy)
FLAKY_MODULE = """
CALLS = 0


def score(model, tokenizer):
    global CALLS
    CALLS += 1
    if {fails}:
        raise RuntimeError(f"flaky call {{CALLS}}")
    return float(model.lm_head.weight.detach().sum())
"""


def _flaky(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fails: str, run: int = 0) -> dict:
    """A callable fitness failing when ``fails`` (an expression of ``CALLS``, 1 for the first call) holds."""
    name = f"fit_flaky_{tmp_path.name}_{run}"  # a module of its own: its call count starts at 0
    (tmp_path / f"{name}.py").write_text(FLAKY_MODULE.format(fails=fails))
    monkeypatch.chdir(tmp_path)
    return {"callable": f"{name}:score"}


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_failed_candidates_count_against_the_evolve_budget(
    family: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Candidates 1 and 3 fail: with a budget of 4 the search evaluates candidates 0-3 and stops (it used to
    evaluate 4 more that succeeded); the failed ones are recorded with their reason, the best is a scored one, and
    the start score is candidate 0's."""
    config = _evolve_config(family, monkeypatch, budget={"evaluations": 4})
    path = _write(tmp_path / "evolve.yaml", {**config, "fitness": _flaky(tmp_path, monkeypatch, "CALLS in (2, 4)")})
    out = tmp_path / "evolve"
    assert main(["evolve", str(path), str(out), "--quiet"]) == 0
    rows = _lines(out / "candidates.jsonl")
    assert [r["number"] for r in rows] == [0, 1, 2, 3]
    assert [r["score"] is None for r in rows] == [False, True, False, True]
    assert rows[1]["error"].endswith("raised RuntimeError: flaky call 2") and rows[1]["seconds"] > 0
    results = json.loads((out / "results.json").read_text())
    assert results["compute"]["evaluations"] == 4 and results["compute"]["failed"] == 2
    assert results["start_score"] == rows[0]["score"]
    assert results["best"]["score"] == max(rows[0]["score"], rows[2]["score"])
    assert "4 evaluations (2 failed)" in capsys.readouterr().out


def test_evolve_stops_after_max_failures_in_a_row_and_keeps_the_study(
    family: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    config = _evolve_config(family, monkeypatch, budget={"evaluations": 20, "max_failures_in_a_row": 2})
    config["fitness"] = _flaky(tmp_path, monkeypatch, "CALLS > 1")  # the start scores, every later one fails
    out = tmp_path / "evolve"
    assert main(["evolve", str(_write(tmp_path / "evolve.yaml", config)), str(out), "--quiet"]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "flaky call 3" in errors[0]
    assert errors[0].startswith("error: evolve: 2 candidates in a row failed (budget.max_failures_in_a_row)")
    assert [r["score"] is None for r in _lines(out / "candidates.jsonl")] == [False, True, True]
    assert (out / "study.db").is_file() and not (out / "results.json").exists()  # kept: a rerun continues it


def test_failed_merges_count_against_the_kinship_greedy_budget(
    family: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """The three inputs score, every merge fails: with a budget of 5 the two merges of generation 1 spend it; with
    max_failures_in_a_row 2 the same run stops with an error instead."""
    fitness = _flaky(tmp_path, monkeypatch, "CALLS > 3")
    config = {
        "base_model": family["base"],
        "models": family["sources"],
        "strategy": "kinship_greedy",
        "kinship_greedy": {"k": 2, "max_generations": 3},
        "fitness": fitness,
        "budget": {"evaluations": 5},
    }
    out = tmp_path / "kg"
    assert main(["evolve", str(_write(tmp_path / "kg.yaml", config)), str(out)]) == 0
    assert "gen1-0 = input" in capsys.readouterr().out
    members = _lines(out / "members.jsonl")
    assert [m["score"] is None for m in members] == [False, False, False, True, True]
    assert members[3]["error"].endswith("raised RuntimeError: flaky call 4")
    results = json.loads((out / "results.json").read_text())
    assert results["compute"]["evaluations"] == 5 and results["compute"]["failed"] == 2
    assert results["stop"] == "budget" and results["best"]["parents"] == [] and not (out / "best.yaml").exists()
    # the same failures, two in a row allowed: the search stops, its folder kept
    config["fitness"] = _flaky(tmp_path, monkeypatch, "CALLS > 3", run=1)
    config["budget"] = {"evaluations": 5, "max_failures_in_a_row": 2}
    out = tmp_path / "kg2"
    assert main(["evolve", str(_write(tmp_path / "kg.yaml", config)), str(out)]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and (out / "members.jsonl").is_file()
    assert errors[0].startswith("error: kinship_greedy: 2 merges in a row failed (budget.max_failures_in_a_row)")


def test_soup_keeps_tied_candidates_unless_strict(
    family: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fitness that scores every model the same: every average ties the soup, so the paper's rule keeps every
    candidate and ``strict: true`` none but the first."""
    (tmp_path / "fit_same.py").write_text("def score(model, tokenizer):\n    return 1.0\n")
    monkeypatch.chdir(tmp_path)
    config = {"models": family["sources"], "fitness": {"callable": "fit_same:score"}}
    assert main(["soup", str(_write(tmp_path / "soup.yaml", config)), str(tmp_path / "soup")]) == 0
    assert len(json.loads((tmp_path / "soup" / "soup.json").read_text())["greedy"]["models"]) == 3
    strict = _write(tmp_path / "strict.yaml", {**config, "strict": True})
    assert main(["soup", str(strict), str(tmp_path / "strict")]) == 0
    assert len(json.loads((tmp_path / "strict" / "soup.json").read_text())["greedy"]["models"]) == 1


# ------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"search": {"method": "ties", "parameters": ["gamma"]}}, "'gamma' is not a searchable parameter of ties"),
        ({"search": {"method": "della"}}, "search.method 'della' cannot be searched"),
        ({"search": {"method": "ties", "parameters": []}}, "search.parameters is empty"),
        ({"search": {"method": "ties", "layer_groups": 9}}, "layer_groups is 9 but the models have 4 layers"),
        ({"fitness": {"tasks": ["nope"], "data_dir": "DATA", "split": "validation"}}, "task 'nope': no file"),
        ({"fitness": {"tasks": ["copy"], "data_dir": "DATA", "split": "test"}}, "task 'copy': no file"),
        ({"fitness": {}}, "fitness needs exactly one of `tasks`"),
        ({"budget": {"evaluations": 0}}, "budget.evaluations must be a finite number > 0, got 0"),
        ({"budget": {"seconds": -1}}, "budget.seconds must be a finite number > 0, got -1"),
        ({"budget": {"seconds": float("nan")}}, "budget.seconds must be a finite number > 0, got nan"),
        ({"budget": {"seconds": float("inf")}}, "budget.seconds must be a finite number > 0, got inf"),
        ({"budget": {"evaluations": 2.5}}, "budget.evaluations: Input should be a valid integer"),
        ({"budget": {"evaluations": True}}, "budget.evaluations: Input should be a valid integer"),
        ({"budget": {"evaluations": 2, "max_failures_in_a_row": 0}}, "budget.max_failures_in_a_row must be a finite"),
        ({"search": {"method": "ties", "ranges": {"weight": [0, float("inf")]}}}, "search.ranges.weight: [0.0, inf]"),
        ({"search": {"method": "ties", "ranges": {"weight": [float("nan"), 1]}}}, "must be finite numbers"),
        (
            {"search": {"method": "ties", "ranges": {"density": [-0.5, 0.5]}}},
            "search.ranges.density: [-0.5, 0.5] is outside density's domain (0, 1]",
        ),
        ({"search": {"method": "ties", "ranges": {"density": [0.5, 1.5]}}}, "outside density's domain (0, 1]"),
        ({"search": {"method": "slerp", "ranges": {"t": [0, float("inf")]}}}, "search.ranges.t: [0.0, inf] must be"),
        ({"search": {"method": "ties", "ranges": {"t": [0, 1]}}}, "search.ranges.t: not a searchable parameter"),
        (
            {"search": {"method": "ties", "method_parameters": {"lambda": float("inf")}}},
            "search.method_parameters: ties: parameter 'lambda' must be a finite number, got inf",
        ),
        (
            {"search": {"method": "ties", "method_parameters": {"lamda": 1}}},
            "search.method_parameters: ties: unknown parameter(s) lamda (valid: int8_mask, normalize, rescale,",
        ),
        ({"search": {"method": "slerp"}}, "search.method slerp merges the base with exactly one model; models has 3"),
        ({"search": {"method": "ties", "layer_groups": 1.5}}, "search.layer_groups: Input should be a valid integer"),
        ({"search": {"method": "ties"}, "seed": -1}, "seed: Input should be greater than or equal to 0"),
        ({"search": {"method": "ties"}, "seed": 2**32}, "seed: Input should be less than or equal to 4294967295"),
        ({"fitness": {"callable": "m:f", "limit": float("nan")}}, "fitness.limit: Input should be a valid integer"),
        ({"strategy": "kinship_greedy"}, "`search` is the cmaes strategy's section"),
        (
            {"search": None, "strategy": "kinship_greedy", "kinship_greedy": {"stop_kinship": float("nan")}},
            "kinship_greedy.stop_kinship must be a number in [-1, 1], got nan",
        ),
        (
            {"search": None, "strategy": "kinship_greedy", "kinship_greedy": {"method": "linear", "parameters": {}}},
            "kinship_greedy.parameters: linear: models[0]: missing required parameter 'weight'",
        ),
        (
            {"search": None, "strategy": "kinship_greedy", "kinship_greedy": {"parameters": {"t": float("inf")}}},
            "kinship_greedy.parameters: slerp: parameter 't' must be a finite number, got inf",
        ),
        (
            {
                "search": None,
                "strategy": "kinship_greedy",
                "kinship_greedy": {"method": "ties", "parameters": {"weight": 1, "density": 1.5}},
            },
            "kinship_greedy.parameters: models[0]: density=1.5 is outside (0, 1]",
        ),
        (
            {"search": {"method": "ties"}, "serach": 1},
            "serach: unknown key; valid: base_model, models, strategy, search, kinship_greedy, fitness, budget, seed",
        ),
        (
            {"search": {"method": "ties", "filter": ["mlp"]}},
            "search.filter: unknown key; valid: method, parameters, layer_groups, filters, ranges, method_parameters",
        ),
        (
            {"search": {"method": "ties"}, "wandb": {"projct": "x"}},
            "wandb.projct: unknown key; valid: project, entity",
        ),
    ],
)
def test_bad_evolve_configs_fail_in_one_line_and_write_nothing(
    family: dict, tmp_path: Path, capsys: pytest.CaptureFixture, change: dict, message: str
) -> None:
    config = {
        "base_model": family["base"],
        "models": family["sources"],
        "search": {"method": "ties"},
        "fitness": {"tasks": ["copy"], "data_dir": str(family["root"] / "data")},
        "budget": {"evaluations": 2},
    }
    config.update(yaml.safe_load(yaml.safe_dump(change).replace("DATA", str(family["root"] / "data"))))
    config = {k: v for k, v in config.items() if v is not None}  # None: the key removed
    out = tmp_path / "out"
    assert main(["evolve", str(_write(tmp_path / "c.yaml", config)), str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and message in err
    assert not out.exists()


def test_candidates_of_different_architectures_are_refused(family: dict, tmp_path: Path, capsys) -> None:
    _, (qwen,) = make_family(tmp_path / "qwen", 1, arch="qwen2", num_layers=4)
    fitness = {"tasks": ["copy"], "data_dir": str(family["root"] / "data")}
    soup = _write(tmp_path / "soup.yaml", {"models": [*family["sources"][:1], str(qwen)], "fitness": fitness})
    assert main(["soup", str(soup), str(tmp_path / "soup")]) == 1
    assert "has architectures ['Qwen2ForCausalLM']" in capsys.readouterr().err
    evolve = {
        "base_model": family["base"],
        "models": [family["sources"][0], str(qwen)],
        "fitness": fitness,
        "budget": {"evaluations": 1},
    }
    for strategy in ({"search": {"method": "ties"}}, {"strategy": "kinship_greedy"}):
        path = _write(tmp_path / "evolve.yaml", {**evolve, **strategy})
        assert main(["evolve", str(path), str(tmp_path / "evolve")]) == 1
        assert "Qwen2ForCausalLM" in capsys.readouterr().err
    assert not (tmp_path / "soup").exists() and not (tmp_path / "evolve").exists()


def test_soup_config_errors() -> None:
    with pytest.raises(Exception, match="at least 2 candidate models"):
        SoupConfig.model_validate({"models": ["a"], "fitness": {"callable": "m:f"}})
    with pytest.raises(Exception, match="'module:function'"):
        FitnessConfig(callable="nocolon")


def test_load_search_config_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(DamError, match="not found"):
        load_search_config(tmp_path / "none.yaml", SoupConfig)


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "configs" / "search").glob("*.yaml")))
def test_example_configs_are_valid(path: Path) -> None:
    schema = SoupConfig if path.name.startswith("soup") else EvolveConfig
    load_search_config(path, schema)
