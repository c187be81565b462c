"""Suite-wide fixtures."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from dam.progress import QUIET_ENV


@pytest.fixture(autouse=True)
def _progress_state_per_test() -> Iterator[None]:
    """Each test starts with progress allowed and leaves the environment as it found it: an in-process ``main([...,
    "--quiet"])`` sets ``DAM_QUIET`` in ``os.environ`` for its children (and the library-bar switches of
    :func:`dam.progress.silence_library_bars`), which would otherwise silence every later test's progress lines
    and the subprocesses they start."""
    names = (QUIET_ENV, "HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS")
    saved = {name: os.environ.get(name) for name in names}
    os.environ.pop(QUIET_ENV, None)
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
