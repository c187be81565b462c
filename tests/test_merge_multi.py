"""Multi-document merge configs (`dam merge` as mergekit-multimerge): order, name references, resume, errors."""

import os
import re

import pytest
import torch
from safetensors.torch import load_file

from dam.cli import main
from dam.errors import DamError
from dam.merge.engine import run_merge
from dam.merge.multi import plan_merge_steps, run_merge_file
from dam.testing import make_family

# The final (unnamed) document comes first and uses "soup", which uses "pair": the order is by dependency.
RECIPE = """
merge_method: slerp
base_model: {base}
models: [{{model: {base}}}, {{model: soup}}]
parameters: {{t: 0.5}}
dtype: float32
---
name: soup
merge_method: linear
models: [{{model: pair, parameters: {{weight: 1.0}}}}, {{model: {s2}, parameters: {{weight: 1.0}}}}]
dtype: float32
---
name: pair
merge_method: linear
models: [{{model: {s0}, parameters: {{weight: 0.3}}}}, {{model: {s1}, parameters: {{weight: 0.7}}}}]
dtype: float32
"""


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    base, sources = make_family(tmp_path_factory.mktemp("multi"), 3)
    return {"base": base, "s0": sources[0], "s1": sources[1], "s2": sources[2]}


def _write(tmp_path, text, family):
    path = tmp_path / "recipe.yaml"
    path.write_text(text.format(**family))
    return path


def test_recipe_runs_in_dependency_order_and_equals_the_merges_run_one_by_one(tmp_path, family):
    recipe = _write(tmp_path, RECIPE, family)
    steps = plan_merge_steps(recipe, tmp_path / "out", tmp_path / "mid")
    assert [s.name for s in steps] == ["pair", "soup", None]
    summaries = run_merge_file(recipe, tmp_path / "out", intermediate_dir=tmp_path / "mid", progress=False)
    assert [s.out.name for s in summaries] == ["pair", "soup", "out"]
    # The same three merges by hand, each on the previous output.
    by_hand = tmp_path / "by_hand"
    docs = RECIPE.format(**family).split("---")
    for name, doc, uses in [
        ("pair", docs[2], {}),
        ("soup", docs[1], {"pair": "pair"}),
        ("out", docs[0], {"soup": "soup"}),
    ]:
        text = "\n".join(line for line in doc.splitlines() if not line.startswith("name:"))
        for ref, folder in uses.items():
            text = re.sub(rf"model: {ref}\b", f"model: {by_hand / folder}", text)
        (tmp_path / f"{name}.yaml").write_text(text)
        run_merge(tmp_path / f"{name}.yaml", by_hand / name, progress=False)
    ours, expected = (
        load_file(tmp_path / "out" / "model.safetensors"),
        load_file(by_hand / "out" / "model.safetensors"),
    )
    assert all(torch.equal(ours[k], expected[k]) for k in expected)
    saved = (tmp_path / "out" / "mergekit_config.yml").read_text()
    assert "model: ../mid/soup" in saved and str(tmp_path) not in saved  # the intermediate it used, relative


def test_up_to_date_intermediates_are_reused_and_changed_ones_refused_without_force(tmp_path, family):
    recipe = _write(tmp_path, RECIPE, family)
    run_merge_file(recipe, tmp_path / "out", intermediate_dir=tmp_path / "mid", progress=False)
    stamp = os.stat(tmp_path / "mid" / "pair" / "model.safetensors").st_mtime_ns
    # Rerun: both intermediates are reused; the final output exists, so it needs --force.
    with pytest.raises(DamError, match="not empty; pass --force"):
        run_merge_file(recipe, tmp_path / "out", intermediate_dir=tmp_path / "mid", progress=False)
    summaries = run_merge_file(recipe, tmp_path / "out", intermediate_dir=tmp_path / "mid", force=True, progress=False)
    assert [s.out.name for s in summaries] == ["out"]
    assert os.stat(tmp_path / "mid" / "pair" / "model.safetensors").st_mtime_ns == stamp
    changed = _write(tmp_path, RECIPE.replace("weight: 0.3", "weight: 0.4"), family)
    with pytest.raises(DamError, match="pair is not empty; pass --force"):
        run_merge_file(changed, tmp_path / "out2", intermediate_dir=tmp_path / "mid", progress=False)


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda t: t, "named documents \\(soup, pair\\): pass --intermediate-dir"),
        (lambda t: t.replace("name: soup", "name: pair"), "more than one name 'pair'"),
        (lambda t: t.replace("merge_method: slerp", "name: final\nmerge_method: slerp"), "no unnamed document"),
        (lambda t: t.replace("{{model: {s0}, parameters", "{{model: soup, parameters"), "circular dependency: "),
        (lambda t: t.replace("{{model: {s0}, parameters", "{{model: pair, parameters"), "'pair' uses its own output"),
        (lambda t: t.replace("name: pair", "name: ../pair"), "must be a plain folder name"),
        (lambda t: t.replace("parameters: {{t: 0.5}}", "parameters: {{t: 0.5, bogus: 1}}"), "document 1: "),
    ],
)
def test_bad_recipes_fail_before_any_merge(tmp_path, family, edit, message):
    recipe = _write(tmp_path, edit(RECIPE), family)
    intermediate = None if "intermediate-dir" in message else tmp_path / "mid"
    with pytest.raises(DamError, match=message):
        run_merge_file(recipe, tmp_path / "out", intermediate_dir=intermediate, progress=False)
    assert not (tmp_path / "mid").exists() and not (tmp_path / "out").exists()


def test_cli_runs_a_recipe_and_dry_run_plans_only_what_it_can(tmp_path, family, capsys):
    recipe = _write(tmp_path, RECIPE, family)
    assert (
        main(["merge", str(recipe), str(tmp_path / "out"), "--intermediate-dir", str(tmp_path / "mid"), "--dry-run"])
        == 0
    )
    assert capsys.readouterr().out.count("dry run:") == 1  # only "pair": the others use unbuilt intermediates
    assert not (tmp_path / "mid").exists()
    assert (
        main(["merge", str(recipe), str(tmp_path / "out"), "--quiet", "--intermediate-dir", str(tmp_path / "mid")])
        == 0
    )
    assert (tmp_path / "out" / "model.safetensors").is_file() and (tmp_path / "mid" / "soup" / "config.json").is_file()
