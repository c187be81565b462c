"""An instruct family: a base without a chat template, two experts with different chat templates (one with an extra
end-of-turn EOS id) and one without. Per-source rendering, the shared-vocabulary check, and the export's
tokenizer, chat template and generation config."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from tiny_run import tiny_config
from transformers import AutoTokenizer

from dam.adaptive.export import export_merged
from dam.errors import DamError
from dam.testing import OTHER_CHAT_TEMPLATE, SIMPLE_CHAT_TEMPLATE, build_char_tokenizer, make_family
from dam.training.config import DAMConfig
from dam.training.data import build_train_dataset, load_tokenizer, source_renderings
from dam.training.loop import train

END_OF_TURN = build_char_tokenizer().convert_tokens_to_ids("|")


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """source0 (arithmetic data) speaks SIMPLE_CHAT_TEMPLATE, source1 (reverse) OTHER_CHAT_TEMPLATE and ends its
    turns with '|' (an extra EOS id); source2 (counting, plain text data) and the base have no chat template."""
    return make_family(
        tmp_path_factory.mktemp("instruct"),
        3,
        chat_templates=[None, SIMPLE_CHAT_TEMPLATE, OTHER_CHAT_TEMPLATE, None],
        eos_token_ids=[2, 2, [2, END_OF_TURN], 2],
    )


def _texts(config: DAMConfig) -> dict[int, list[str]]:
    """The rendered training texts per source index, decoded from the token ids."""
    base_tokenizer = load_tokenizer(config.base_model)
    renderings = source_renderings(base_tokenizer, config.models, config.data)
    specs = {m.name: m.dataset for m in config.models}
    rows = build_train_dataset(specs, [m.name for m in config.models], base_tokenizer, config.data, renderings)
    out: dict[int, list[str]] = {}
    for ids, k in zip(rows["input_ids"], rows["dataset_index"], strict=True):
        out.setdefault(k, []).append(base_tokenizer.decode(ids))
    return out


def test_each_source_is_rendered_with_its_own_chat_template_by_default(family, tmp_path):
    texts = _texts(tiny_config(*family, tmp_path / "run"))
    assert all(t.startswith("<|user|>") and "\n<|assistant|>" in t for t in texts[0])  # source0's own format
    assert all(t.startswith("USER: reverse: ") for t in texts[1])  # its own format (cut at max_length 32)
    assert all(t.startswith("count by ") for t in texts[2])  # text data, never rendered


def test_render_plain_and_the_refusals(family, tmp_path):
    plain = _texts(tiny_config(*family, tmp_path / "run", "models.0.render=plain", "models.1.render=plain"))
    assert all("<|" not in t and "=\n" in t and t.endswith("</s>") for t in plain[0])  # "{prompt}\n{response}"
    assert all(t.startswith("reverse: ") and "USER" not in t for t in plain[1])
    with pytest.raises(DamError, match="models.arithmetic.render is 'base' but the base tokenizer has no chat"):
        _texts(tiny_config(*family, tmp_path / "run", "models.0.render=base"))
    with pytest.raises(DamError, match="models.counting.render is 'own' but model 'counting' has no chat template"):
        _texts(tiny_config(*family, tmp_path / "run", "models.2.render=own"))
    off = _texts(tiny_config(*family, tmp_path / "run", "data.use_chat_template=false"))
    assert all("<|" not in t for t in off[0]) and all("USER" not in t for t in off[1])


def test_a_source_with_another_vocabulary_is_refused_naming_the_first_differing_token(family, tmp_path):
    base, sources = family
    other = tmp_path / "other"
    other.mkdir()
    for f in sources[2].iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    tokenizer = json.loads((other / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    vocab["x"], vocab["y"] = vocab["y"], vocab["x"]  # the same tokens under other ids
    (other / "tokenizer.json").write_text(json.dumps(tokenizer))
    config = tiny_config(base, [sources[0], sources[1], other], tmp_path / "run")
    with pytest.raises(
        DamError, match=f"model 'counting': its tokenizer has 'y' at id {vocab['y']} but the base's has 'x'"
    ):
        _texts(config)


def test_a_source_with_added_tokens_is_refused_naming_the_first(family, tmp_path):
    base, sources = family
    other = tmp_path / "other"
    shutil.copytree(sources[2], other)
    tokenizer = AutoTokenizer.from_pretrained(other)
    tokenizer.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)  # an instruct model's chat tokens
    tokenizer.save_pretrained(other)
    first = tokenizer.convert_tokens_to_ids("<|im_start|>")
    config = tiny_config(base, [sources[0], sources[1], other], tmp_path / "run")
    with pytest.raises(
        DamError, match=f"'counting': its tokenizer has '<\\|im_start\\|>' at id {first} but the base's has no"
    ):
        _texts(config)


@pytest.fixture(scope="module")
def run(family, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One training step; the export takes the base's tokenizer with source1's chat template."""
    out = tmp_path_factory.mktemp("instruct_run") / "run"
    return train(
        tiny_config(*family, out, "train.max_steps=1", "export.tokenizer_source=base", "export.chat_template=reverse")
    )


def _exported(folder: Path) -> tuple[str | None, object]:
    template = AutoTokenizer.from_pretrained(folder).chat_template
    return template, json.loads((folder / "generation_config.json").read_text())["eos_token_id"]


def test_the_export_writes_the_chosen_chat_template_and_its_eos_ids(run, tmp_path):
    assert _exported(run / "merged") == (OTHER_CHAT_TEMPLATE, [2, END_OF_TURN])
    assert _exported(export_merged(run, tmp_path / "default")) == (None, 2)  # the base's, as it is
    own = export_merged(run, tmp_path / "own", tokenizer_source="arithmetic")
    assert _exported(own) == (SIMPLE_CHAT_TEMPLATE, 2)  # the tokenizer source's own template
    jinja = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert _exported(export_merged(run, tmp_path / "jinja", tokenizer_source="reverse", chat_template=jinja)) == (
        jinja,
        [2, END_OF_TURN],  # the tokenizer source's generation config
    )


def test_export_choices_that_name_nothing_are_refused(run, tmp_path):
    with pytest.raises(DamError, match="tokenizer_source 'nope' is not one of the merge's models: base, arithmetic"):
        export_merged(run, tmp_path / "a", tokenizer_source="nope")
    with pytest.raises(DamError, match="chat_template 'counting': that model has no chat template"):
        export_merged(run, tmp_path / "b", chat_template="counting")
    with pytest.raises(DamError, match="neither one of the merge's models .* nor a Jinja template"):
        export_merged(run, tmp_path / "c", chat_template="chatml")
    assert not any((tmp_path / n).exists() for n in "abc")
