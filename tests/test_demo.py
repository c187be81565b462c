"""dam.demo: the task generators, the committed datasets, the schedule, and a seconds-long build of the family."""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

import pytest
import torch

import dam.demo.tasks
from dam.cli import main
from dam.demo.family import DemoSettings, build_demo, collate, demo_tokenizer, learning_rate
from dam.demo.tasks import GENERIC, SKILLS, SPLITS, make_example, task_splits, write_datasets
from dam.errors import DamError
from dam.evaluation.evaluate import load_jsonl

REPO_DEMO = Path(__file__).resolve().parents[1] / "data" / "demo"
TINY = DemoSettings(
    hidden_size=32,
    intermediate_size=64,
    num_layers=1,
    num_heads=2,
    base_steps=3,
    expert_steps=2,
    batch_size=8,
    warmup_steps=1,
    n_train=16,
    n_train_generic=32,
    replay=4,
    n_validation=3,
    n_test=4,
    eval_batch_size=4,
)


def _word(prompt: str, keyword: str) -> str:
    assert prompt.startswith(keyword + " ") and prompt.endswith("=")
    return prompt[len(keyword) + 1 : -1]


def test_skills_give_the_right_answers() -> None:
    rng = random.Random(0)
    for _ in range(200):
        ex = make_example("reverse", rng)
        assert ex["response"] == _word(ex["prompt"], "reverse")[::-1]
        ex = make_example("sort", rng)
        assert ex["response"] == "".join(sorted(_word(ex["prompt"], "sort")))
        ex = make_example("shift", rng)
        word = _word(ex["prompt"], "shift")
        assert [(ord(b) - ord(a)) % 26 for a, b in zip(word, ex["response"], strict=True)] == [1] * len(word)
        assert set(word) <= set(string.ascii_lowercase) and 3 <= len(word) <= 6
        ex = make_example(GENERIC, rng)
        keyword, word = ex["prompt"][:-1].split(" ")
        if keyword in ("mirror", "order", "next"):
            assert set(word) <= set(string.digits)
        expected = {
            "copy": lambda w: w,
            "repeat": lambda w: w + w,
            "mirror": lambda w: w[::-1],
            "order": lambda w: "".join(sorted(w)),
            "next": lambda w: "".join(str((int(d) + 1) % 10) for d in w),
        }
        assert ex["response"] == expected[keyword](word)
        assert ex["text"] == ex["prompt"] + ex["response"] and ex["task"] == GENERIC
    assert make_example("shift", random.Random(5))["response"] != ""
    with pytest.raises(DamError, match="unknown demo task 'add'"):
        make_example("add", rng)


def test_shift_wraps_z_to_a() -> None:
    rng = random.Random(0)
    examples = [make_example("shift", rng) for _ in range(300)]
    assert any("z" in _word(ex["prompt"], "shift") for ex in examples)
    for ex in examples:
        for a, b in zip(_word(ex["prompt"], "shift"), ex["response"], strict=True):
            assert b == ("a" if a == "z" else chr(ord(a) + 1))


def test_splits_are_deterministic_distinct_and_disjoint() -> None:
    splits = task_splits("sort", 7, 300, 40, 50)
    assert splits == task_splits("sort", 7, 300, 40, 50)
    assert task_splits("sort", 8, 300, 40, 50)["train"] != splits["train"]
    prompts = [ex["prompt"] for split in SPLITS for ex in splits[split]]
    assert [len(splits[s]) for s in SPLITS] == [300, 40, 50] and len(set(prompts)) == 390
    # validation is drawn after train and test, so adding it left those two (and the family trained on them) as
    # they were without it
    assert {s: splits[s] for s in ("train", "test")} == {
        s: task_splits("sort", 7, 300, 0, 50)[s] for s in ("train", "test")
    }


def test_too_few_distinct_prompts_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(dam.demo.tasks._GENERATORS, "sort", lambda rng: (f"sort {rng.choice('ab')}=", "a"))
    assert len(task_splits("sort", 0, 1, 0, 1)["train"]) == 1
    with pytest.raises(DamError, match="demo task 'sort': cannot draw 3 distinct prompts"):
        task_splits("sort", 0, 1, 1, 1)


