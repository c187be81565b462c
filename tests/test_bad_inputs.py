"""The bad-input catalogue: every input file dam reads, cut in half or overwritten with garbage, through the commands
that read it (dam merge, dam train, dam export, dam eval), and the bad LoRA sources, tokenizer and chat-template
sections, multi-document recipes, resumes and pushes. Every case ends with exit status 1, exactly one ``error:``
line on stderr naming what is at fault, no traceback, and nothing partial at the output path.

Cases run in this process (``dam.cli.main``) on the tiny models of :mod:`dam.testing`: about a second each.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from tiny_run import TINY, tiny_overrides

from dam.adaptive.coefficients import COEFFICIENTS_FILE, read_coefficients, save_coefficients
from dam.cli import main
from dam.testing import make_family

ROOT = Path(__file__).resolve().parents[1]
TASK = ROOT / "data" / "examples" / "reverse.jsonl"


def truncate(file: Path) -> None:
    """Cut in half: a copy or a download that stopped, a full disk."""
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def garbage(file: Path) -> None:
    """The same number of bytes, none of them valid for the format (and not UTF-8: 0xff never is)."""
    size = max(file.stat().st_size, 16)
    file.write_bytes((b"\xff\x00garbage{[\x01" * (size // 12 + 1))[:size])


DAMAGES = {"truncated": truncate, "garbage": garbage}
HALF = {"weight": 0.5}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny family (base, 3 sources), a LoRA adapter of source0, a sharded copy of source1 (index + 2 shards)
    and a coefficients file of a DAM merge of base and sources: the pristine inputs each case copies."""
    from test_lora import make_adapter
    from transformers import AutoModelForCausalLM

    from dam.adaptive.model import DAMModel

    root = tmp_path_factory.mktemp("bad_inputs")
    base, sources = make_family(root / "family", 3, num_layers=2)
    adapter = make_adapter(sources[0], root / "adapter", 1, r=2, target_modules=["q_proj"])
    sharded = root / "sharded"
    AutoModelForCausalLM.from_pretrained(sources[1]).save_pretrained(sharded, max_shard_size="60KB")
    for file in sources[1].glob("*.json"):
        if not (sharded / file.name).exists():
            shutil.copy2(file, sharded / file.name)
    assert len(list(sharded.glob("model-*.safetensors"))) == 2
    coefficients = root / "coefficients" / COEFFICIENTS_FILE
    DAMModel.from_pretrained(str(base), [str(s) for s in sources]).save_coefficients(coefficients)
    return {
        "root": root,
        "base": base,
        "source0": sources[0],
        "source1": sources[1],
        "source2": sources[2],
        "adapter": adapter,
        "sharded": sharded,
        "coefficients": coefficients,
    }


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run ``dam ARGV`` in this process and check the contract: exit 1, one ``error:`` line, no traceback.
    Returns that line."""
    status = main(argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert status == 1, f"exit status {status}; stderr:\n{err[-3000:]}"
    assert len(errors) == 1, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    return errors[0]


# --------------------------------------------------------------------------------------- damaged input files


def _copy_of(world: dict[str, Path], folder: str, tmp_path: Path) -> Path:
    copy = tmp_path / folder
    shutil.copytree(world[folder], copy)
    return copy


def _merge(world: dict[str, Path], model: str, tmp_path: Path) -> tuple[list[str], Path]:
    """``dam merge`` of MODEL with source2 (linear): the command, and OUT."""
    config = tmp_path / "merge.yaml"
    models = [{"model": model, "parameters": HALF}, {"model": str(world["source2"]), "parameters": HALF}]
    config.write_text(yaml.safe_dump({"merge_method": "linear", "models": models}))
    return ["merge", str(config), str(tmp_path / "out"), "--quiet"], tmp_path / "out"


def _train(world: dict[str, Path], model: str, tmp_path: Path, role: str = "source") -> tuple[list[str], Path]:
    """``dam train`` of the tiny config with MODEL as the first source (or the base): the command, and OUT (the
    run's merged/)."""
    base = model if role == "base" else str(world["base"])
    sources = [world["source1"], world["source2"], world["source0"]] if role == "base" else [model, *_others(world)]
    overrides = tiny_overrides(base, sources, tmp_path / "run", "train.max_steps=1")  # type: ignore[arg-type]
    return ["train", str(TINY), *overrides], tmp_path / "run" / "merged"


def _others(world: dict[str, Path]) -> list[Path]:
    return [world["source1"], world["source2"]]


def _export(world: dict[str, Path], model: str, tmp_path: Path, role: str = "source") -> tuple[list[str], Path]:
    """``dam export`` of a coefficients file whose first source (or base) is MODEL: the command, and OUT."""
    tensors, metadata = read_coefficients(world["coefficients"])
    if role == "base":
        metadata["base_model"] = model
    else:
        metadata["sources"] = [model, *metadata["sources"][1:]]
    coefficients = save_coefficients(tmp_path / "coefficients" / COEFFICIENTS_FILE, tensors, metadata)
    return ["export", str(coefficients), str(tmp_path / "out")], tmp_path / "out"


def _eval(world: dict[str, Path], model: str, tmp_path: Path) -> tuple[list[str], Path]:
    """``dam eval`` of MODEL on two examples: the command (it writes nothing)."""
    return ["eval", model, "--tasks", str(TASK), "--limit", "2", "--batch-size", "2"], tmp_path / "nothing"


COMMANDS: dict[str, Callable[..., tuple[list[str], Path]]] = {
    "merge": _merge,
    "train": _train,
    "export": _export,
    "eval": _eval,
}

# (folder copied, file damaged in it, how the command names the model); "lora": MODEL+ADAPTER, the adapter damaged
FILES = {
    "adapter_model.safetensors": ("adapter", "adapter_model.safetensors", "lora"),
    "adapter_config.json": ("adapter", "adapter_config.json", "lora"),
    "model.safetensors": ("source0", "model.safetensors", "model"),
    "config.json": ("source0", "config.json", "model"),
    "tokenizer.json": ("source0", "tokenizer.json", "model"),
    "tokenizer_config.json": ("source0", "tokenizer_config.json", "model"),
    "shard": ("sharded", "model-00001-of-00002.safetensors", "model"),
    "shard index": ("sharded", "model.safetensors.index.json", "model"),
}


def _file_cases() -> list:
    cases = []
    for command in COMMANDS:
        for file in FILES:  # a merge's tokenizer files are its first model's (the donor's), read before merging
            for damage in DAMAGES:
                cases.append(pytest.param(command, file, damage, id=f"{command}-{file}-{damage}"))
    return cases


@pytest.mark.parametrize(("command", "file", "damage"), _file_cases())
def test_a_damaged_input_file_is_one_error_line(
    world: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str, file: str, damage: str
) -> None:
    folder, name, form = FILES[file]
    copy = _copy_of(world, folder, tmp_path)
    model = f"{world['source0']}+{copy}" if form == "lora" else str(copy)
    argv, out = COMMANDS[command](world, model, tmp_path)
    DAMAGES[damage](copy / name)
    line = run_cli(argv, capsys)
    assert str(copy) in line, f"the error does not name the damaged model or file: {line}"
    assert not out.exists(), f"{out} was left behind"
    if command == "train":
        assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize(
    "header",
    [b"[1, 2]", b'{"w": 1}', b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}'],
    ids=["list", "entry-not-a-mapping", "offsets-backwards"],
)
def test_a_safetensors_header_that_parses_but_is_wrong(
    world: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], header: bytes
) -> None:
    """Garbage that happens to be JSON where the header belongs: refused when the header is read, not later."""
    copy = _copy_of(world, "source0", tmp_path)
    (copy / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(8))
    argv, out = _merge(world, str(copy), tmp_path)
    line = run_cli(argv, capsys)
    assert f"{copy / 'model.safetensors'}: not a valid safetensors file" in line and not out.exists(), line


