"""Progress a user can trust: a tqdm bar on a terminal only, one log line per phase, nothing under ``--quiet``.

Every long-running step of dam (merges, RegMean, soups, searches, evaluation, the demo's phases, DAM training)
shows its progress through this module:

- :func:`progress_bar` is a tqdm bar when stderr is a terminal and :func:`quiet` is off; redirected to a log (or
  quiet) it is a disabled bar, so a log holds no bar frames;
- :func:`phase` logs one line when a phase starts and one when it ends, with its seconds (silent when quiet), so a
  log says what ran and for how long.

``--quiet`` (:func:`set_quiet`) is kept in the environment (``DAM_QUIET=1``), so the child processes a command
starts (the demo's measured merges) are quiet too.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

QUIET_ENV = "DAM_QUIET"

logger = logging.getLogger(__name__)


def set_quiet(quiet: bool) -> None:
    """Silence (``True``) or allow every progress bar and phase line of this process and of its future children."""
    if quiet:
        os.environ[QUIET_ENV] = "1"
    else:
        os.environ.pop(QUIET_ENV, None)


def quiet() -> bool:
    """Whether progress is silenced (``--quiet``, or ``DAM_QUIET=1`` in the environment)."""
    return os.environ.get(QUIET_ENV, "") not in ("", "0")


def bars_shown() -> bool:
    """Whether a bar is drawn: stderr is a terminal and progress is not silenced."""
    return not quiet() and sys.stderr.isatty()


def silence_library_bars() -> None:
    """When no bar is shown (:func:`bars_shown` False: a log, or ``--quiet``), turn off the bars of the libraries
    too (transformers' weight loading and shard writing, huggingface_hub's, datasets' tokenizing) for this process
    and its children, through their environment switches (read when they are imported, so call this first); a
    switch the user set is kept."""
    if not bars_shown():
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")


def progress_bar(
    iterable: Iterable[Any] | None = None,
    *,
    desc: str,
    total: float | None = None,
    initial: int = 0,
    unit: str = "it",
    enabled: bool = True,
    leave: bool = False,
    position: int | None = None,
) -> Any:
    """A ``tqdm`` bar named ``desc`` (e.g. ``"DAM adamerging"``), drawn only when :func:`bars_shown` and
    ``enabled`` (e.g. ``enabled=accelerator.is_local_main_process``); otherwise a disabled bar that writes nothing
    but still iterates, ``update``s and ``close``s. ``position``: the terminal line of the bar, for processes that
    draw bars side by side (tqdm's own default otherwise)."""
    from tqdm import tqdm

    return tqdm(
        iterable,
        desc=desc,
        total=total,
        initial=initial,
        unit=unit,
        leave=leave,
        position=position,
        dynamic_ncols=True,
        disable=not (enabled and bars_shown()),
    )


@contextlib.contextmanager
def phase(what: str, *, log: logging.Logger | None = None) -> Iterator[None]:
    """Log ``what ...`` when the block starts and ``what: done in N s`` when it ends, on ``log`` (default this
    module's logger) at INFO; nothing when :func:`quiet`. A block that raises logs no end line: the command's one
    ``error:`` line says what went wrong."""
    log = log or logger
    shown = not quiet()
    if shown:
        log.info("%s ...", what)
    start = time.perf_counter()
    yield
    if shown:
        log.info("%s: done in %.1f s", what, time.perf_counter() - start)
