"""The ``chat_template:`` key of dam merge: auto (plurality), mergekit's built-in names, a Jinja string; parity of
the written tokenizer's template with mergekit-yaml."""

from __future__ import annotations

import importlib.resources
import json
import shutil
from pathlib import Path

import pytest
from mergekit_run import mergekit_merge
from transformers import AutoTokenizer

from dam.errors import DamError
from dam.merge.chat_template import model_chat_template, resolve_chat_template
from dam.merge.engine import run_merge
from dam.testing import SIMPLE_CHAT_TEMPLATE, make_family

OTHER_TEMPLATE = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"


def _set_template(folder: Path, template: str | None) -> None:
    for name in ("chat_template.jinja", "chat_template.json"):
        (folder / name).unlink(missing_ok=True)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    if template is not None:
        (folder / "chat_template.jinja").write_text(template)


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """base: no template; s0, s1: OTHER_TEMPLATE; s2: SIMPLE_CHAT_TEMPLATE."""
    root = tmp_path_factory.mktemp("chat")
    base, sources = make_family(root, 3, num_layers=2)
    _set_template(base, None)
    for source, template in zip(sources, [OTHER_TEMPLATE, OTHER_TEMPLATE, SIMPLE_CHAT_TEMPLATE], strict=True):
        _set_template(source, template)
    return {"base": base, "s0": sources[0], "s1": sources[1], "s2": sources[2]}


def test_resolution(family: dict[str, Path]) -> None:
    base, s0, s1, s2 = family["base"], family["s0"], family["s1"], family["s2"]
    assert model_chat_template(base) is None and model_chat_template(s2) == SIMPLE_CHAT_TEMPLATE
    assert resolve_chat_template("auto", [base, s2, s0, s1]) == OTHER_TEMPLATE.strip()  # 2 votes against 1
    assert resolve_chat_template("auto", [base, s2, s0]) == SIMPLE_CHAT_TEMPLATE.strip()  # a tie: the first listed
    assert resolve_chat_template("auto", [base]) is None
    assert resolve_chat_template(None, [s0]) is None
    assert resolve_chat_template(OTHER_TEMPLATE, [base]) == OTHER_TEMPLATE
    with pytest.raises(DamError, match="'vicuna' is neither 'auto', a built-in template"):
        resolve_chat_template("vicuna", [base])


def test_builtin_templates_are_read_from_mergekit(family: dict[str, Path]) -> None:
    pytest.importorskip("mergekit")  # a dev extra; absent from the minimum-versions environment
    chatml = importlib.resources.files("mergekit._data.chat_templates").joinpath("chatml.jinja").read_text()
    assert resolve_chat_template("chatml", [family["base"]]) == chatml


def test_builtin_template_without_mergekit_is_a_clear_error(
    family: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    def not_installed(package: str) -> None:
        raise ModuleNotFoundError(f"No module named {package.split('.')[0]!r}")

    monkeypatch.setattr(importlib.resources, "files", not_installed)
    with pytest.raises(DamError, match=r"'llama3' is one of mergekit's built-in templates.*pip install mergekit"):
        resolve_chat_template("llama3", [family["base"]])


def _config(tmp_path: Path, family: dict[str, Path], chat_template: str) -> Path:
    config = tmp_path / f"{len(list(tmp_path.iterdir()))}.yaml"
    config.write_text(
        f"merge_method: linear\nbase_model: {family['base']}\nmodels:\n"
        + "".join(f"  - {{model: {family[s]}}}\n" for s in ("s0", "s1", "s2"))
        + f"parameters: {{weight: 1.0}}\ndtype: float32\nchat_template: {json.dumps(chat_template)}\n"
    )
    return config


def test_merge_writes_the_template(family: dict[str, Path], tmp_path: Path) -> None:
    run_merge(_config(tmp_path, family, "auto"), tmp_path / "auto", progress=False)
    assert AutoTokenizer.from_pretrained(tmp_path / "auto").chat_template == OTHER_TEMPLATE.strip()
    assert "chat_template" not in json.loads((tmp_path / "auto" / "tokenizer_config.json").read_text())
    run_merge(_config(tmp_path, family, SIMPLE_CHAT_TEMPLATE), tmp_path / "given", progress=False)
    assert AutoTokenizer.from_pretrained(tmp_path / "given").chat_template == SIMPLE_CHAT_TEMPLATE


def test_bad_template_and_no_tokenizer_fail_before_writing(family: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(DamError, match="'chatm' is neither"):
        run_merge(_config(tmp_path, family, "chatm"), tmp_path / "out", progress=False)
    bare = tmp_path / "bare"
    shutil.copytree(family["base"], bare)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        (bare / name).unlink(missing_ok=True)
    with pytest.raises(DamError, match="has no tokenizer"):
        run_merge(_config(tmp_path, {**family, "base": bare}, OTHER_TEMPLATE), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # one mergekit-yaml subprocess for two configs
def test_templates_match_mergekit(family: dict[str, Path], tmp_path: Path) -> None:
    pytest.importorskip("mergekit")  # the reference; a dev extra, absent from the minimum-versions environment
    settings = {"auto": "auto", "chatml": "chatml", "jinja": SIMPLE_CHAT_TEMPLATE}
    configs = {name: _config(tmp_path, family, setting) for name, setting in settings.items()}
    mergekit_merge({config: tmp_path / f"mk_{name}" for name, config in configs.items()})
    for name, config in configs.items():
        run_merge(config, tmp_path / f"dam_{name}", progress=False)
        theirs = AutoTokenizer.from_pretrained(tmp_path / f"mk_{name}").chat_template
        assert AutoTokenizer.from_pretrained(tmp_path / f"dam_{name}").chat_template == theirs, name
