"""Multi-document merge configs, as ``mergekit-multimerge`` runs them.

A YAML file of several documents is a recipe of merges. Each document is an ordinary merge config plus an
optional ``name``: a named document is merged into ``INTERMEDIATE_DIR/<name>``, the one unnamed document into
``OUT``. A later document uses an earlier output by writing its name where a model goes (``model:``,
``base_model:``, a slice source's ``model:``, ``tokenizer_source:``; a ``name+lora`` reference too). The merges
run in dependency order.

Every document is validated and the dependency graph checked (unknown or circular references, duplicate names)
before the first merge starts. Resumable: an intermediate folder that already holds this document's
``mergekit_config.yml`` (the document with names resolved) is reused; any other non-empty folder is refused
unless ``force``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dam.errors import DamError
from dam.merge.config import MergeConfig, load_merge_config, parse_merge_config
from dam.merge.engine import MergeSummary, run_merge

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MergeStep:
    """One document of a recipe: its name (None for the final merge), config, output folder and dependencies."""

    name: str | None
    config: MergeConfig
    out: Path
    depends: frozenset[str]


def _read_documents(path: Path) -> list[Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise DamError(f"config {str(path)!r}: cannot read it ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise DamError(
            f"config {str(path)!r}: not a text (UTF-8) file: byte {e.start} is {e.object[e.start]:#04x}"
        ) from None
    try:
        return [doc for doc in yaml.safe_load_all(text) if doc is not None]
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise DamError(f"config {str(path)!r}: invalid YAML{at}: {str(e).splitlines()[0]}") from None


def plan_merge_steps(path: str | Path, out: str | Path, intermediate_dir: str | Path | None) -> list[MergeStep]:
    """The documents of ``path`` as merge steps in dependency order (every check done, nothing read or written)."""
    path = Path(path)
    documents = _read_documents(path)
    if not documents:
        raise DamError(f"config {str(path)!r}: no YAML document in it")
    names: list[str | None] = []
    for i, doc in enumerate(documents):
        if not isinstance(doc, dict):
            raise DamError(f"config {str(path)!r}: document {i + 1} is not a mapping")
        name = doc.get("name")
        if name is not None and (not isinstance(name, str) or not name or "/" in name or name.startswith(".")):
            raise DamError(f"config {str(path)!r}: document {i + 1}: name {name!r} must be a plain folder name")
        if name in names:
            which = f"name {name!r}" if name is not None else "unnamed (final) document"
            raise DamError(f"config {str(path)!r}: more than one {which}; the unnamed one is written to OUT")
        names.append(name)
    if None not in names:
        raise DamError(f"config {str(path)!r}: no unnamed document: the final merge (written to OUT) has no name")
    named = [n for n in names if n is not None]
    if named and intermediate_dir is None:
        raise DamError(
            f"config {str(path)!r} has named documents ({', '.join(named)}): pass --intermediate-dir DIR for "
            "their outputs"
        )
    outputs = {n: str(Path(intermediate_dir) / n) for n in named}  # type: ignore[arg-type]
    steps: dict[str | None, MergeStep] = {}
    for i, (doc, name) in enumerate(zip(documents, names, strict=True)):
        data = {k: v for k, v in doc.items() if k != "name"}
        config = parse_merge_config(
            data, yaml.safe_dump(data, sort_keys=False), origin=f"config {str(path)!r}, document {i + 1}"
        )
        used: set[str] = set()

        def rename(reference: str, used: set[str] = used) -> str:
            model, plus, lora = reference.partition("+")  # a `name+lora` reference keeps its adapter
            if model not in outputs:
                return reference
            used.add(model)
            return outputs[model] + plus + lora

        resolved = config.with_models(rename)
        if name in used:
            raise DamError(f"config {str(path)!r}: document {name!r} uses its own output")
        target = Path(out) if name is None else Path(outputs[name])
        steps[name] = MergeStep(name, resolved if used else config, target, frozenset(used))
    ordered: list[MergeStep] = []
    state: dict[str | None, str] = {}

    def visit(name: str | None, chain: list[str | None]) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "visiting":
            cycle = " -> ".join(str(n or "(final)") for n in [*chain, name])
            raise DamError(f"config {str(path)!r}: circular dependency: {cycle}")
        state[name] = "visiting"
        for dep in sorted(steps[name].depends):
            visit(dep, [*chain, name])
        state[name] = "done"
        ordered.append(steps[name])

    for name in names:
        visit(name, [])
    return ordered


def _up_to_date(step: MergeStep) -> bool:
    """True when the step's folder holds the config this step would write (see ``MergeConfig.portable_text``); a
    damaged saved config (not the text expected, not even UTF-8) is not up to date."""
    saved = step.out / "mergekit_config.yml"
    expected = step.config.portable_text(step.out.expanduser().absolute())
    return saved.is_file() and saved.read_bytes() == expected.encode("utf-8")


def run_merge_file(
    path: str | Path,
    out: str | Path,
    *,
    intermediate_dir: str | Path | None = None,
    force: bool = False,
    dry_run: bool = False,
    **merge_options: Any,
) -> list[MergeSummary]:
    """``dam merge``: run the config at ``path`` (one document, or a multi-document recipe) into ``out``.

    ``merge_options`` go to :func:`dam.merge.engine.run_merge` (shard size, device, seed, progress, workers).
    Returns one summary per merge run (or planned, for ``dry_run``); up-to-date intermediates are skipped. In a
    dry run, a step whose inputs include an intermediate that is not built yet is validated but not planned.
    """
    path = Path(path)
    documents = _read_documents(path)
    recipe = len(documents) > 1 or any(isinstance(d, dict) and "name" in d for d in documents)  # a cut recipe too
    if not recipe and intermediate_dir is None:
        config = load_merge_config(path)
        return [run_merge(config, out, force=force, dry_run=dry_run, **merge_options)]
    steps = plan_merge_steps(path, out, intermediate_dir)
    summaries = []
    for step in steps:
        label = step.name or "final merge"
        if step.name is not None and _up_to_date(step):
            logger.info("%s: %s is up to date; reusing it", label, step.out)
            continue
        if dry_run and any(not (Path(intermediate_dir) / dep).is_dir() for dep in step.depends):  # type: ignore[arg-type]
            logger.info("%s: uses intermediates not built yet; config checked, checkpoints not", label)
            continue
        logger.info("%s: merging into %s", label, step.out)
        summaries.append(run_merge(step.config, step.out, force=force, dry_run=dry_run, **merge_options))
    return summaries


__all__ = ["MergeStep", "plan_merge_steps", "run_merge_file"]
