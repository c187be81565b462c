"""Every command the docs show is run by a test or marked as needing what the suite lacks; their links resolve.

The docs are README.md and docs/*.md. Every fenced block in them names its language (`text` for output, `yaml`,
`python`, ...), so no command hides in an untyped block. The *commands* are:

- in a `bash`, `sh` or `shell` block, every line, with `# comments` dropped and backslash continuations joined;
- in a `console` block, the lines that start with `$ ` (the others are output).

Each command must be either

- **covered**: it matches a pattern of :data:`COVERED`, whose tests (``tests/<file>.py::<name>``) run it, in the
  test's own folder and models (the tests named must exist); or it is the README's test command (the block right
  under ``<!-- test-command -->``), which ``.ci/run`` runs; or
- **marked**: the line above the block's opening fence (blank lines may come between) is a marker
  ``<!-- needs: WHAT -->``, WHAT one or more of :data:`NEEDS`, separated by spaces:

  - ``gpu``: needs a CUDA GPU;
  - ``network``: needs the network (pip installs, Hub models and datasets, pushes to the Hub);
  - ``long``: runs for minutes to hours on CPU, longer than the suite allows.

  A marker covers every command of its block.

A new command that is neither fails :func:`test_every_command_is_covered_or_marked`. The checks parse text only:
no command runs here.

Links: every relative link of these files (to a docs page, an image or a repository file such as
``../configs/merge/ties.yaml``) must point at something that exists, and the README's anchors into docs pages must
name a heading there. ``mkdocs build --strict`` (in the README's test command) checks the docs pages' own links and
anchors again as the site is built.
"""

from __future__ import annotations

import re
import sys
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NEEDS = {"gpu", "network", "long"}
SHELL = {"bash", "sh", "shell"}
CI_MARKER = "<!-- test-command -->"

COVERED: dict[str, list[str]] = {
    # the tiny family every test builds (tests/conftest.py and the fixtures use make_family the same way)
    r"python -c \"from dam\.testing import make_family; make_family\('[\w/]+', \d\)\"": [
        "tests/test_merge_cli.py::test_merge_prints_a_summary_and_writes_the_model",
        "tests/test_train.py::test_accelerate_launch_runs_the_tiny_config",
    ],
    # configs/dam/tiny.yaml, its model paths pointed at a family built in the test's folder
    r"dam train configs/dam/tiny\.yaml": [
        "tests/test_hub_outputs.py::test_training_outputs_hold_no_machine_path_and_a_moved_project_resumes",
        "tests/test_train.py::test_accelerate_launch_runs_the_tiny_config",
    ],
    r"dam merge ties\.yaml out/ties( --dry-run)?": [
        "tests/test_merge_cli.py::test_merge_prints_a_summary_and_writes_the_model",
    ],
    # the same config with density 1.5: one error line
    r"dam merge ties\.yaml out/ties2": [
        "tests/test_merge_cli.py::test_bad_input_is_one_line_exit_1_and_nothing_written"
    ],
    r"dam merge recipe\.yaml out/final --intermediate-dir out/steps": [
        "tests/test_merge_multi.py::test_cli_runs_a_recipe_and_dry_run_plans_only_what_it_can",
    ],
    r"dam eval \S+ \S+ --tasks reverse sort shift": ["tests/test_evaluate.py::test_cli_eval_table_and_json"],
    r"dam kinship \S+ \S+ --base \S+": ["tests/test_kinship.py::test_cli"],
    r"dam analyze \S+ --shift --plots \S+": [
        "tests/test_analysis.py::test_dam_analyze_prints_the_summary_and_shift_and_writes_the_plots"
    ],
    r"dam eval \S+ --lm-eval my_task --lm-eval-include my_tasks/ --json": [
        "tests/test_lm_eval.py::test_cli_eval_lm_eval_json",
    ],
}

FENCE = re.compile(r"^\s*(`{3,}|~{3,})\s*([\w+-]*)")
MARKER = re.compile(r"^\s*<!--\s*needs:\s*(.*?)\s*-->\s*$")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


@dataclass
class Block:
    """One fenced block: its language, its lines, the line above its fence, and where it starts (1-based)."""

    language: str
    lines: list[str]
    above: str
    line: int


def fenced_blocks(text: str) -> list[Block]:
    blocks: list[Block] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        fence, start = match.group(1), i
        above = next((line for line in reversed(lines[:start]) if line.strip()), "")
        body: list[str] = []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i])
            i += 1
        blocks.append(Block(match.group(2), body, above.strip(), start + 1))
        i += 1
    return blocks


def commands(block: Block) -> list[str]:
    """The block's commands, each on one line with its whitespace collapsed."""
    if block.language == "console":
        lines = [line.strip()[2:] for line in block.lines if line.strip().startswith("$ ")]
    elif block.language in SHELL:
        lines = "\n".join(block.lines).replace("\\\n", " ").splitlines()
    else:
        return []
    stripped = (re.sub(r"(^|\s)#.*$", "", line) for line in lines)
    return [" ".join(line.split()) for line in stripped if line.strip()]


def covering_tests(command: str) -> list[str] | None:
    for pattern, tests in COVERED.items():
        if re.fullmatch(pattern, command):
            return tests
    return None


