"""The training-run config: YAML loading, overrides (dotted and the sweep agent's --key=value), errors naming the
key, and every file under configs/dam, configs/accelerate and configs/sweeps."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dam.errors import DamError
from dam.training.config import (
    DAMConfig,
    apply_override,
    load_config,
    load_saved_config,
    portable_config,
    save_config,
)

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "dam" / "tiny.yaml"


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def minimal() -> dict:
    return {
        "base_model": "base",
        "models": [
            {"name": "a", "model": "m0", "dataset": "d0.jsonl"},
            {"name": "b", "model": "m1", "dataset": "d1.jsonl"},
        ],
        "output_dir": "out/run",
    }


def test_defaults_are_the_paper_settings(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, minimal()))
    assert (config.train.lr, config.train.max_grad_norm, config.train.batch_size) == (1e-3, 1.0, 1)
    assert (config.loss.temperature, config.loss.kl, config.loss.similarity) == (2.0, 1.0, 2.9)
    assert config.dam.init == "uniform" and config.dtype == "bfloat16"
    assert config.train.resume == "auto" and config.wandb.entity is None


def test_overrides_dotted_and_sweep_forms_typed_as_yaml(tmp_path: Path) -> None:
    path = write(tmp_path, minimal())
    config = load_config(
        path,
        [
            "train.lr=1e-4",  # YAML 1.1 alone would read this as a string
            "--loss.similarity=0.05",  # the wandb agent's form
            "train.gradient_checkpointing=True",
            "wandb.tags=[x, y]",
            "--wandb.entity=None",  # how the agent renders Python's None
            "train.betas=[0.8, 0.95]",
            "models.b.model=other",  # an entry by name
            "models.0.dataset=first.jsonl",  # an entry by index
            "data.num_examples=7",
        ],
    )
    assert config.train.lr == pytest.approx(1e-4) and isinstance(config.train.lr, float)
    assert config.loss.similarity == pytest.approx(0.05)
    assert config.train.gradient_checkpointing is True
    assert config.wandb.tags == ["x", "y"] and config.wandb.entity is None
    assert config.train.betas == (0.8, 0.95)
    assert [m.model for m in config.models] == ["m0", "other"]
    assert config.models[0].dataset == "first.jsonl"
    assert config.data.num_examples == 7


def test_later_overrides_win(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, minimal()), ["train.lr=0.1", "--train.lr=0.2"])
    assert config.train.lr == pytest.approx(0.2)


def test_sections_missing_from_the_file_can_be_overridden(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, minimal()), ["wandb.project=p", "train.max_steps=5"])
    assert config.wandb.project == "p" and config.train.max_steps == 5


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lrr=1", "unknown config key 'train.lrr'; valid keys under train: lr, betas,"),
        ("foo=1", "unknown config key 'foo'; valid keys at the top level: base_model, models,"),
        ("models.0.weight=1", "unknown config key 'models.0.weight'; valid keys under models.0: name, model, dataset"),
        ("models.c.model=x", "models has no entry 'c' (indices 0-1; names: a, b)"),
        ("train.lr.x=1", "train.lr is a value, it has no key 'x'"),
        ("train.lr", "expected key=value"),
        ("=3", "expected key=value"),
        ("train.lr=fast", "config key 'train.lr': Input should be a valid number"),
        ("train.schedule=exp", "config key 'train.schedule'"),
        ("dam.targets=[linear, conv]", "config key 'dam.targets'"),
        ("train.batch_size=0", "config key 'train.batch_size'"),
        ("train.warmup_steps=9", "warmup_steps (9) exceeds max_steps (3)"),
        ("data.teacher_logits=cached", "cached needs cache_dir"),
        ("models.1.name=a", "model names must be unique; repeated: a"),
        ("models.1.name=a.b", "config key 'models.1.name'"),
        ("output_dir=out/$DAM_TEST_UNSET_VARIABLE", "environment variable DAM_TEST_UNSET_VARIABLE"),
    ],
)
def test_bad_overrides_name_the_key(tmp_path: Path, override: str, message: str) -> None:
    data = minimal()
    data["train"] = {"max_steps": 3}
    with pytest.raises(DamError) as info:
        load_config(write(tmp_path, data), [override])
    assert message in str(info.value)


def test_cached_logits_need_top_k(tmp_path: Path) -> None:
    data = minimal() | {"data": {"teacher_logits": "cached", "cache_dir": "c"}}
    with pytest.raises(DamError, match="needs loss.top_k"):
        load_config(write(tmp_path, data))
    assert load_config(write(tmp_path, data), ["loss.top_k=8"]).loss.top_k == 8


def test_errors_in_the_file_name_the_key(tmp_path: Path) -> None:
    data = minimal()
    data["train"] = {"learning_rate": 1}
    with pytest.raises(DamError, match=r"unknown config key 'train.learning_rate'; valid keys under train: lr"):
        load_config(write(tmp_path, data))
    data = minimal()
    del data["output_dir"]
    with pytest.raises(DamError, match="missing config key 'output_dir'"):
        load_config(write(tmp_path, data))
    data = minimal()
    data["models"] = data["models"][:1]
    with pytest.raises(DamError, match="two or more models"):
        load_config(write(tmp_path, data))


def test_not_a_config_file(tmp_path: Path) -> None:
    with pytest.raises(DamError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("base_model: [unclosed\n")
    with pytest.raises(DamError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(DamError, match="expected a mapping"):
        load_config(bad)


def test_output_dir_expands_environment_variables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_RUN_ID", "abc123")
    config = load_config(write(tmp_path, minimal()), ["output_dir=out/sweep/${WANDB_RUN_ID}"])
    assert config.output_dir == "out/sweep/abc123"


def test_saved_config_loads_back_equal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # the tiny config's datasets are relative to the repository
    config = load_config(TINY, ["train.lr=0.5", "wandb.tags=[t]"])
    save_config(config, tmp_path / "config.yaml")
    # written relative to the file's folder (the datasets exist: ../x), read back resolved against it
    saved = load_saved_config(tmp_path / "config.yaml")
    assert portable_config(saved, tmp_path) == portable_config(config, tmp_path)
    assert saved.models[0].dataset == str((ROOT / config.models[0].dataset).resolve())


def test_apply_override_creates_nested_sections() -> None:
    data: dict = {}
    apply_override(data, "--train.seed=3")
    assert data == {"train": {"seed": 3}}


# ------------------------------------------------------------------------------------------ repository configs


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "dam").glob("*.yaml")), ids=lambda p: p.name)
def test_every_dam_config_parses(path: Path) -> None:
    config = load_config(path)
    assert isinstance(config, DAMConfig)
    assert len(config.models) >= 2
    header = path.read_text().splitlines()[0]
    assert header.startswith("#"), "each config starts with a comment saying what it is and how to run it"


def test_tiny_config_uses_the_example_data() -> None:
    config = load_config(TINY)
    assert config.dtype == "float32" and config.wandb.mode == "disabled"
    for model in config.models:
        assert (ROOT / model.dataset).is_file(), model.dataset


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "accelerate").glob("*.yaml")), ids=lambda p: p.name)
def test_every_accelerate_config_parses_with_accelerate(path: Path) -> None:
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    config = load_config_from_file(str(path))  # rejects unknown keys
    args = launch_command_parser().parse_args(["--config_file", str(path), "train_dam.py", "configs/dam/tiny.yaml"])
    args, _, _ = _validate_launch_command(args)  # what `accelerate launch` does with the file
    kind = path.stem
    # sharded sources launch with ddp.yaml too: DAM shards the sources itself (train.shard_sources), accelerate
    # only starts the processes
    expected = {"single_gpu": "NO", "ddp": "MULTI_GPU"}[kind]
    assert config.distributed_type.value == expected
    assert not args.use_fsdp and not args.use_deepspeed
    if kind == "ddp":
        assert "train.shard_sources=true" in path.read_text()


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "sweeps").glob("*.yaml")), ids=lambda p: p.name)
def test_every_sweep_launches_train_dam_with_valid_keys(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_RUN_ID", "run0")  # the agent sets it; output_dir expands it
    sweep = yaml.safe_load(path.read_text())
    assert sweep["program"] == "train_dam.py"
    command = sweep["command"]
    assert "${program}" in command and command[-1] == "${args}"
    run_configs = [c for c in command if isinstance(c, str) and c.startswith("configs/dam/")]
    assert len(run_configs) == 1 and (ROOT / run_configs[0]).is_file()
    fixed = [c for c in command if "=" in str(c) and not str(c).startswith("${")]
    assert sweep["parameters"], "a sweep varies something"
    # every value each parameter can take is a valid override of the run config
    for key, spec in sweep["parameters"].items():
        values = spec.get("values") or [spec.get("value", spec.get("min")), spec.get("max")]
        for value in [v for v in values if v is not None]:
            load_config(ROOT / run_configs[0], [*fixed, f"--{key}={value}"])