@pytest.mark.parametrize("damage", list(DAMAGES))
@pytest.mark.parametrize("file", ["config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"])
def test_a_damaged_base_file_is_one_error_line_in_export_and_train(
    world: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], file: str, damage: str
) -> None:
    """The base's config, tokenizer and generation config: dam export reads or copies them (a damaged one is
    named, not copied into the output), dam train loads them."""
    copy = _copy_of(world, "base", tmp_path)
    DAMAGES[damage](copy / file)
    for command in (_export, _train):
        argv, out = command(world, str(copy), tmp_path, role="base")
        if command is _train and file == "generation_config.json":
            continue  # training reads no generation config; export copies it
        line = run_cli(argv, capsys)
        assert str(copy) in line and not out.exists(), line


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damaged_config_files(
    world: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: str
) -> None:
    """The merge YAML and the coefficients file themselves. (Half a YAML file may still parse: its error names
    what is wrong in what is left.)"""
    argv, out = _merge(world, str(world["source0"]), tmp_path)
    DAMAGES[damage](Path(argv[1]))
    line = run_cli(argv, capsys)
    assert (argv[1] in line or damage == "truncated") and not out.exists(), line

    coefficients = tmp_path / "coefficients.safetensors"
    shutil.copy2(world["coefficients"], coefficients)
    DAMAGES[damage](coefficients)
    assert str(coefficients) in run_cli(["export", str(coefficients), str(tmp_path / "exported")], capsys)
    assert not (tmp_path / "exported").exists()


