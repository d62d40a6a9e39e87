"""One record per inbound association, for the audit trail.

The SCP reports each association once when its negotiation ends ("accepted"
or "rejected") and, if it was accepted, once more when it ends ("released" or
"aborted", with the studies it brought). Never per instance. Callbacks run on
their own thread, in order, so a slow audit sink never holds up a C-STORE
response or a release.
"""
from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass
from typing import Callable, Literal

log = logging.getLogger(__name__)

Kind = Literal["accepted", "rejected", "released", "aborted"]


@dataclass(frozen=True)
class AssociationEvent:
    kind: Kind
    calling_ae: str
    called_ae: str
    peer_address: str
    peer_port: int
    reason: str = ""  # why it was rejected (or how it ended, for an abort)
    study_uids: tuple[str, ...] = ()  # for released/aborted: the studies it brought
    tls: bool = False  # arrived on the TLS listener


AssociationCallback = Callable[[AssociationEvent], None]


class EventDispatcher:
    """Calls `callback(event)` on a dedicated thread, in the order events were emitted."""

    _STOP = object()

    def __init__(self, callback: AssociationCallback):
        self._callback = callback
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="association-events", daemon=True)
        self._thread.start()

    def emit(self, event: AssociationEvent) -> None:
        self._queue.put(event)

    def close(self, timeout: float = 10.0) -> None:
        """Deliver what is queued, then stop."""
        self._queue.put(self._STOP)
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            event = self._queue.get()
            if event is self._STOP:
                return
            try:
                self._callback(event)
            except Exception:
                log.exception("association event callback failed for a %s association", event.kind)
