"""Encode and capture run in separate processes, so that they do not share the GIL
of the process that receives, scores and sends (`pipeline.stage_processes`).

Why (issue 12): in a burst the all-in-one node kept only 1.3-1.5 of the 2 cores
busy whatever its worker count. Apart from the forward pass, which releases the
GIL, nearly all its work is Python holding one interpreter lock: the SCP's
reactors, building the SR, drawing the SCs, pynetdicom sending them. Encode and
capture are the two largest shares and need neither the database nor the
model: their `run(ctx, work)` takes typed, picklable work and returns a typed
outcome (node/pipeline/__init__.py). So the worker thread that claimed the job
keeps the lease (its heartbeat), loads and settles as before, and only `run`
goes to a stage process.

A stage process is spawned (not forked: the node has threads, torch's among
them), imports only the output code (no torch, ~140 MB), and keeps running
between jobs. It has no database and no in-memory renditions: the parent waits
for a study's renditions to be on disk before handing over (node/renditions.py
`settle`), and the child reads the `.npy` files. Its log records go through a
queue to the parent's handlers, with the job's context fields (study UID, job
id; never PHI). A stage process that dies (OOM killer, a crash in native code)
fails the job as retryable and the pool is replaced; nothing was settled, so
the job runs again. A node that dies, even by SIGKILL, takes its stage
processes with it (a pipe only the node writes to reaches EOF), so none is
left behind holding memory.
"""
from __future__ import annotations

import logging
import logging.handlers
import multiprocessing
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from node import logs
from node.config import Settings
from node.jobs import RetryableError
from node.states import Stage

log = logging.getLogger(__name__)

# The stages whose `run` a stage process takes; the others need the model (infer)
# or are mostly waiting on a peer (deliver).
OFFLOADED = (Stage.ENCODE, Stage.CAPTURE)


class StageProcesses:
    """A pool of `count` stage processes; `run(stage, work)` blocks until the outcome is back."""

    def __init__(self, settings: Settings, count: int):
        self._settings, self._count = settings, count
        self._mp = multiprocessing.get_context("spawn")
        self._lock = threading.Lock()
        self._pool: ProcessPoolExecutor | None = None
        self._records = self._mp.Queue()
        # Only this process holds the sending end: when it dies, even by SIGKILL, the
        # stage processes read EOF and exit, instead of waiting for work forever.
        self._lifeline, self._lifeline_end = self._mp.Pipe(duplex=False)
        # Records from the children are handled by the parent's loggers, so they
        # reach whatever handlers (stderr, rotating file, JSON) the node configured.
        self._listener = logging.handlers.QueueListener(self._records, logs.Reroute())
        self._listener.start()

    def start(self) -> None:
        """Spawn every process now and wait for its imports, so the first study does not pay for them."""
        pool = self._executor()
        for ready in [pool.submit(_warm) for _ in range(self._count)]:
            ready.result()

    def run(self, stage: Stage, work):
        pool = self._executor()
        try:
            return pool.submit(_run, stage, work, logs.current_context()).result()
        except BrokenProcessPool:
            self._replace(pool)
            raise RetryableError(f"{stage} process died") from None

    def stop(self, grace: float = 1.0) -> None:
        """Idle processes exit at once. One still running a stage is past the drain's grace
        (the worker pool has released that job's lease, so its outcome would not settle
        anyway): it gets `grace` seconds, then is terminated. Its files are written by
        rename (node/storage.py), so none is left half-written."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            children = list(getattr(pool, "_processes", {}).values())  # no public handle on them
            pool.shutdown(wait=False, cancel_futures=True)
            deadline = time.monotonic() + grace
            for child in children:
                child.join(max(0.0, deadline - time.monotonic()))
                if child.is_alive():
                    child.terminate()
                    child.join()
        self._lifeline_end.close()
        self._listener.stop()
        self._records.close()

    def _executor(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ProcessPoolExecutor(self._count, mp_context=self._mp, initializer=_child_init,
                                                 initargs=(self._settings, self._records, self._lifeline))
            return self._pool

    def _replace(self, broken: ProcessPoolExecutor) -> None:
        with self._lock:
            if self._pool is broken:
                self._pool = None
        log.error("a stage process died; its job will run again in a new one")
        broken.shutdown(wait=False, cancel_futures=True)


# In a stage process: the context its stages run with, and the stages, set up once by `_child_init`.
_CHILD = None
_STAGES: dict = {}


def _child_init(settings: Settings, records, lifeline) -> None:
    from node.context import NodeContext
    from node.pipeline import capture, encode  # imported once, before any job

    global _CHILD
    threading.Thread(target=_exit_with_parent, args=(lifeline,), name="lifeline", daemon=True).start()
    logs.forward_to(records, settings.logging.level)
    # No database: `run` never touches it (node/pipeline/__init__.py), and a
    # stage process must not hold connections the parent does not count.
    _CHILD = NodeContext(settings=settings, db=None)
    _STAGES.update({Stage.ENCODE: encode, Stage.CAPTURE: capture})


def _exit_with_parent(lifeline) -> None:
    """Blocks until the node's end of the pipe closes (it never sends), then ends this process."""
    try:
        lifeline.recv()
    except (EOFError, OSError):
        pass
    os._exit(0)


def _warm() -> None:
    """Nothing: the initializer has run by the time a task runs."""


def _run(stage: Stage, work, context: dict):
    with logs.log_context(**context):
        return _STAGES[stage].run(_CHILD, work)
