"""dam.progress (bars on a terminal only, a line per phase, --quiet) and the demo's measured child processes (their
own peak memory; no leaked-semaphore warnings at exit)."""

from __future__ import annotations

import io
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dam.demo.children import ChildError, MeasuredChild, peak_rss_mib
from dam.demo.run import measured
from dam.errors import DamError
from dam.progress import QUIET_ENV, bars_shown, phase, progress_bar, quiet, set_quiet

CHILD_MODULE = """
import multiprocessing

KEEP = []


def allocate(mib):
    '''Touch ``mib`` MiB, and hold a multiprocessing lock the way tqdm does (a class-level RLock).'''
    from tqdm import tqdm

    for _ in tqdm(range(2), disable=False):
        pass
    KEEP.append(multiprocessing.RLock())
    buffer = bytearray(b"\\x01") * (mib * 2**20)
    return len(buffer)


def threads():
    import torch

    return torch.get_num_threads()


def fail():
    raise ValueError("bad input 7")


def die():
    import os

    os._exit(3)


def sleep(seconds):
    import time

    time.sleep(seconds)
"""


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def loud(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(QUIET_ENV, raising=False)


def test_bars_only_on_a_terminal_and_never_quiet(loud: None, monkeypatch: pytest.MonkeyPatch) -> None:
    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)  # a redirected log
    assert not bars_shown()
    assert list(progress_bar(range(3), desc="DAM demo")) == [0, 1, 2] and log.getvalue() == ""

    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert bars_shown()
    bar = progress_bar(total=4, desc="DAM adamerging", enabled=False)  # e.g. not the main process
    assert bar.disable
    bar = progress_bar(total=4, desc="DAM adamerging")
    bar.update(4)
    bar.close()
    assert "DAM adamerging" in terminal.getvalue()

    set_quiet(True)
    assert quiet() and not bars_shown() and progress_bar(total=1, desc="x").disable
    set_quiet(False)
    assert not quiet() and bars_shown()


def test_phase_is_one_line_at_each_end_and_silent_when_quiet(loud: None, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="dam.progress"):
        with phase("demo: classic merges"):
            pass
        assert [r.getMessage() for r in caplog.records][0] == "demo: classic merges ..."
        assert caplog.records[1].getMessage().startswith("demo: classic merges: done in ")
        caplog.clear()
        with pytest.raises(ValueError), phase("demo: failing"):
            raise ValueError("x")
        assert [r.getMessage() for r in caplog.records] == ["demo: failing ..."]  # the error line says the rest
        caplog.clear()
        set_quiet(True)
        with phase("demo: quiet"):
            pass
        set_quiet(False)
    assert caplog.records == []


def test_cli_quiet_reaches_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from dam.cli import main

    monkeypatch.delenv(QUIET_ENV, raising=False)
    monkeypatch.setattr("dam.search.soup.run_soup", lambda *a, **k: {})
    monkeypatch.setattr("dam.search.soup.format_soup", lambda summary: "soup")
    monkeypatch.setattr("dam.search.config.load_search_config", lambda *a: None)
    assert main(["soup", "c.yaml", str(tmp_path), "--quiet"]) == 0
    assert quiet()
    monkeypatch.delenv(QUIET_ENV)


def test_measured_reports_the_childs_own_peak(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A spawned child is forked from this process before its exec: ``ru_maxrss`` would report this process's size
    for it. The peak :func:`measured` records grows by what the child allocates, and stays below this process's."""
    (tmp_path / "measured_child.py").write_text(CHILD_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))  # the spawned child gets this sys.path
    import measured_child

    small, _ = measured(tmp_path / "small", measured_child.allocate, 0)
    peak0 = _["peak_rss_mib"]
    # this process holds well over what either child needs, so a peak inherited from it would show
    ballast = bytearray(b"\x01") * ((int(peak0) + 400) * 2**20)
    assert peak_rss_mib() > peak0 + 350
    result, cost = measured(tmp_path / "big", measured_child.allocate, 200)
    assert result == 200 * 2**20 and cost["seconds"] > 0
    assert 180 < cost["peak_rss_mib"] - peak0 < 260, (peak0, cost)
    assert cost["peak_rss_mib"] < peak_rss_mib() - 100
    assert (tmp_path / "big" / "cost.json").is_file()
    del ballast


def test_measured_children_leave_no_leaked_semaphores(tmp_path: Path) -> None:
    """The child holds tqdm's multiprocessing lock; it must exit on its own (a pool's terminate kills it before its
    finalizers run, and the resource tracker warns of leaked semaphores when the command exits)."""
    (tmp_path / "measured_child.py").write_text(CHILD_MODULE)
    script = textwrap.dedent(
        f"""
        import sys
        from pathlib import Path
        sys.path.insert(0, {str(tmp_path)!r})
        import measured_child
        from dam.demo.run import measured

        if __name__ == "__main__":
            for i in range(2):
                measured(Path({str(tmp_path)!r}) / str(i), measured_child.allocate, 1)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resource_tracker" not in result.stderr and "leaked" not in result.stderr, result.stderr[-2000:]


def test_measured_child_failures_reach_the_parent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The child's exception is raised again here, its traceback attached; a child that dies without answering is a
    DamError naming the function and the exit code; ``threads`` sets the child's torch threads; ``stop`` kills a
    child still running (the error path of the work done beside DAM's training)."""
    import time

    (tmp_path / "measured_child.py").write_text(CHILD_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    import measured_child

    assert measured(tmp_path / "t", measured_child.threads, threads=1)[0] == 1
    with pytest.raises(ValueError, match="bad input 7") as raised:
        measured(tmp_path / "f", measured_child.fail)
    assert isinstance(raised.value.__cause__, ChildError) and "def fail" not in str(raised.value.__cause__)
    assert "in fail" in str(raised.value.__cause__)
    assert not (tmp_path / "f" / "cost.json").exists()
    with pytest.raises(DamError, match=r"running die ended without a result \(exit code 3\)"):
        measured(tmp_path / "d", measured_child.die)
    child = MeasuredChild(measured_child.sleep, 600)
    t0 = time.perf_counter()
    child.stop()
    assert time.perf_counter() - t0 < 60 and not child._process.is_alive()


def test_wait_all_raises_the_first_failure_at_once_and_stops_the_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The children's outcomes come back in their order; a child that fails is raised as soon as it fails, even when
    a child before it in the list is still running, and that one is stopped (the real family's expert workers)."""
    import time

    from dam.demo.children import wait_all

    (tmp_path / "measured_child.py").write_text(CHILD_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    import measured_child

    outcomes = wait_all([MeasuredChild(measured_child.threads, threads=2), MeasuredChild(measured_child.allocate, 0)])
    assert [result for result, _, _ in outcomes] == [2, 0]
    sleeper = MeasuredChild(measured_child.sleep, 600)
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="bad input 7"):
        wait_all([sleeper, MeasuredChild(measured_child.fail)])
    # a spawned child starts in seconds; waiting in list order would have taken the sleeper's 600 s
    assert time.perf_counter() - t0 < 120 and not sleeper._process.is_alive()
