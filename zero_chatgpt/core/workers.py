"""The one process pool every parallel stage uses (data cleaning, corpus encoding).

A pool from `process_pool(n)` differs from a bare ProcessPoolExecutor in what happens when
things go wrong:

* Workers die with the command. `kill -9` of the main process leaves nothing behind: each
  worker asks the kernel for SIGKILL when its parent dies (Linux `PR_SET_PDEATHSIG`) and a
  watchdog thread also exits it once the command's process is gone (a forkserver worker's
  parent is the forkserver, which itself exits when the command does; the watchdog covers
  systems without prctl). An orphan can therefore not keep writing part files that a rerun
  would read or race with.
* Ctrl-C is the command's business: workers ignore SIGINT (the terminal sends it to the
  whole process group), so the user sees one line instead of one traceback per worker, and
  on any exception the pool is torn down at once instead of waiting for running tasks.
* `n <= 1` runs every task in this process (no pool, no pickling): the same code path,
  easier to debug and fast for small inputs and property-based tests.
"""
from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import signal
import threading
import time
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from typing import Iterator

_PR_SET_PDEATHSIG = 1


def _die_with(parent_pid: int) -> None:
    """Pool initializer: exit when the process `parent_pid` (the command) is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):   # not Linux: the watchdog alone
        pass

    def watchdog() -> None:
        while True:
            try:
                os.kill(parent_pid, 0)
            except ProcessLookupError:
                os._exit(1)
            except PermissionError:   # a reused pid of another user: ours is gone
                os._exit(1)
            time.sleep(0.05)   # a syscall per 50 ms: an orphan outlives the command by at most that

    if not _alive(parent_pid):
        os._exit(1)
    threading.Thread(target=watchdog, daemon=True, name="zc-parent-watchdog").start()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def command_alive(pid: int) -> bool:
    """Whether the command that started this worker still runs (tasks check it before they
    publish a result, so nothing finished after the command died is ever published)."""
    return _alive(pid)


class InlineExecutor(Executor):
    """Runs each task at submit time, in this process; exceptions land in the Future."""

    def submit(self, fn, /, *args, **kwargs) -> Future:
        fut: Future = Future()
        try:
            fut.set_result(fn(*args, **kwargs))
        except BaseException as e:   # noqa: BLE001 - delivered through the future, as a pool would
            if isinstance(e, KeyboardInterrupt):
                raise
            fut.set_exception(e)
        return fut


def fault_point(name: str) -> None:
    """A test hook: with ZC_DATA_FAULT_DIR set, the task that reaches `name` while the file
    kill-<name> exists there claims it (the first one only) and dies as if killed."""
    d = os.environ.get("ZC_DATA_FAULT_DIR")
    if not d:
        return
    arm = os.path.join(d, f"kill-{name}")
    try:
        os.rename(arm, arm + ".fired")
    except OSError:
        return
    os.kill(os.getpid(), signal.SIGKILL)


@contextlib.contextmanager
def process_pool(n: int, start_method: str = "forkserver") -> Iterator[Executor]:
    """An executor of `n` worker processes that die with this one (see the module docstring).

    forkserver (the default) and spawn never fork this process, which may hold threads
    (torch's thread pools when stages run in one process, e.g. under `zero-chatgpt run`):
    forking a threaded process can deadlock.
    """
    if n <= 1:
        yield InlineExecutor()
        return
    pool = ProcessPoolExecutor(max_workers=n, mp_context=multiprocessing.get_context(start_method),
                               initializer=_die_with, initargs=(os.getpid(),))
    try:
        yield pool
    except BaseException:
        # Do not wait for running tasks (minutes, for big parts): stop the workers now.
        procs = list((getattr(pool, "_processes", None) or {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        for p in procs:
            with contextlib.suppress(Exception):
                p.kill()
        for p in procs:
            with contextlib.suppress(Exception):
                p.join(timeout=5)
        # The pool's manager thread closes its wake-up pipe as it ends; exiting while it does races
        # CPython's atexit hook, which writes to that pipe (an "Exception ignored ... Bad file descriptor"
        # traceback after Ctrl-C; the hook takes a lock from 3.12 on). Let it finish first.
        manager = getattr(pool, "_executor_manager_thread", None)
        if manager is not None:
            with contextlib.suppress(Exception):
                manager.join(timeout=5)
        raise
    else:
        pool.shutdown(wait=True)
