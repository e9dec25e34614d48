"""Where the data and tokenizer stages' tasks run: a local process pool, or Ray tasks with
`--set data.executor=ray [--set data.ray_address=...]` (`executor_for` picks).

An executor here is anything with `submit(fn, *args) -> concurrent.futures.Future`: the local
one is workers.process_pool; this one runs each call as a Ray task (`max_retries=3`: a worker
that dies mid-task is retried, and the tasks write their files atomically, so a retry gives the
same bytes) and hands back the ObjectRef's Future, so the pipeline waits on both the same way.
"""
from __future__ import annotations

import contextlib
import os
from concurrent.futures import Future
from typing import Iterator

from zero_chatgpt.core.console import info
from zero_chatgpt.core.errors import UserError
from zero_chatgpt.core.settings import DataSection
from zero_chatgpt.core.workers import process_pool


def _ray():
    try:
        import ray  # lazy: an optional extra (zero-chatgpt[ray])
    except ImportError:
        raise UserError("data.executor = 'ray' needs Ray: pip install 'zero-chatgpt[ray]'") from None
    return ray


def _task(fn, *args):
    # Ray ends a job's tasks when its driver exits, and a task on another host cannot watch the
    # driver's pid: clean_part skips its pid check (workers.command_alive) under Ray
    os.environ["ZC_RAY_TASK"] = "1"
    return fn(*args)


class RayExecutor:
    def __init__(self, ray):
        self._ray = ray
        self._task = None
        # how many tasks to cut the dedup in: the cluster's CPUs, not this machine's
        self.workers = max(1, int(ray.cluster_resources().get("CPU", 1)))

    def submit(self, fn, /, *args) -> Future:
        if self._task is None:
            self._task = self._ray.remote(max_retries=3)(_task)
        return self._task.remote(fn, *args).future()


@contextlib.contextmanager
def ray_executor(address: str, nworkers: int) -> Iterator[RayExecutor]:
    """Ray tasks on the cluster at `address` ("" = a local Ray of `nworkers` CPUs); Ray is started
    only when this process has not already started it, and then shut down at the end."""
    ray = _ray()
    started = False
    if not ray.is_initialized():
        kw = {} if address else {"num_cpus": nworkers}
        ray.init(address=address or None, include_dashboard=False, log_to_driver=False, **kw)
        started = True
    info(f"data: Ray tasks on {address or 'a local Ray'} ({int(ray.cluster_resources().get('CPU', 0))} CPUs)")
    try:
        yield RayExecutor(ray)
    finally:
        if started:
            ray.shutdown()


def executor_for(cfg: DataSection, nworkers: int):
    """Where the data stage's tasks run (cfg: the data section): a process pool of `nworkers` here, or
    Ray tasks. The tokenizer stage encodes the corpus shards on the same executor under Ray."""
    if cfg.executor == "ray":
        return ray_executor(cfg.ray_address, nworkers)
    return process_pool(nworkers)
