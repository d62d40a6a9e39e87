"""The lease heartbeat: a running stage keeps its job's lease alive, and stops
itself when it cannot.

A job is claimed for `pipeline.lease_seconds`; a stage may run far longer (a
slow PACS, a big study). While it runs, a thread renews the lease every
lease/3. When a renewal says the job is no longer ours (another worker took it
over, or shutdown released it), or when renewals keep failing until the lease
has run out (the database is unreachable), the heartbeat is *lost*: from then
on the stage must not cause a side effect. `check_lease()` raises `LeaseLost`
at the points a stage is about to act (before a delivery sends, between the
objects it sends), and `settle_in` refuses the outcome anyway. So a stage is
never run by two workers at the same time, however long it takes.

The running stage finds its heartbeat through a context variable, so stages
keep their `run(ctx, work)` signature.
"""
from __future__ import annotations

import contextvars
import logging
import threading
import time

from node.db import Database, Job
from node.jobs import LeaseLost, renew

log = logging.getLogger(__name__)

_current: contextvars.ContextVar["Heartbeat | None"] = contextvars.ContextVar("carina_lease", default=None)


class Heartbeat:
    def __init__(self, db: Database, job: Job, lease_seconds: float):
        self.db, self.job, self.lease_seconds = db, job, lease_seconds
        self.interval = lease_seconds / 3
        self._lost = threading.Event()
        self._done = threading.Event()
        # Held while a renewal runs, so `stop()` returns only when none is in flight.
        self._renewing = threading.Lock()
        self._thread = threading.Thread(target=self._beat, name=f"lease-{job.id}", daemon=True)
        # Monotonic time until which the last successful renewal holds the lease.
        self._valid_until = time.monotonic() + lease_seconds

    def __enter__(self) -> "Heartbeat":
        self._token = _current.set(self)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join(self.interval + 5)
        _current.reset(self._token)

    @property
    def lost(self) -> bool:
        # Also lost when the heartbeat thread could not renew in time (e.g. the
        # database was unreachable): the lease has expired by our own clock.
        return self._lost.is_set() or time.monotonic() >= self._valid_until

    def lose(self, why: str) -> None:
        if not self._lost.is_set():
            log.warning("job %d (%s): lease lost: %s; the stage stops", self.job.id, self.job.stage, why)
        self._lost.set()

    def stop(self) -> None:
        """No more renewals: the stage is about to settle. Without this a
        renewal racing the settle's commit would find the job done, "no longer
        ours", and log a lease loss that never happened."""
        with self._renewing:
            self._done.set()

    def check(self) -> None:
        if self.lost:
            raise LeaseLost(f"job {self.job.id} ({self.job.stage}) lost its lease; it stops before acting")

    def _beat(self) -> None:
        while not self._done.wait(self.interval):
            with self._renewing:
                if self._done.is_set():
                    return
                if not self._renew_once():
                    return

    def _renew_once(self) -> bool:
        """One renewal; False when the lease is lost and the heartbeat ends."""
        started = time.monotonic()
        try:
            if not renew(self.db, self.job, self.lease_seconds):
                self.lose("the job is no longer ours")
                return False
            self._valid_until = started + self.lease_seconds
        except Exception as exc:  # database briefly unreachable: retry until the lease runs out
            log.warning("job %d: lease renewal failed (%s)", self.job.id, type(exc).__name__)
        if self.lost:
            self.lose("renewals failed until the lease expired")
            return False
        return True


def check_lease() -> None:
    """Raise LeaseLost when the running stage's lease is gone (no-op outside a stage)."""
    beat = _current.get()
    if beat is not None:
        beat.check()


def stop_renewing() -> None:
    """The running stage is about to settle (no-op outside a stage)."""
    beat = _current.get()
    if beat is not None:
        beat.stop()


def lease_lost() -> bool:
    beat = _current.get()
    return beat is not None and beat.lost
