"""Per-item work in worker processes, where a worker killed mid-item costs that item only.

`concurrent.futures.ProcessPoolExecutor` marks the whole pool broken when one worker dies
(the OOM killer, SIGKILL), failing every queued item with it. `run_in_processes` keeps at most
`workers` items in flight, so when a pool breaks the suspects are exactly those in flight; it
re-runs each suspect alone in a fresh pool (an innocent one completes, the culprit breaks its
pool again and is reported through `failed`) and carries on with the rest in a new pool.
Workers also end with the run that started them: a killed `fm3d prepare` leaves no process behind.
"""

from __future__ import annotations

import logging
import os
import select
import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.context import BaseContext
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

KILLED_REASON = (
    "its worker process died while preparing it (killed by a signal, e.g. SIGKILL from the "
    "out-of-memory killer); the other studies went on"
)


def run_in_processes(
    fn: Callable[[T], R],
    tasks: list[T],
    workers: int,
    *,
    failed: Callable[[T, str], R],
    context: BaseContext,
    initializer: Callable[..., None] | None = None,
    initargs: tuple[Any, ...] = (),
) -> Iterator[R]:
    """`fn(task)` for every task, in completion order; `failed(task, reason)` for a task whose
    worker died or whose call raised, so every task yields exactly one result."""
    queue = deque(tasks)
    settings = (context, (os.getpid(), initializer, initargs))
    while queue:
        suspects = yield from _until_broken(fn, queue, workers, failed, settings)
        for task in suspects:
            if (yield from _until_broken(fn, deque([task]), 1, failed, settings)):
                logger.warning("a worker died while running %r alone; recording it as failed", task)
                yield failed(task, KILLED_REASON)


def _until_broken(
    fn: Callable[[T], R],
    queue: deque[T],
    workers: int,
    failed: Callable[[T, str], R],
    settings: tuple[BaseContext, tuple[Any, ...]],
) -> Generator[R, None, list[T]]:
    """Run queued tasks, at most `workers` at a time, until done or the pool breaks.

    Returns the tasks that were in flight when it broke (empty when it did not); the tasks
    never started stay in `queue`.
    """
    context, start_args = settings
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker, initargs=start_args)
    in_flight: dict[Future[R], T] = {}
    suspects: list[T] = []
    try:
        while queue or in_flight:
            while queue and len(in_flight) < workers:
                task = queue.popleft()
                in_flight[pool.submit(fn, task)] = task
            done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
            if any(isinstance(f.exception(), BrokenProcessPool) for f in done):
                done, _ = wait(in_flight)  # every other future fails at once with the pool
            for future in done:
                task = in_flight.pop(future)
                error = future.exception()
                if isinstance(error, BrokenProcessPool):
                    suspects.append(task)
                elif error is not None:  # fn itself raised, or its result could not be pickled
                    yield failed(task, f"{type(error).__name__}: {error}")
                else:
                    yield future.result()
            if suspects:
                return suspects
        return suspects
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _start_worker(run_pid: int, initializer: Callable[..., None] | None, initargs: tuple[Any, ...]) -> None:
    _exit_with(run_pid)
    if initializer is not None:
        initializer(*initargs)


def _exit_with(run_pid: int) -> None:
    """End this worker as soon as the run that started it is gone, however it died.

    The worker's parent is the fork server, which itself waits for its workers to close their
    end of its liveness pipe: without this watch, a SIGKILLed run leaves both behind for ever.
    """
    try:
        handle = os.pidfd_open(run_pid)  # Linux >= 5.3: readable once the process has exited
    except (AttributeError, OSError):
        handle = None

    def watch() -> None:
        if handle is not None:
            select.select([handle], [], [])
        else:
            while _alive(run_pid):
                time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="fm3d-exit-with-run", daemon=True).start()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else (the pid was reused)
        return True
    return True
