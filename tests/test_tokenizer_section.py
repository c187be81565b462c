"""mergekit's ``tokenizer:`` section (and ``tokenizer_source: union``): the output vocabulary (union, base or a
model's), every model's embedding and lm_head rows rebuilt to it (each default rule for a token a model lacks,
token overrides, ``pad_to_multiple_of``), the written tokenizer and ``vocab_size``; parity with mergekit-yaml on
tiny models whose vocabularies differ."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mergekit_run import mergekit_merge
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from dam.errors import DamError
from dam.merge.engine import run_merge
from dam.merge.vocabulary import TokenSource, VocabularyPlan, stripped_tokenizer
from dam.testing import make_family

# float32 throughout; rows are copies or means of at most 4 rows, merged by sums of at most 4 terms: 1e-6 absolute
# covers the summation-order rounding
ATOL = 1e-6
VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")


def _vocab(folder: Path) -> dict[str, int]:
    return AutoTokenizer.from_pretrained(folder).get_vocab()


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A base and three fine-tunes whose vocabularies differ from the base's 87 character tokens (vocab_size 128):
    ``extra`` adds two special chat tokens; ``other`` swaps the ids of ``a`` and ``b`` and has ``<qq>`` where the
    others have ``q`` (so ``q`` is missing from it); ``wide`` has 136 embedding rows and two added tokens, one of
    them ``extra``'s ``<|im_end|>`` (not special there)."""
    root = tmp_path_factory.mktemp("tok")
    base, (extra, other, wide) = make_family(root, 3, num_layers=2)
    tokenizer = AutoTokenizer.from_pretrained(extra)
    tokenizer.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    tokenizer.save_pretrained(extra)
    data = json.loads((other / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]
    vocab["<qq>"] = vocab.pop("q")
    (other / "tokenizer.json").write_text(json.dumps(data))
    weights = load_file(wide / "model.safetensors")
    generator = torch.Generator().manual_seed(5)
    for name in VOCAB_TENSORS:
        weights[name] = torch.cat([weights[name], torch.randn(8, weights[name].shape[1], generator=generator)])
    save_file(weights, wide / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((wide / "config.json").read_text())
    (wide / "config.json").write_text(json.dumps({**config, "vocab_size": 136}))
    tokenizer = AutoTokenizer.from_pretrained(wide)
    tokenizer.add_tokens(["<tool>", "<|im_end|>"])
    tokenizer.save_pretrained(wide)
    return {"base": base, "extra": extra, "other": other, "wide": wide}


LINEAR = (
    "merge_method: linear\nbase_model: {base}\nmodels:\n  - {{model: {base}, parameters: {{weight: 1.0}}}}\n"
    "  - {{model: {extra}, parameters: {{weight: 0.5}}}}\n  - {{model: {other}, parameters: {{weight: 0.3}}}}\n"
    "  - {{model: {wide}, parameters: {{weight: 0.2}}}}\ndtype: float32\n"
)
TIES = (
    "merge_method: ties\nbase_model: {base}\nmodels:\n"
    "  - {{model: {extra}, parameters: {{weight: 0.6, density: 0.5}}}}\n"
    "  - {{model: {other}, parameters: {{weight: 0.4, density: 0.7}}}}\n"
    "  - {{model: {wide}, parameters: {{weight: 0.4, density: 0.7}}}}\ndtype: float32\n"
)
OVERRIDES = """  pad_to_multiple_of: 32
  tokens:
    "<|im_start|>": {{source: {extra}}}
    "<new>": {{source: {{kind: model_token, model: {other}, token: "<qq>"}}}}
    x: {{source: {other}, force: true}}
    "<unk>": {{source: {{kind: zero}}, force: true}}
"""
CASES = {
    "linear_union": LINEAR + "tokenizer:\n  source: union\n",
    "linear_base": LINEAR + "tokenizer:\n  source: base\n" + OVERRIDES,
    "linear_named": LINEAR + "tokenizer:\n  source: {other}\n  pad_to_multiple_of: 64\n",
    "ties_union": TIES + "tokenizer:\n  source: union\n" + OVERRIDES,
    "ties_base": TIES + "tokenizer:\n  source: base\n",
    # no long padding under ties: padding rows are copies of one row, so their task-vector magnitudes tie at the
    # top-density threshold, where dam and mergekit keep different (equal) entries (README: the ties tie rule)
    "ties_named": TIES + "tokenizer:\n  source: {extra}\n",
    "task_arithmetic_old_union": "merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n"
    "  - {{model: {extra}, parameters: {{weight: 0.5}}}}\n  - {{model: {wide}, parameters: {{weight: 0.5}}}}\n"
    "dtype: float32\ntokenizer_source: union\n",
}


def _config(tmp_path: Path, family: dict[str, Path], case: str) -> Path:
    path = tmp_path / f"{case}.yaml"
    path.write_text(CASES[case].format(**family))
    return path


def test_each_default_rule_override_and_padding() -> None:
    """align() on hand-made rows: model k's row of token i is 100 k + i (2 features, the second 0)."""
    models = ("base", "m1", "m2")
    ids = {  # output tokens 0-6 -> each model's own row (-1: the model lacks the token)
        "base": torch.tensor([0, 1, 2, -1, -1, -1, 3]),
        "m1": torch.tensor([0, 2, -1, 1, -1, 3, 4]),
        "m2": torch.tensor([1, 0, 2, 3, -1, 4, -1]),
    }
    tensors = [torch.stack([100.0 * k + torch.arange(6.0), torch.zeros(6)], dim=1) for k in range(3)]
    tokens = {
        5: TokenSource(model="m2", row=None, force=False),  # m2's own row of token 5, to the model lacking it
        6: TokenSource(model="m1", row=0, force=True),  # m1's row 0, to every model
    }
    plan = VocabularyPlan(tokenizer=None, rows=7, size=8, ids=ids, tokens=tokens)
    out = [t[:, 0] for t in plan.align(tensors, models, base_index=0)]
    # token 2: base and m2 have it -> the base's row (2); token 3: m1 and m2 -> their mean (101 + 203) / 2;
    # token 4: nobody -> 0; token 5: m1 and m2 have it, base gets m2's (204); token 6: forced to m1's row 0 (100)
    assert out[0].tolist()[:7] == [0, 1, 2, 152, 0, 204, 100]
    assert out[1].tolist()[:7] == [100, 102, 2, 101, 0, 103, 100]
    assert out[2].tolist()[:7] == [201, 200, 202, 203, 0, 204, 100]
    for row in out:
        assert row[7] == pytest.approx(row[:7].mean().item())  # the padding row: the model's mean row
    without_base = plan.align(tensors, models, base_index=None)[1][:, 0]  # m1, which lacks token 2
    assert without_base[2] == (2 + 202) / 2  # no base among the models: the mean of those having the token


def test_tokens_past_vocab_size_are_stripped_from_a_bpe_tokenizer(tmp_path: Path) -> None:
    """mergekit's stripped base tokenizer: tokens at ids >= vocab_size leave the vocabulary, and so do the merges
    that produce them; other vocabularies with such tokens are refused."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"a": 0, "b": 1, "c": 2, "ab": 3, "z": 4, "zz": 5}
    bpe = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b"), ("z", "z")])))
    bpe.add_tokens(["<x>"])  # id 6
    bpe.save_pretrained(tmp_path / "bpe")
    stripped = stripped_tokenizer(tmp_path / "bpe", 4)
    assert stripped.get_vocab() == {"a": 0, "b": 1, "c": 2, "ab": 3}
    assert json.loads(stripped.backend_tokenizer.to_str())["model"]["merges"] == [["a", "b"]]
    assert stripped_tokenizer(tmp_path / "bpe", 8).get_vocab() == vocab | {"<x>": 6}  # nothing past vocab_size
    words = Tokenizer(models.WordLevel(vocab=vocab, unk_token="a"))
    PreTrainedTokenizerFast(tokenizer_object=words).save_pretrained(tmp_path / "words")
    with pytest.raises(DamError, match="has tokens past its vocab_size 4 and a WordLevel vocabulary"):
        stripped_tokenizer(tmp_path / "words", 4)


def test_union_vocabulary_rows_and_written_files(family: dict[str, Path], tmp_path: Path) -> None:
    run_merge(_config(tmp_path, family, "linear_union"), tmp_path / "out", progress=False)
    vocab = _vocab(tmp_path / "out")
    base_vocab = _vocab(family["base"])
    added = ["<qq>", "<|im_start|>", "<|im_end|>", "<tool>"]  # new tokens in model order, base first
    assert vocab == base_vocab | {t: len(base_vocab) + i for i, t in enumerate(added)}
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == len(vocab) == 91
    out = load_file(tmp_path / "out" / "model.safetensors")
    inputs = {m: load_file(family[m] / "model.safetensors") for m in ("base", "extra", "other", "wide")}
    own = {m: _vocab(family[m]) for m in inputs}
    weights = {"base": 1.0, "extra": 0.5, "other": 0.3, "wide": 0.2}
    for name in VOCAB_TENSORS:
        for token in ("a", "q", "<qq>", "<|im_end|>", "<tool>"):
            rows = {m: inputs[m][name][own[m][token]] for m in inputs if token in own[m]}
            if "base" in rows:  # the base has the token: every model lacking it takes the base's row
                default = rows["base"]
            else:
                default = sum(rows.values()) / len(rows)  # the mean of the models that have it (one: its row)
            expected = sum(w * rows.get(m, default) for m, w in weights.items()) / sum(weights.values())
            torch.testing.assert_close(out[name][vocab[token]], expected, atol=ATOL, rtol=0)


def test_bad_token_sources_and_models_are_refused(family: dict[str, Path], tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    base, other = family["base"], family["other"]
    from_base = f"{{kind: model_token, model: {base}, token: '<qq>'}}"
    refusals = {
        "tokenizer: {source: nowhere/model}": "tokenizer.source 'nowhere/model'",
        f"tokenizer: {{tokens: {{q: {{source: {other}}}}}}}": r"tokenizer.tokens.q: model .* no token 'q'",
        "tokenizer: {tokens: {'<z>': {}}}": r"tokenizer.tokens.<z>: .* needs a source",
        f"tokenizer: {{source: base, tokens: {{x: {{source: {from_base}}}}}}}": "no token '<qq>' in model",
    }
    for section, message in refusals.items():
        config.write_text(TIES.format(**family) + section + "\n")
        with pytest.raises(DamError, match=message):
            run_merge(config, tmp_path / "out", progress=False)
    config.write_text(TIES.format(**family))  # no tokenizer section: other vocabulary sizes are refused
    with pytest.raises(DamError, match=r"vocab size mismatch: .* add a `tokenizer:` section"):
        run_merge(config, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # one mergekit-yaml subprocess for seven configs
def test_tokenizer_section_matches_mergekit(family: dict[str, Path], tmp_path: Path) -> None:
    """Every tensor to 1e-6 and the written vocabulary. mergekit builds a union from ``set(referenced_models)``,
    whose order follows Python's string hashing (it changes between runs), so the ids of a union's added tokens
    may come in another order than dam's (config order): union outputs are compared token by token, and the
    base's tokens keep their ids in both."""
    pytest.importorskip("mergekit")  # the reference; a dev extra, absent from the minimum-versions environment
    configs = {case: _config(tmp_path, family, case) for case in CASES}
    mergekit_merge({config: tmp_path / f"mk_{case}" for case, config in configs.items()})
    for case, config in configs.items():
        ours_dir, theirs_dir = tmp_path / f"dam_{case}", tmp_path / f"mk_{case}"
        run_merge(config, ours_dir, progress=False)
        ours = load_file(ours_dir / "model.safetensors")
        theirs = {}
        for file in theirs_dir.glob("*.safetensors"):
            theirs.update(load_file(file))
        vocab, mk_vocab = _vocab(ours_dir), _vocab(theirs_dir)
        if "union" in case:
            assert set(vocab) == set(mk_vocab), case
            assert all(vocab[t] == mk_vocab[t] for t in _vocab(family["base"])), case
        else:
            assert vocab == mk_vocab, case
        order = sorted(vocab, key=vocab.__getitem__)
        ids, mk_ids = torch.tensor([vocab[t] for t in order]), torch.tensor([mk_vocab[t] for t in order])
        assert set(theirs) == set(ours), case
        for name, tensor in theirs.items():
            mine = ours[name]
            assert mine.shape == tensor.shape, (case, name)
            if name in VOCAB_TENSORS:  # token by token, then the padding rows
                mine, tensor = (
                    torch.cat([mine[ids], mine[len(ids) :]]),
                    torch.cat([tensor[mk_ids], tensor[len(ids) :]]),
                )
            assert torch.allclose(mine, tensor, atol=ATOL, rtol=0), (case, name)
        mk_config = json.loads((theirs_dir / "config.json").read_text())
        assert json.loads((ours_dir / "config.json").read_text())["vocab_size"] == mk_config["vocab_size"], case