def problems(text: str, name: str) -> list[str]:
    """What is wrong with one markdown file's blocks: untyped fences, bad markers, commands neither covered nor
    marked."""
    found = []
    for block in fenced_blocks(text):
        where = f"{name}:{block.line}"
        if not block.language:
            found.append(f"{where}: a fenced block without a language (`text` for output, `bash` for commands)")
            continue
        marker = MARKER.match(block.above)
        if marker:
            needs = set(marker.group(1).split())
            if not needs or needs - NEEDS:
                found.append(f"{where}: marker needs {sorted(needs - NEEDS) or 'nothing'}: known are {sorted(NEEDS)}")
            continue
        if block.above == CI_MARKER:
            continue
        for command in commands(block):
            if covering_tests(command) is None:
                found.append(
                    f"{where}: {command!r} is run by no test in COVERED and has no <!-- needs: ... --> marker above"
                )
    return found


def slug(heading: str) -> str:
    """The anchor MkDocs (Python-Markdown's toc) gives a heading: inline code marks dropped, then its slugify."""
    text = unicodedata.normalize("NFKD", heading.replace("`", "")).encode("ascii", "ignore").decode()
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def anchors(path: Path) -> set[str]:
    text = "\n".join(line for block in _prose(path.read_text()) for line in block)
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, flags=re.M)}


def _prose(text: str) -> list[list[str]]:
    """The text outside fenced blocks, as runs of lines."""
    runs: list[list[str]] = [[]]
    fence = None
    for line in text.splitlines():
        match = FENCE.match(line)
        if fence is None and match:
            fence = match.group(1)
            runs.append([])
        elif fence is not None and line.strip().startswith(fence):
            fence = None
        elif fence is None:
            runs[-1].append(line)
    return runs


def broken_links(path: Path) -> list[str]:
    found = []
    prose = "\n".join("\n".join(run) for run in _prose(path.read_text()))
    prose = re.sub(r"`[^`\n]*`", "", prose)  # inline code is not a link
    for target in LINK.findall(prose):
        if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # a URL, or an anchor of this page (mkdocs checks those)
        file, _, anchor = target.partition("#")
        resolved = (path.parent / file).resolve()
        if not resolved.exists():
            found.append(f"{path.relative_to(ROOT)}: link {target!r}: {resolved.relative_to(ROOT)} does not exist")
        elif anchor and path.name == "README.md" and anchor not in anchors(resolved):
            found.append(f"{path.relative_to(ROOT)}: link {target!r}: no heading of that anchor in {file}")
    return found


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_command_is_covered_or_marked(path: Path) -> None:
    assert problems(path.read_text(), str(path.relative_to(ROOT))) == []


def test_covering_tests_exist_and_every_pattern_is_used() -> None:
    for tests in COVERED.values():
        for test in tests:
            file, _, name = test.partition("::")
            assert re.search(rf"^def {name}\(", (ROOT / file).read_text(), flags=re.M), f"{test} does not exist"
    shown = [c for path in DOCS for block in fenced_blocks(path.read_text()) for c in commands(block)]
    for pattern in COVERED:
        assert any(re.fullmatch(pattern, command) for command in shown), f"COVERED pattern {pattern!r} matches nothing"


def test_the_ci_runs_the_readme_test_command() -> None:
    assert CI_MARKER in (ROOT / ".ci" / "run").read_text()
    (block,) = [b for b in fenced_blocks((ROOT / "README.md").read_text()) if b.above == CI_MARKER]
    assert "mkdocs build --strict" in block.lines[0] and "pytest" in block.lines[0]


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path: Path) -> None:
    assert broken_links(path) == []


def test_the_checks_catch_an_unmarked_command_and_bad_blocks() -> None:
    covered = "```bash\ndam merge ties.yaml out/ties --dry-run   # check first\n```\n"
    assert problems(covered, "x.md") == []
    unmarked = "Train:\n\n```bash\ndam train configs/dam/new.yaml \\\n    train.lr=1e-3\n```\n"
    assert problems(unmarked, "x.md") == [
        "x.md:3: 'dam train configs/dam/new.yaml train.lr=1e-3' is run by no test in COVERED and has no "
        "<!-- needs: ... --> marker above"
    ]
    assert problems("<!-- needs: gpu network -->\n\n" + unmarked.split("\n\n", 1)[1], "x.md") == []
    assert problems("<!-- needs: gpu -->\n" + covered, "x.md") == []
    assert "marker needs ['cloud']" in problems("<!-- needs: cloud -->\n" + covered, "x.md")[0]
    console = "```console\n$ dam soup configs/search/soup.yaml out/soup\nscore: 49.5\n```\n"
    assert [p.split(": ", 1)[1][:36] for p in problems(console, "x.md")] == ["'dam soup configs/search/soup.yaml o"]
    assert "without a language" in problems("```\ndam soup a b\n```\n", "x.md")[0]
    assert problems("```text\ndam soup a b\n```\n```yaml\nmerge_method: ties\n```\n", "x.md") == []


def test_the_link_check_catches_a_missing_file_and_anchor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "page.md").write_text("# A page\n\n## Step time (`x`)\n")
    (tmp_path / "configs").mkdir()
    readme = tmp_path / "README.md"
    readme.write_text(
        "[ok](docs/page.md#step-time-x) [dir](configs) `[code](nowhere.md)`\n"
        "[gone](configs/gone.yaml) [anchor](docs/page.md#nope)\n```text\n[in a block](nowhere.md)\n```\n"
    )
    assert broken_links(readme) == [
        "README.md: link 'configs/gone.yaml': configs/gone.yaml does not exist",
        "README.md: link 'docs/page.md#nope': no heading of that anchor in docs/page.md",
    ]