def test_committed_datasets_are_the_seed_0_generator_output(tmp_path: Path) -> None:
    settings = DemoSettings()
    written = write_datasets(
        tmp_path,
        seed=0,
        n_train=settings.n_train,
        n_train_generic=settings.n_train_generic,
        n_validation=settings.n_validation,
        n_test=settings.n_test,
    )
    assert sorted(written) == sorted([GENERIC, *SKILLS])
    assert sorted(p.name for p in REPO_DEMO.glob("*/*.jsonl")) == sorted([f"{s}.jsonl" for s in SPLITS] * len(written))
    for task, splits in written.items():
        for split, path in splits.items():
            committed = REPO_DEMO / task / f"{split}.jsonl"
            assert committed.read_bytes() == path.read_bytes(), f"{committed} differs from the generator"
    row = load_jsonl(REPO_DEMO / "reverse" / "train.jsonl")[0]
    assert set(row) == {"prompt", "response", "task", "text"}


def test_schedule_and_collate() -> None:
    assert learning_rate(0, 100, 1.0, 10) == pytest.approx(0.1)
    assert learning_rate(9, 100, 1.0, 10) == pytest.approx(1.0)
    assert learning_rate(10, 100, 1.0, 10) == pytest.approx(1.0)
    assert learning_rate(55, 100, 1.0, 10) == pytest.approx(0.5)
    assert learning_rate(99, 100, 1.0, 10) < 0.001
    ids, labels = collate([([1, 5, 6], [7, 2]), ([1, 5], [2])], pad_id=0)
    assert ids.tolist() == [[1, 5, 6, 7, 2], [1, 5, 2, 0, 0]]
    assert labels.tolist() == [[-100, -100, -100, 7, 2], [-100, -100, 2, -100, -100]]


def test_settings_are_checked() -> None:
    with pytest.raises(DamError, match="expert_lr=0"):
        DemoSettings(expert_lr=0)
    with pytest.raises(DamError, match="base_steps=-1"):
        DemoSettings(base_steps=-1)
    with pytest.raises(DamError, match="multiple of num_heads"):
        DemoSettings(hidden_size=30, num_heads=4)
    with pytest.raises(DamError, match="choose distinct skills"):
        build_demo("unused", skills=["reverse", "add"], settings=TINY)


def test_tokenizer_round_trips_every_demo_character() -> None:
    tok = demo_tokenizer()
    text = string.ascii_lowercase + string.digits + " ="
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id and tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == text


