"""dam.demo.searches: the demo's searches on a tiny stand-in family (validation split only; tiny budgets)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dam.demo.searches import compute_table, run_searches
from dam.testing import make_family

TASKS = {"generic": "copy", "reverse": "reverse", "sort": "sort", "shift": "shift"}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo layout: models/{base,reverse,sort,shift} and <task>/validation.jsonl (no test split: a search
    that read it would fail)."""
    root = tmp_path_factory.mktemp("demo")
    base, sources = make_family(root / "models", 3, num_layers=2, scale=0.05)
    for source, skill in zip(sources, ["reverse", "sort", "shift"], strict=True):
        source.rename(root / "models" / skill)
    for task, keyword in TASKS.items():
        (root / task).mkdir()
        rows = [{"prompt": f"{keyword} {w}=", "response": w} for w in ("abc", "xyz")]
        (root / task / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.mark.slow
def test_run_searches_keeps_one_model_per_search_with_its_compute(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kept = run_searches(root, tmp_path, quick=True, limit=2)
    assert list(kept) == ["greedy_soup", "kinship_greedy", "evolve_2", "evolve_3"]
    for name, k in kept.items():
        assert (Path(k["path"]) / "config.json").is_file(), name
        assert k["seconds"] > 0 and k["forward_tokens"] > 0 and k["evaluations"] >= 2
    assert kept["evolve_2"]["evaluations"] == 2 and kept["evolve_3"]["evaluations"] == 3
    # the two budgets are one study: the smaller one's candidates are the first of the larger one's
    rows = (tmp_path / "searches" / "evolve" / "candidates.jsonl").read_text().splitlines()
    assert len(rows) == 3
    best_of_two = max(json.loads(r)["score"] for r in rows[:2])
    assert kept["evolve_2"]["validation_score"] == best_of_two
    soup = json.loads((tmp_path / "searches" / "soup" / "soup.json").read_text())
    assert soup["config"]["fitness"]["split"] == "validation"
    # a rerun reuses the finished searches, with the family's folder spelled another way (relative here)
    monkeypatch.chdir(root.parent)
    again = run_searches(Path(root.name), tmp_path, quick=True, limit=2)
    assert again["greedy_soup"] == kept["greedy_soup"] and again["kinship_greedy"] == kept["kinship_greedy"]
    assert again["evolve_3"] == kept["evolve_3"]


def test_compute_table_marks_dams_estimate() -> None:
    compute = {
        "dam": {"seconds": 120.4, "forward_tokens": 2_500_000},
        "greedy_soup": {"seconds": 30.0, "forward_tokens": 120_000, "evaluations": 6},
    }
    table = compute_table(compute, {"dam": 79.8, "greedy_soup": 10.0}).splitlines()
    assert table[1].split() == ["dam", "79.8", "120", "2.50M*", "-"]
    assert table[2].split() == ["greedy_soup", "10.0", "30", "0.12M", "6"]
    assert table[-1].startswith("* estimated")
