"""mergekit's ``tokenizer:`` section for models sharing one vocabulary: rows aligned to the tokenizer (rows past it
dropped), forced token overrides, ``pad_to_multiple_of``; parity with mergekit-yaml; other vocabularies refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from mergekit_run import mergekit_merge
from safetensors.torch import load_file

from dam.errors import DamError
from dam.merge.engine import run_merge
from dam.merge.vocabulary import read_vocabulary
from dam.testing import make_family

# float32 throughout; linear sums of 3 rows: 1e-6 absolute covers the summation-order rounding
ATOL = 1e-6

SECTION = """tokenizer:
  source: {source}
  pad_to_multiple_of: 32
  tokens:
    x: {{source: {s1}, force: true}}
    "<unk>": {{source: {{kind: zero}}, force: true}}
    y: {{source: {{kind: model_token, model: {s0}, token: z}}, force: true}}
    q: {{source: {s0}}}
"""
CASES = {
    "linear_base": "merge_method: linear\nmodels:\n  - {{model: {base}}}\n  - {{model: {s0}}}\n  - {{model: {s1}}}\n"
    "parameters: {{weight: 1.0}}\nbase_model: {base}\ndtype: float32\n" + SECTION,
    "ties_union": "merge_method: ties\nbase_model: {base}\nmodels:\n"
    "  - {{model: {s0}, parameters: {{weight: 0.6, density: 0.5}}}}\n"
    "  - {{model: {s1}, parameters: {{weight: 0.4, density: 0.7}}}}\ndtype: float32\n"
    "tokenizer: {{source: union}}\n",
    "slerp_model_source": "merge_method: slerp\nbase_model: {base}\nmodels:\n"
    "  - {{model: {base}}}\n  - {{model: {s1}}}\nparameters: {{t: 0.3}}\ndtype: float32\n"
    + SECTION.replace("source: {source}", "source: {s1}", 1).replace("{s0}", "{base}"),  # s0 is not merged
}


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tok")
    base, (s0, s1) = make_family(root, 2, num_layers=2)
    return {"base": base, "s0": s0, "s1": s1}


def _config(tmp_path: Path, family: dict[str, Path], case: str) -> Path:
    path = tmp_path / f"{case}.yaml"
    path.write_text(CASES[case].format(source="base", **family))
    return path


def test_rows_are_aligned_overridden_and_padded(family: dict[str, Path], tmp_path: Path) -> None:
    run_merge(_config(tmp_path, family, "linear_base"), tmp_path / "out", progress=False)
    out = load_file(tmp_path / "out" / "model.safetensors")
    vocab = read_vocabulary(family["base"], 128)
    assert vocab is not None and (n := len(vocab)) == 87  # the character tokenizer's tokens, below vocab_size 128
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == 96  # 87 up to 32k
    inputs = [load_file(family[m] / "model.safetensors") for m in ("base", "s0", "s1")]
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        rows = [t[name][:n].clone() for t in inputs]
        for r in rows:
            r[vocab["x"]] = inputs[2][name][vocab["x"]]
            r[vocab["<unk>"]] = 0
            r[vocab["y"]] = inputs[1][name][vocab["z"]]
        expected = sum(rows) / 3  # linear, equal weights, normalized: the mean of the three aligned tensors
        padding = sum(r.mean(0) for r in rows) / 3  # each model's extra rows are the mean of its aligned rows
        assert out[name].shape == (96, 32)
        torch.testing.assert_close(out[name][:n], expected, atol=ATOL, rtol=0)
        torch.testing.assert_close(out[name][n:], padding.expand(96 - n, 32), atol=ATOL, rtol=0)
    assert read_vocabulary(tmp_path / "out", None) == vocab


def test_other_vocabularies_and_bad_sources_are_refused(family: dict[str, Path], tmp_path: Path) -> None:
    other = tmp_path / "other"
    shutil.copytree(family["s0"], other)
    data = json.loads((other / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]
    (other / "tokenizer.json").write_text(json.dumps(data))
    config = tmp_path / "c.yaml"
    config.write_text(CASES["ties_union"].format(**{**family, "s0": other}))
    with pytest.raises(DamError, match=r"has another vocabulary .*first difference: token 'a', id 5 vs 4"):
        run_merge(config, tmp_path / "out", progress=False)
    config.write_text(CASES["ties_union"].format(**family).replace("source: union", "source: nowhere/model"))
    with pytest.raises(DamError, match="tokenizer.source 'nowhere/model'"):
        run_merge(config, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # one mergekit-yaml subprocess for three configs
def test_tokenizer_section_matches_mergekit(family: dict[str, Path], tmp_path: Path) -> None:
    configs = {case: _config(tmp_path, family, case) for case in CASES}
    mergekit_merge({config: tmp_path / f"mk_{case}" for case, config in configs.items()})
    for case, config in configs.items():
        run_merge(config, tmp_path / f"dam_{case}", progress=False)
        ours = load_file(tmp_path / f"dam_{case}" / "model.safetensors")
        theirs = {}
        for file in (tmp_path / f"mk_{case}").glob("*.safetensors"):
            theirs.update(load_file(file))
        assert set(theirs) == set(ours), case
        for name, tensor in theirs.items():
            assert torch.allclose(ours[name], tensor, atol=ATOL, rtol=0), (case, name)
        mk_config = json.loads((tmp_path / f"mk_{case}" / "config.json").read_text())
        assert (
            json.loads((tmp_path / f"dam_{case}" / "config.json").read_text())["vocab_size"] == mk_config["vocab_size"]
        )
        assert read_vocabulary(tmp_path / f"dam_{case}", None) == read_vocabulary(tmp_path / f"mk_{case}", None)