def test_build_smoke(tmp_path: Path) -> None:
    root = tmp_path / "demo"
    report = build_demo(root, 3, skills=["reverse", "shift"], settings=TINY, progress=False)
    models = root / "models"
    assert sorted(p.name for p in models.iterdir()) == ["base", "build_report.json", "reverse", "shift"]
    for name in ["base", "reverse", "shift"]:
        files = {p.name for p in (models / name).iterdir()}
        assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= files
    for task in ["generic", "reverse", "shift"]:
        assert len(load_jsonl(root / task / "train.jsonl")) == (32 if task == "generic" else 16)
        assert len(load_jsonl(root / task / "validation.jsonl")) == 3
        assert len(load_jsonl(root / task / "test.jsonl")) == 4
    assert not (root / "sort").exists()
    saved = json.loads((models / "build_report.json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert saved["models"] == {"base": "models/base", "reverse": "models/reverse", "shift": "models/shift"}
    assert saved["datasets"]["reverse"] == {s: f"reverse/{s}.jsonl" for s in SPLITS}
    assert set(saved["accuracy"]) == {"base", "reverse", "shift"}
    assert set(saved["accuracy"]["shift"]) == {"generic", "reverse", "shift"}
    assert all(0 <= v <= 100 for row in saved["accuracy"].values() for v in row.values())
    assert set(saved["kinship"]) == {"reverse|shift"}
    assert -1 <= saved["kinship"]["reverse|shift"]["cosine"] <= 1
    assert saved["seconds"]["total"] > 0 and saved["settings"]["n_train"] == 16

    # experts differ from the base, which the fine-tunes started from
    from safetensors.torch import load_file

    base = load_file(models / "base" / "model.safetensors")
    expert = load_file(models / "reverse" / "model.safetensors")
    assert base.keys() == expert.keys()
    assert not torch.equal(base["model.embed_tokens.weight"], expert["model.embed_tokens.weight"])

    # the models folder is not replaced without --force, and is with it
    with pytest.raises(DamError, match="not empty; pass --force"):
        build_demo(root, 3, skills=["reverse"], settings=TINY, progress=False)
    build_demo(root, 3, skills=["reverse"], settings=TINY, progress=False, force=True)
    assert sorted(p.name for p in models.iterdir()) == ["base", "build_report.json", "reverse"]


def test_build_is_reproducible(tmp_path: Path) -> None:
    settings = DemoSettings(**{**TINY.__dict__, "n_test": 2})
    for name in ["a", "b"]:
        build_demo(tmp_path / name, 1, skills=["sort"], settings=settings, progress=False)
    from safetensors.torch import load_file

    a = load_file(tmp_path / "a" / "models" / "sort" / "model.safetensors")
    b = load_file(tmp_path / "b" / "models" / "sort" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cli_demo_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    calls = []

    def fake_build(out, seed, *, settings, force, progress):
        calls.append((out, seed, settings, force, progress))
        return {"seconds": {"total": 1.0}, "models": {"base": "models/base"}}

    monkeypatch.setattr("dam.demo.family.build_demo", fake_build)
    assert main(["demo", "build", "--out", str(tmp_path), "--seed", "4", "--expert-steps", "7", "--quiet"]) == 0
    out, seed, settings, force, progress = calls[0]
    assert (out, seed, force, progress) == (str(tmp_path), 4, False, False)
    assert settings.expert_steps == 7 and settings.base_steps == DemoSettings().base_steps
    assert "demo family built" in capsys.readouterr().out
    monkeypatch.undo()

    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "keep").write_text("x")
    assert main(["demo", "build", "--out", str(tmp_path), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: output folder") and "--force" in err
    assert (tmp_path / "models" / "keep").read_text() == "x"


def test_results_plot_tells_dam_from_the_searches_and_fits_a_deep_model(monkeypatch, tmp_path: Path) -> None:
    """DAM is the one red bar (the searches get shades of their own), and a 30-layer row_column map (60 rows and
    more) keeps its row labels apart: every k-th labelled, no per-cell values."""
    import pandas as pd
    from matplotlib.colors import to_hex

    import dam.demo.run as demo_run

    models = ["base", "reverse", "linear", "regmean", "dam", "greedy_soup", "evolve_8"]
    colours = [to_hex(c) for c in demo_run._model_colours(models, ["reverse"])]
    assert colours[models.index("dam")] == to_hex("tab:red") and len(set(colours)) == len(models)
    rows = ["embed_tokens"] + [f"layer {i}{suffix}" for i in range(30) for suffix in ("", " rows")] + ["norm"]
    table = pd.DataFrame({"base": -2.0, "reverse": 1.0}, index=rows)
    monkeypatch.setattr(demo_run, "layer_coefficients", lambda run: table)
    accuracy = {m: {"general": 50.0, "reverse": 50.0} for m in models}
    fig = demo_run.plot_results(accuracy, ["general", "reverse"], ["reverse"], tmp_path, tmp_path / "r.png")
    columns, row_scales = (ax for ax in fig.axes[1:] if ax.get_title().startswith("DAM"))
    labels = [t.get_text() for t in columns.get_yticklabels()]
    assert labels[0] == "embed_tokens" and len(labels) <= demo_run.HEAT_MAP_LABELS and not columns.texts
    assert "row scales" in row_scales.get_title() and "column" in columns.get_title()
    # the row scales on a map and colour scale of their own: 30 layers, labelled by layer
    assert row_scales.images[0].get_array().shape == (30, 2) and columns.images[0].get_array().shape == (32, 2)
    assert [t.get_text() for t in row_scales.get_yticklabels()][:2] == ["layer 0", "layer 2"]
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"


def test_results_plot_of_a_column_run_has_one_coefficient_map(monkeypatch, tmp_path: Path) -> None:
    """Without row scales the coefficients are one annotated map (a short model: every value written)."""
    import pandas as pd

    import dam.demo.run as demo_run

    table = pd.DataFrame({"base": [-2.0, -1.5], "reverse": [1.0, 0.5]}, index=["layer 0", "layer 1"])
    monkeypatch.setattr(demo_run, "layer_coefficients", lambda run: table)
    accuracy = {m: {"general": 50.0, "reverse": 50.0} for m in ("base", "dam")}
    fig = demo_run.plot_results(accuracy, ["general", "reverse"], ["reverse"], tmp_path, tmp_path / "r.png")
    (heat,) = (ax for ax in fig.axes[1:] if ax.get_title().startswith("DAM"))
    assert heat.get_title() == "DAM coefficients: mean per layer and source"
    assert sorted(t.get_text() for t in heat.texts) == ["-1.50", "-2.00", "0.50", "1.00"]
