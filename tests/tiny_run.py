"""The tiny DAM run config (``configs/dam/tiny.yaml``) pointed at a model family built inside a test.

The config's datasets stay the repository's ``data/examples``; the models, run folder and any extra dotted
overrides come from the test. wandb is disabled unless an override turns it on.
"""

from pathlib import Path

from dam.training.config import DAMConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "dam" / "tiny.yaml"


def tiny_overrides(base: Path, sources: list[Path], out: Path | None, *extra: str) -> list[str]:
    """Dotted overrides that point the tiny config at ``base``/``sources`` and the run folder ``out``."""
    models = [f"models.{i}.model={s}" for i, s in enumerate(sources)]
    datasets = [f"models.{i}.dataset={ROOT / m.dataset}" for i, m in enumerate(load_config(TINY).models)]
    run = [] if out is None else [f"output_dir={out}"]
    return [f"base_model={base}", *models, *datasets, *run, "wandb.mode=disabled", *extra]


def tiny_config(base: Path, sources: list[Path], out: Path, *extra: str) -> DAMConfig:
    """The resolved tiny config for this family and run folder."""
    return load_config(TINY, tiny_overrides(base, sources, out, *extra))
