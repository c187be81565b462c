"""The searches of ``dam demo run --searches``: greedy soup, kinship-guided greedy merging and CMA-ES at two budgets,
each chosen on the validation split, beside DAM, with the compute each took.

:func:`run_searches` runs ``dam/demo/configs/search/*.yaml`` (paths moved under ``root``) into ``out/searches/``:

- ``soup``: ``dam soup`` of the three experts; the greedy soup is kept;
- ``kinship_greedy``: ``dam evolve`` with the kinship-greedy strategy; its best member is kept;
- ``evolve``: ``dam evolve`` (CMA-ES over TIES weights and densities) to the first of :data:`EVOLVE_BUDGETS`
  evaluations, its best kept as ``evolve_<n1>``; then the same study extended to the second budget, ``evolve_<n2>``.

Every search selects on the validation split only; the demo then evaluates the kept models on test beside DAM.
A finished search of the same config is reused (``dam evolve`` resumes an unfinished one).

Compute (:func:`compute_table`): wall seconds and forward tokens. A search's are its candidates' merges and
evaluations (:mod:`dam.search.fitness`); DAM's seconds are its training run's, and its forward tokens are
estimated as ``2 * max_steps * batch_size * mean example tokens`` (one forward of the merged student and one of
the on-the-fly teacher per training row; the backward passes, about twice a forward, are not counted).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import yaml

from dam.demo.paths import TOY, Family

SEARCH_CONFIG_DIR = TOY.config_dir / "search"
# CMA-ES evaluations, the two budgets compared: one and three generations of optuna's CMA-ES (its population for the
# demo's 36 dimensions is 4 + floor(3 ln 36) = 14). Smaller than the 20 and 60 planned, on purpose: a candidate took
# 13-119 s (47 s on average) on the shared 2-core machine under others' load, and the whole comparison had to fit in
# about an hour there (README, "Searching merges").
EVOLVE_BUDGETS = (14, 42)
FAMILY_SEARCHES: dict[str, tuple[tuple[str, ...], tuple[int, ...]]] = {
    "toy": (("soup", "kinship_greedy", "evolve"), EVOLVE_BUDGETS),
    # the real family: a candidate costs ~30 s (a 135M merge and 150 greedy answers), so one small CMA-ES budget
    "smollm2": (("soup", "evolve"), (8,)),
}
"""Per family: the searches run and the CMA-ES budgets."""
QUICK_BUDGETS = (2, 3)  # --quick: the machinery only


def _config(
    name: str, root: Path, quick: bool, limit: int | None, family: Family = TOY, **changes: Any
) -> dict[str, Any]:
    """A demo search config with its family paths under ``root`` (and the quick run's small settings). ``root`` is
    made absolute, so that the saved config (paths relative to the search folder) is the same however ``--root``
    was spelled and a rerun reuses the finished search."""
    root = root.resolve()
    data = yaml.safe_load((family.config_dir / "search" / f"{name}.yaml").read_text())
    if "base_model" in data:
        data["base_model"] = family.rebase(data["base_model"], root)
    data["models"] = [family.rebase(m, root) for m in data["models"]]
    data["fitness"]["data_dir"] = str(root)
    if quick:
        data["fitness"]["limit"] = limit
        if "budget" in data:
            data["budget"] = {"evaluations": 4}
    data.update(changes)
    return data


def run_searches(
    root: str | Path,
    out: str | Path,
    *,
    seed: int = 0,
    quick: bool = False,
    limit: int | None = None,
    family: Family = TOY,
) -> dict[str, dict[str, Any]]:
    """Run the family's searches (see the module docstring, :data:`FAMILY_SEARCHES`); returns, per kept model, its
    folder, validation fitness and compute: ``{name: {"path", "validation_score", "seconds", "forward_tokens",
    "evaluations"}}``."""
    from dam.search.config import EvolveConfig, SoupConfig
    from dam.search.evolve import run_evolve
    from dam.search.kinship_greedy import run_kinship_greedy
    from dam.search.records import saved_config
    from dam.search.soup import run_soup

    root, folder = Path(root), Path(out) / "searches"
    kept: dict[str, dict[str, Any]] = {}

    soup_out = folder / "soup"
    searches, budgets = FAMILY_SEARCHES[family.name]
    soup_config = SoupConfig.model_validate(_config("soup", root, quick, limit, family))
    summary_file = soup_out / "soup.json"
    previous = json.loads(summary_file.read_text()) if summary_file.is_file() else None
    if previous is not None and previous["config"] == saved_config(soup_config, soup_out):
        summary = previous
    else:
        summary = run_soup(soup_config, soup_out, force=True)
    kept["greedy_soup"] = {
        "path": str(soup_out / "greedy"),
        "validation_score": summary["greedy"]["score"],
        "seconds": summary["compute"]["evaluation_seconds"],
        "forward_tokens": summary["compute"]["forward_tokens"],
        "evaluations": summary["compute"]["evaluations"],
    }

    if "kinship_greedy" in searches:
        kinship_config = EvolveConfig.model_validate(_config("kinship_greedy", root, quick, limit, family, seed=seed))
        kinship = run_kinship_greedy(kinship_config, folder / "kinship_greedy")
        kept["kinship_greedy"] = {
            "path": kinship["best"]["path"],
            "validation_score": kinship["best"]["score"],
            "seconds": kinship["compute"]["evaluation_seconds"] + kinship["compute"]["kinship_seconds"],
            "forward_tokens": kinship["compute"]["forward_tokens"],
            "evaluations": kinship["compute"]["evaluations"],
        }

    evolve_out = folder / "evolve"
    for budget in QUICK_BUDGETS if quick else budgets:
        data = _config("evolve", root, quick, limit, family, seed=seed, budget={"evaluations": budget})
        config = EvolveConfig.model_validate(data)
        results = run_evolve(config, evolve_out, progress=False)
        snapshot = folder / f"evolve_{budget}"
        if snapshot.exists():
            shutil.rmtree(snapshot)
        shutil.copytree(evolve_out / "merged", snapshot / "merged")
        shutil.copy2(evolve_out / "best.yaml", snapshot / "best.yaml")
        kept[f"evolve_{budget}"] = {
            "path": str(snapshot / "merged"),
            "validation_score": results["best"]["score"],
            "seconds": results["compute"]["evaluation_seconds"],
            "forward_tokens": results["compute"]["forward_tokens"],
            "evaluations": results["compute"]["evaluations"],
        }
    return kept


def dam_forward_tokens(config: Any) -> int:
    """DAM's training forward tokens, estimated (see the module docstring) from its sources' training data."""
    from transformers import AutoTokenizer

    from dam.evaluation.evaluate import encode_example, load_jsonl
    from dam.io.checkpoint import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(config.base_model))
    chat = config.data.use_chat_template and bool(tokenizer.chat_template)
    lengths = []
    for source in config.models:
        for row in load_jsonl(source.dataset)[: config.data.num_examples]:
            prompt, response = encode_example(tokenizer, row["prompt"], row["response"], chat=chat)
            lengths.append(min(len(prompt) + len(response), config.data.max_length))
    mean = sum(lengths) / len(lengths)
    return round(2 * config.train.max_steps * config.train.batch_size * config.train.grad_accum * mean)


def compute_table(compute: dict[str, dict[str, Any]], skills_means: dict[str, float]) -> str:
    """Quality per compute: DAM and each search's kept model, with its test skills mean, seconds, forward tokens."""
    header = ["quality per compute", "test skills mean", "wall s", "forward tokens", "evaluations"]
    rows = []
    for name, c in compute.items():
        tokens = f"{c['forward_tokens'] / 1e6:.2f}M" + ("*" if name == "dam" else "")
        evaluations = "-" if c.get("evaluations") is None else str(c["evaluations"])
        seconds = "n/a" if c["seconds"] is None else f"{c['seconds']:.0f}"
        rows.append([name, f"{skills_means[name]:.1f}", seconds, tokens, evaluations])
    widths = [max(len(r[j]) for r in [header, *rows]) for j in range(len(header))]
    lines = [
        "  ".join([r[0].ljust(widths[0])] + [v.rjust(w) for v, w in zip(r[1:], widths[1:], strict=True)])
        for r in [header, *rows]
    ]
    lines.append("* estimated: 2 forwards (student, on-the-fly teacher) per training row; backward passes not counted")
    return "\n".join(lines)