def test_a_garbage_run_config_is_one_error_line(
    world: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "dam.yaml"
    shutil.copy2(TINY, config)
    garbage(config)
    assert str(config) in run_cli(["train", str(config)], capsys)


# -------------------------------------------------------------------------------------------- LoRA sources


def test_bad_lora_references(world: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An adapter folder without its files, of another model, or with values dam cannot apply."""
    s0, adapter = world["source0"], world["adapter"]
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = {
        f"{s0}+{empty}": "no adapter_config.json",
        f"{s0}+{tmp_path / 'absent'}": "folder not found",
        f"{s0}+{adapter}+{adapter}": "expected MODEL or MODEL\\+LORA_ADAPTER",
        f"{s0}+{world['source1']}": "no adapter_config.json",  # a model folder, not an adapter
    }
    no_weights = _copy_of(world, "adapter", tmp_path)
    (no_weights / "adapter_model.safetensors").unlink()
    cases[f"{s0}+{no_weights}"] = "no adapter_model.safetensors"
    for values, shown in (
        ({"lora_alpha": "eight"}, "lora_alpha of .* must be a number"),
        ({"alpha_pattern": {"q_proj(": 2}}, "alpha_pattern 'q_proj\\(' is not a regex"),
        ({"peft_type": "IA3"}, "peft_type IA3 is not supported"),
    ):
        edited = tmp_path / f"edited{len(cases)}"
        shutil.copytree(adapter, edited)
        config = json.loads((edited / "adapter_config.json").read_text())
        (edited / "adapter_config.json").write_text(json.dumps(config | values))
        cases[f"{s0}+{edited}"] = shown
    listed = tmp_path / "listed"
    shutil.copytree(adapter, listed)
    (listed / "adapter_config.json").write_text("[1, 2]")
    cases[f"{s0}+{listed}"] = "holds a list, not a mapping"
    for i, (reference, shown) in enumerate(cases.items()):
        (tmp_path / f"case{i}").mkdir()
        argv, out = _merge(world, reference, tmp_path / f"case{i}")
        line = run_cli(argv, capsys)
        assert re.search(shown, line), (reference, line)
        assert not out.exists()


# ---------------------------------------------------------------------- tokenizer and chat_template sections


@pytest.mark.parametrize("damage", list(DAMAGES))
@pytest.mark.parametrize(
    ("section", "file"),
    [
        ({"tokenizer": {"source": "union"}}, "tokenizer.json"),
        ({"tokenizer": {"source": "base"}}, "tokenizer_config.json"),
        ({"chat_template": "auto"}, "tokenizer_config.json"),
    ],
    ids=["union-tokenizer.json", "base-tokenizer_config.json", "chat_template-tokenizer_config.json"],
)
def test_tokenizer_and_chat_template_sections_with_a_damaged_base(
    world: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], section: dict, file: str, damage: str
) -> None:
    base = _copy_of(world, "base", tmp_path)
    DAMAGES[damage](base / file)
    config = tmp_path / "merge.yaml"
    models = [{"model": str(base), "parameters": HALF}, {"model": str(world["source1"]), "parameters": HALF}]
    config.write_text(yaml.safe_dump({"merge_method": "linear", "base_model": str(base), "models": models, **section}))
    line = run_cli(["merge", str(config), str(tmp_path / "out"), "--quiet"], capsys)
    assert str(base) in line and not (tmp_path / "out").exists(), line


@pytest.mark.parametrize(
    ("section", "shown"),
    [
        ({"tokenizer": {"source": "nobody"}}, "tokenizer"),
        ({"tokenizer": {"source": "union", "tokens": {"<x>": {"source": "nobody"}}}}, "nobody"),
        ({"chat_template": "short"}, "neither 'auto', a built-in template"),
        ({"tokenizer_source": "nobody"}, "tokenizer_source"),
    ],
    ids=["unknown-source", "unknown-token-source", "not-a-template", "unknown-tokenizer_source"],
)
def test_bad_tokenizer_and_chat_template_sections(
    world: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], section: dict, shown: str
) -> None:
    config = tmp_path / "merge.yaml"
    models = [{"model": str(world["base"]), "parameters": HALF}, {"model": str(world["source1"]), "parameters": HALF}]
    data = {"merge_method": "linear", "base_model": str(world["base"]), "models": models, **section}
    config.write_text(yaml.safe_dump(data))
    line = run_cli(["merge", str(config), str(tmp_path / "out"), "--quiet"], capsys)
    assert shown in line and not (tmp_path / "out").exists(), line


# ----------------------------------------------------------------------------------- multi-document recipes


def _recipe(world: dict[str, Path], tmp_path: Path) -> Path:
    """Two documents: ``soup`` (named, into the intermediate folder) and the final merge, which uses it."""
    soup = [{"model": str(world["source0"]), "parameters": HALF}, {"model": str(world["source1"]), "parameters": HALF}]
    first = {"name": "soup", "merge_method": "linear", "models": soup}
    final = {"merge_method": "linear", "models": [{"model": "soup", "parameters": HALF}]}
    final["models"].append({"model": str(world["base"]), "parameters": HALF})
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump_all([first, final], sort_keys=False))
    return recipe


def test_bad_recipes(world: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A recipe cut before its final document, a garbage one, one without --intermediate-dir, and one whose
    up-to-date intermediate output was damaged since: one line each, no OUT."""
    recipe = _recipe(world, tmp_path)
    out, steps = tmp_path / "out", tmp_path / "steps"
    command = ["merge", str(recipe), str(out), "--quiet", "--intermediate-dir", str(steps)]
    assert "pass --intermediate-dir DIR" in run_cli(command[:4], capsys)
    cut = tmp_path / "cut.yaml"
    cut.write_text(recipe.read_text().split("---")[0])  # the final document lost
    assert "no unnamed document" in run_cli(["merge", str(cut), str(out), "--quiet"], capsys)
    rubbish = tmp_path / "rubbish.yaml"
    shutil.copy2(recipe, rubbish)
    garbage(rubbish)
    assert "not a text (UTF-8) file" in run_cli(["merge", str(rubbish), str(out), "--quiet"], capsys)
    assert not out.exists() and not steps.exists()

    assert main(command) == 0  # builds steps/soup, then OUT
    shutil.rmtree(out)
    truncate(steps / "soup" / "model.safetensors")  # its saved config is intact: reused, and its weights read
    line = run_cli(command, capsys)
    assert str(steps / "soup" / "model.safetensors") in line and not out.exists(), line
    garbage(steps / "soup" / "mergekit_config.yml")  # no longer up to date: rebuilt only with --force
    assert "pass --force" in run_cli(command, capsys) and not out.exists()
    assert main([*command, "--force"]) == 0 and (out / "model.safetensors").is_file()


# ------------------------------------------------------------------------------------------- resume and push


def test_resume_with_no_readable_checkpoint(
    world: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv, _ = _train(world, str(world["source0"]), tmp_path)
    assert main([*argv, "train.save_every=1"]) == 0
    shutil.rmtree(tmp_path / "run" / "merged")
    garbage(tmp_path / "run" / "checkpoints" / "step_1" / "optimizer.bin")
    line = run_cli([*argv, "train.max_steps=2"], capsys)
    assert line.startswith(f"error: no readable checkpoint in {tmp_path / 'run' / 'checkpoints'}"), line
    assert (
        "step_1/optimizer.bin is truncated or not a torch.save file" in line
        and not (tmp_path / "run" / "merged").exists()
    )


@pytest.mark.parametrize(
    ("options", "shown"),
    [
        (["--push-to-hub", "not a repo//id"], "not a valid Hub repo id"),
        (["--push-to-hub", "me/x", "--hub-timeout", "soon"], "--hub-timeout 'soon': expected a number of seconds"),
        (["--push-to-hub", "me/x", "--hub-timeout", "0"], "--hub-timeout '0': expected a positive"),
    ],
    ids=["repo-id", "timeout-text", "timeout-zero"],
)
def test_bad_push_options_are_refused_before_any_work(
    world: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], options: list[str], shown: str
) -> None:
    for command in (_merge, _export):
        argv, out = command(world, str(world["source0"]), tmp_path)
        assert shown in run_cli([*argv, *options], capsys) and not out.exists()
