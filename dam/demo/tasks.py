"""The demo's tasks: exact-match string transformations and their seeded train/validation/test splits.

Everything is built on CPU from a seed, with no download. Tasks are exact-match string transformations; each
example is a ``prompt`` ending in ``=`` and a ``response``:

- ``generic`` (the base's pre-training data), five operations in equal parts: ``copy xk3q=`` -> ``xk3q``,
  ``repeat abc=`` -> ``abcabc``, and on *digit* strings ``mirror 408=`` -> ``804``, ``order 408=`` -> ``048``,
  ``next 409=`` -> ``510``. It teaches the format (read a word after a keyword, answer, stop) and general string
  machinery, but none of the skills: those use other keywords, on letters.
- ``reverse``: ``reverse abcde=`` -> ``edcba``.
- ``sort``: ``sort dbca=`` -> ``abcd`` (letters in alphabetical order).
- ``shift``: ``shift abz=`` -> ``bca`` (each letter moved one place on, ``z`` wrapping to ``a``).
"""

from __future__ import annotations

import json
import random
import string
from collections.abc import Callable, Sequence
from pathlib import Path

from dam.errors import DamError

LETTERS = string.ascii_lowercase
SKILL_MAX_LETTERS = 6  # the sort expert's minutes-long fine-tune reaches ~20% on 8-letter words, ~85% up to 6


def _word(rng: random.Random, alphabet: str = LETTERS, lo: int = 3, hi: int = 8) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(lo, hi)))


def _generic(rng: random.Random) -> tuple[str, str]:
    """Format and string-handling practice: copy and repeat words, and reverse, sort and shift *digit* strings.

    The digit operations give the base reusable machinery (attend to a mirrored position, order symbols, map each
    symbol to its successor) under keywords the skills do not use, so an expert's fine-tune is a small change that
    carries a known operation over to letters behind a new keyword, the way real fine-tunes build on pre-training.
    """
    kind = rng.randrange(5)
    if kind == 0:
        word = _word(rng, LETTERS + string.digits)
        return f"copy {word}=", word
    if kind == 1:
        word = _word(rng, hi=6)
        return f"repeat {word}=", word + word
    digits = _word(rng, string.digits)
    if kind == 2:
        return f"mirror {digits}=", digits[::-1]
    if kind == 3:
        return f"order {digits}=", "".join(sorted(digits))
    return f"next {digits}=", "".join(str((int(d) + 1) % 10) for d in digits)


def _reverse(rng: random.Random) -> tuple[str, str]:
    word = _word(rng, hi=SKILL_MAX_LETTERS)
    return f"reverse {word}=", word[::-1]


def _sort(rng: random.Random) -> tuple[str, str]:
    word = _word(rng, hi=SKILL_MAX_LETTERS)
    return f"sort {word}=", "".join(sorted(word))


def _shift(rng: random.Random) -> tuple[str, str]:
    word = _word(rng, hi=SKILL_MAX_LETTERS)
    return f"shift {word}=", "".join(LETTERS[(LETTERS.index(c) + 1) % 26] for c in word)


GENERIC = "generic"
SKILLS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "reverse": _reverse,
    "sort": _sort,
    "shift": _shift,
}
"""Skill name -> generator of one ``(prompt, response)`` pair. Each skill gets one expert."""

_GENERATORS = {GENERIC: _generic, **SKILLS}


def make_example(task: str, rng: random.Random) -> dict[str, str]:
    """One example of ``task`` (``generic`` or a skill): ``{"prompt", "response", "task", "text"}``."""
    if task not in _GENERATORS:
        raise DamError(f"unknown demo task {task!r}; tasks: {', '.join(_GENERATORS)}")
    prompt, response = _GENERATORS[task](rng)
    return {"prompt": prompt, "response": response, "task": task, "text": prompt + response}


SPLITS = ("train", "validation", "test")
"""The demo's splits: ``train`` (the experts' fine-tunes and every learned merge train on it), ``validation``
(settings are chosen on it) and ``test`` (the figures are reported on it)."""


def task_splits(task: str, seed: int, n_train: int, n_validation: int, n_test: int) -> dict[str, list[dict[str, str]]]:
    """``{"train", "validation", "test"}`` examples of ``task``, every prompt distinct across the three, the same
    for the same seed on any machine.

    One seeded stream of distinct prompts is cut as test, then train, then validation, so that adding the
    validation split left the earlier ``train`` and held-out (now ``test``) files, and the family trained on them,
    unchanged."""
    rng = random.Random(f"dam-demo/{seed}/{task}")  # str seeds hash deterministically (not with hash())
    total = n_train + n_validation + n_test
    rows: list[dict[str, str]] = []
    seen: set[str] = set()
    for _ in range(20 * total):
        if len(rows) == total:
            break
        example = make_example(task, rng)
        if example["prompt"] not in seen:
            seen.add(example["prompt"])
            rows.append(example)
    else:
        raise DamError(f"demo task {task!r}: cannot draw {total} distinct prompts")
    return {
        "train": rows[n_test : n_test + n_train],
        "validation": rows[n_test + n_train :],
        "test": rows[:n_test],
    }


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    """One JSON object per line (UTF-8, non-ASCII characters written as they are), the parent folders made."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_datasets(
    root: str | Path,
    *,
    seed: int = 0,
    skills: Sequence[str] = tuple(SKILLS),
    n_train: int = 2000,
    n_train_generic: int = 16000,
    n_validation: int = 200,
    n_test: int = 200,
) -> dict[str, dict[str, Path]]:
    """Write ``<root>/<task>/{train,validation,test}.jsonl`` for ``generic`` and each skill; returns
    ``{task: {split: path}}``."""
    root = Path(root)
    written = {}
    for task in [GENERIC, *skills]:
        n = n_train_generic if task == GENERIC else n_train
        splits = task_splits(task, seed, n, n_validation, n_test)
        written[task] = {split: root / task / f"{split}.jsonl" for split in SPLITS}
        for split in SPLITS:
            write_jsonl(written[task][split], splits[split])
    return written
