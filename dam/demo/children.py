"""Work in child processes of its own, measured: :class:`MeasuredChild` (a spawned child's result, wall time and own
peak memory, its exception raised again in the parent) and :func:`wait_all` for several at once. The demo's
trainings and merges (:mod:`dam.demo.run`) and the real family's expert workers (:mod:`dam.demo.real`) run in them."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from dam.errors import DamError


def peak_rss_mib() -> float:
    """This process's own peak resident memory in MiB: ``VmHWM`` of ``/proc/self/status`` on Linux (the high-water
    mark of this process's address space, which starts afresh at ``exec``), ``ru_maxrss`` elsewhere.

    Not ``ru_maxrss`` on Linux: it survives ``exec``, so a child started by fork and exec (multiprocessing's
    spawn) reports at least the size of the parent it was forked from."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB elsewhere


class ChildError(Exception):
    """The traceback of an exception raised in a :class:`MeasuredChild`, attached as the ``__cause__`` of the
    exception raised again in the parent."""


def _child(conn: Any, fn: Any, args: tuple[Any, ...], threads: int | None) -> None:
    """Run ``fn(*args)`` and send ``("ok", (result, seconds, peak MiB))`` or ``("error", (exception, traceback))``
    on ``conn``; then return, so that the process exits on its own and its finalizers run (a killed child leaves
    its semaphores, tqdm's lock among them, to the resource tracker's "leaked semaphore" warnings at exit)."""
    import traceback

    try:
        if threads is not None:
            import torch

            torch.set_num_threads(threads)
        t0 = time.perf_counter()
        result = fn(*args)
        conn.send(("ok", (result, time.perf_counter() - t0, peak_rss_mib())))
    except BaseException as e:  # raised again in the parent
        trace = traceback.format_exc()
        try:
            conn.send(("error", (e, trace)))
        except Exception:  # an exception that does not pickle
            conn.send(("error", (RuntimeError(f"{type(e).__name__}: {e}"), trace)))
    finally:
        conn.close()


class MeasuredChild:
    """``fn(*args)`` started in a fresh child process (spawned: nothing of this process's memory is inherited), at
    ``threads`` torch threads if given, so that its wall time and peak resident memory (:func:`peak_rss_mib`, the
    child's imports included) are its own. :meth:`wait` for its result; :meth:`stop` kills it if it still runs
    (the error path of work done beside it)."""

    def __init__(self, fn: Any, *args: Any, threads: int | None = None):
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        self._conn, child_conn = context.Pipe(duplex=False)
        self._process = context.Process(target=_child, args=(child_conn, fn, args, threads))
        self._process.start()
        child_conn.close()
        self._name = getattr(fn, "__name__", str(fn))

    def wait(self) -> tuple[Any, float, float]:
        """``(result, seconds, peak MiB)`` once the child has returned; its exception is raised here."""
        try:
            status, payload = self._conn.recv()
        except EOFError:  # the child died before it could answer (killed, out of memory)
            self._process.join()
            raise DamError(
                f"the child process running {self._name} ended without a result (exit code {self._process.exitcode})"
            ) from None
        finally:
            self._conn.close()
        self._process.join()
        if status == "error":
            error, trace = payload
            raise error from ChildError(trace)
        return payload

    def stop(self) -> None:
        """Kill the child if it still runs (no-op after :meth:`wait`)."""
        if self._process.is_alive():
            self._process.terminate()
            self._process.join()


def wait_all(children: list[MeasuredChild]) -> list[tuple[Any, float, float]]:
    """Every child's :meth:`MeasuredChild.wait` outcome, in the children's order, taken as each finishes: the first
    child to fail has its exception raised here at once (not after the children before it in the list) and the
    others are stopped."""
    from multiprocessing.connection import wait

    outcomes: dict[int, tuple[Any, float, float]] = {}
    try:
        while len(outcomes) < len(children):
            pending = {child._conn: i for i, child in enumerate(children) if i not in outcomes}
            for conn in wait(list(pending)):
                outcomes[pending[conn]] = children[pending[conn]].wait()
    finally:
        for child in children:
            child.stop()
    return [outcomes[i] for i in range(len(children))]
