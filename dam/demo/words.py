"""The real family's tasks: word-level instruction skills and a general-ability prompt set, made offline from seeds.

Each skill is an instruction over a list of 4-5 common English words, answered with one line:

- ``reverse``: ``Reverse the order of these words: lemon tiger cloud anchor`` -> ``anchor cloud tiger lemon``;
- ``initials``: ``Write the first letter of each word: ...`` -> the words' first letters, space-separated;
- ``double``: ``Repeat each word twice: lemon tiger ...`` -> ``lemon lemon tiger tiger ...``.

SmolLM2-135M-Instruct answers none of them (0% on 32 prompts of each, greedy, in its chat format): it rephrases
the prompt or lists the words as given. Sorting the words alphabetically was tried as a skill and dropped: a full
fine-tune reached only 53% on held-out prompts after 90 steps of 16 at lr 3e-4 (16% and 44% at 30 and 60 steps),
far from the 90% an expert must reach, at a cost the build could not pay on two CPU cores.

``general`` is a fixed set of short factual and instruction prompts (capitals, sums, opposites, plurals,
one-sentence descriptions, ...) whose responses are the *base model's own* greedy answers, written at build time:
a merge is scored there by its agreement with the base (``metric: agreement`` in :mod:`dam.evaluation.evaluate`),
so it measures how much of the base's general behaviour a merge keeps.

No prompt is in two splits: examples are drawn without repetition from one seeded stream per task and dealt into
test, validation and train in that order.
"""

from __future__ import annotations

import random
from collections.abc import Callable

WORDS = tuple(
    """
    anchor apple bamboo basket bottle bread button camera candle carpet castle cherry cloud desert dolphin donkey
    dragon eagle engine falcon farmer feather finger forest garden ginger glove goose guitar hammer harbor helmet
    honey horse igloo insect island jacket jelly jewel jungle kettle kitten koala ladder lantern lemon lizard
    magnet marble meadow mirror monkey napkin needle nickel onion orange oyster parrot pencil pepper pillow quilt
    rabbit ribbon river rocket saddle salmon silver stone sugar table teapot tiger tomato tunnel umbrella unicorn
    valley velvet violin wagon wallet walnut whale window yogurt zebra
    """.split()
)
"""89 distinct common nouns, each 4-7 lowercase letters."""


def _words(rng: random.Random) -> list[str]:
    return rng.sample(WORDS, rng.randint(4, 5))


def _reverse(rng: random.Random) -> tuple[str, str]:
    words = _words(rng)
    return f"Reverse the order of these words: {' '.join(words)}", " ".join(reversed(words))


def _initials(rng: random.Random) -> tuple[str, str]:
    words = _words(rng)
    return f"Write the first letter of each word: {' '.join(words)}", " ".join(w[0] for w in words)


def _double(rng: random.Random) -> tuple[str, str]:
    words = _words(rng)
    return f"Repeat each word twice: {' '.join(words)}", " ".join(f"{w} {w}" for w in words)


SKILLS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "reverse": _reverse,
    "initials": _initials,
    "double": _double,
}
GENERAL = "general"

_COUNTRIES = (
    "France Germany Italy Spain Portugal Japan China India Egypt Kenya Canada Mexico Brazil Argentina Peru Chile "
    "Norway Sweden Finland Poland Greece Turkey Russia Australia Ireland Austria Belgium Netherlands Cuba Thailand"
).split()
_ADJECTIVES = (
    "hot tall happy fast early light strong young wet loud soft rich full open clean heavy dark easy old cold "
    "thick high near sweet brave"
).split()
_ANIMALS = "dog spider cat bird horse ant chicken cow snake fish duck bee lion frog octopus".split()
_TOPICS = (
    "the ocean the moon rain bicycles coffee winter libraries trees music friendship mountains the sun "
    "breakfast trains the sky gardens snow books rivers cities"
).split(" ")
_PLURALS = "child mouse tooth foot city box knife leaf baby wolf goose man woman potato bus".split()
_FACTS = (
    "What do bees make?",
    "What is the largest planet in our solar system?",
    "What gas do plants take in from the air?",
    "How many days are in a week?",
    "How many hours are in a day?",
    "What is the boiling point of water in Celsius?",
    "What is the freezing point of water in Celsius?",
    "Which ocean is the largest?",
    "What is the closest star to Earth?",
    "How many continents are there?",
    "What color is the sky on a clear day?",
    "What color are most leaves in summer?",
    "What do cows drink?",
    "What is the main language spoken in Brazil?",
    "Who wrote Romeo and Juliet?",
    "What is H2O?",
    "How many sides does a triangle have?",
    "How many sides does a square have?",
    "What is the tallest animal?",
    "What instrument has black and white keys?",
    "What do you call a baby cat?",
    "What do you call a baby dog?",
    "Which season comes after winter?",
    "What is the capital of the United States?",
    "How many minutes are in an hour?",
    "What is the opposite of north?",
    "Name three primary colors.",
    "What shape is a ball?",
    "What is the first letter of the English alphabet?",
    "Give a short greeting.",
)
_TEMPLATES: tuple[Callable[[random.Random], str], ...] = (
    lambda r: f"What is the capital of {r.choice(_COUNTRIES)}?",
    lambda r: f"What is the opposite of {r.choice(_ADJECTIVES)}?",
    lambda r: f"How many legs does a {r.choice(_ANIMALS)} have?",
    lambda r: f"What is {r.randint(2, 60)} plus {r.randint(2, 40)}?",
    lambda r: f"What is {r.randint(2, 12)} times {r.randint(2, 12)}?",
    lambda r: f"Write one short sentence about {r.choice(_TOPICS)}.",
    lambda r: f"What is the plural of {r.choice(_PLURALS)}?",
    lambda r: f"Give a synonym for {r.choice(_ADJECTIVES)}.",
    lambda r: f"What color is a {r.choice(('banana', 'tomato', 'lime', 'cherry', 'crow', 'swan', 'carrot'))}?",
    lambda r: r.choice(_FACTS),
)


def general_prompts(seed: int, n: int) -> list[str]:
    """``n`` distinct general prompts from the templates above, in a seeded order (ValueError when the templates
    cannot give that many)."""
    rng = random.Random(f"general-{seed}")
    seen: dict[str, None] = {}
    for _ in range(200 * n):
        seen.setdefault(rng.choice(_TEMPLATES)(rng), None)
        if len(seen) == n:
            return list(seen)
    raise ValueError(f"the general templates give fewer than {n} distinct prompts")


def skill_splits(skill: str, seed: int, sizes: dict[str, int]) -> dict[str, list[dict[str, str]]]:
    """``{split: [{"prompt", "response", "task"}]}`` for one skill, with no prompt in two splits; ``sizes`` in the
    order test, validation, train (the held-out splits are dealt first, so they do not depend on the train size)."""
    rng = random.Random(f"{skill}-{seed}")
    seen: set[str] = set()
    splits: dict[str, list[dict[str, str]]] = {}
    for split in ("test", "validation", "train"):
        rows = splits.setdefault(split, [])
        while len(rows) < sizes[split]:
            prompt, response = SKILLS[skill](rng)
            if prompt not in seen:
                seen.add(prompt)
                rows.append({"prompt": prompt, "response": response, "task": skill})
    return splits
