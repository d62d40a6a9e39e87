"""Latency settings for every DICOM association, inbound or outbound.

pynetdicom answers each message late by design, three ways; on loopback
with 128 KB instances over one association (bench/ingest.py) they are most
of its time per instance:

- Nagle is left on: each small PDU waits for the peer's delayed ACK (the
  SCU runs ~8x slower). TCP_NODELAY is set.
- The DUL thread sleeps 1 ms whenever a loop iteration found nothing to do,
  so a PDU that arrives, or a response queued to go out, waits up to 1 ms.
  Here that idle wait is a `select` on the association's socket and on a
  wake-up socket that queuing a PDU or stopping the DUL pokes: it ends the
  moment there is something to do.
- The acceptor's reactor (`Association._run_reactor`) sleeps a fixed 1 ms
  before each look at its DIMSE queue, so every request waits up to 1 ms
  more before its handler runs. Here, on associations we accept, it waits
  instead for work: a complete DIMSE message, or a primitive the DUL hands
  up (the peer's A-RELEASE or A-ABORT), each of which sets an event. Not on
  associations we request: there the reactor must not take anything off the
  queue, since the sending thread reads its responses from it. pynetdicom
  pauses the reactor around each `send_*`, but a sender can pass the pause
  on a stale "paused" flag while the reactor is just waking; a reactor then
  waiting on the queue takes the response meant for the sender ("Received
  unexpected C-STORE service message", then a DIMSE timeout and an abort).
  On an association we requested where we accepted no SCP role (all of
  Carina's) nothing on the queue can be the reactor's, so its look finds
  nothing: that closes the same race, narrower, in pynetdicom itself. Its
  sender waits on the queue already, and its reactor keeps the 1 ms tick
  (each `send_*` waits for the reactor to pause, so a longer wait there
  would delay every send).

Since nothing reaches a hooked DUL or acceptor reactor without waking it,
their idle wait need not be short: it is `IDLE_WAIT` (20 ms), left only for
what pynetdicom checks on a clock (the ARTIM and idle timers, a flag set
from another thread that no hook sees). With pynetdicom's 1 ms, every open
association woke two threads a thousand times a second each, and each
wake-up takes the GIL: four busy associations meant ~8000 GIL hand-overs a
second among the threads that do the work, and four associations received
fewer instances per second than one (bench/ingest.py).

So a busy association never waits for a tick and an idle one wakes 50 times
a second instead of 2000. Measured with
bench/bare_pynetdicom_scp.py (the stack alone, no durable work) and Carina's
receiver in bench/ingest.py; the figures are in README.md (Performance).
The hooks replace two module-level `time` references and, per association,
the DUL's `send_pdu` and `kill_dul`, the DIMSE provider's `get_msg` and the
`put` of its message queue and of the DUL's queue to the user, all of
pynetdicom 3.0.4 (pinned in pyproject.toml).
"""
from __future__ import annotations

import logging
import queue
import select
import socket
import threading
import time

import pynetdicom
import pynetdicom.association
import pynetdicom.dimse
import pynetdicom.dul
from pynetdicom import evt

log = logging.getLogger(__name__)

# What pynetdicom 3.0.4 sleeps in both loops.
_PYNETDICOM_TICK = 0.001
# How long a hooked DUL or acceptor reactor waits when nothing wakes it (see above).
IDLE_WAIT = 0.02


def _low_latency(event: evt.Event) -> None:
    assoc = event.assoc
    try:
        sock = assoc.dul.socket.socket
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (AttributeError, OSError) as exc:  # closed before we got to it
        log.debug("could not set TCP_NODELAY: %s", exc)
    if isinstance(assoc, pynetdicom.association.Association) and pynetdicom.__version__ == "3.0.4":
        _wake_on_work(assoc)


LOW_LATENCY_HANDLER = (evt.EVT_CONN_OPEN, _low_latency)


def _wake_on_work(assoc: pynetdicom.association.Association) -> None:
    dul, dimse = assoc.dul, assoc.dimse
    waits_for_work = assoc.is_acceptor  # see the module docstring: never a requestor's reactor
    wake_r, wake_w = socket.socketpair()
    wake_r.setblocking(False)
    wake_w.setblocking(False)

    def wake_dul() -> None:
        try:
            wake_w.send(b"\0")
        except OSError:  # full (the DUL is awake anyway) or closed
            pass

    queue_pdu, kill_dul = dul.send_pdu, dul.kill_dul

    def send_pdu(primitive) -> None:
        queue_pdu(primitive)
        wake_dul()

    def kill() -> None:  # also called from the requestor's thread (a rejection, an abort)
        kill_dul()
        wake_dul()

    work = threading.Event()  # set whenever the acceptor's reactor has something to look at
    for handed_up in (dimse.msg_queue, dul.to_user_queue):  # DIMSE messages; A-RELEASE, A-ABORT
        _set_after_put(handed_up, work)

    serves_peer: bool | None = None  # did we accept an SCP role? Known once the reactor runs

    def get_msg(block: bool = False):
        nonlocal serves_peer
        if block:  # the requestor's calls and service classes: unchanged
            return _GET_MSG(dimse, block=True)
        if not waits_for_work:  # the reactor of an association we requested
            if serves_peer is None:  # the reactor starts once negotiation has fixed the contexts
                serves_peer = any(cx.as_scp for cx in assoc.accepted_contexts)
            if serves_peer:
                return _GET_MSG(dimse, block=False)  # it serves the peer's requests: as pynetdicom does
            return None, None  # only responses to our sender can be queued: they are its
        # The acceptor's reactor: clear, look, then wait. A put after the clear
        # is either seen by the look or sets the event the wait returns on.
        work.clear()
        try:
            return dimse.msg_queue.get_nowait()
        except queue.Empty:
            pass
        work.wait(IDLE_WAIT)
        try:
            return dimse.msg_queue.get_nowait()
        except queue.Empty:  # a release, an abort, or the idle wait over: the reactor checks them
            return None, None

    def close(_event: evt.Event) -> None:
        dul._carina_wakeup = None
        wake_r.close()
        wake_w.close()

    dul._carina_wakeup = wake_r
    dul.send_pdu = send_pdu
    dul.kill_dul = kill
    dimse.get_msg = get_msg
    assoc._carina_waits_for_work = waits_for_work
    assoc.bind(evt.EVT_CONN_CLOSE, close)


def _set_after_put(q: queue.Queue, event: threading.Event) -> None:
    """Make `q.put` set `event` once the item is in (pynetdicom calls `put`
    on the instance, so the instance attribute takes the call)."""
    put = q.put

    def put_and_set(item, block: bool = True, timeout: float | None = None) -> None:
        put(item, block, timeout)
        event.set()

    q.put = put_and_set


_GET_MSG = pynetdicom.dimse.DIMSEServiceProvider.get_msg


class _DulTime:
    """`time` inside pynetdicom.dul: a DUL of a hooked association waits for
    socket data, a queued PDU or its stop instead of sleeping; others sleep
    as before."""

    def __getattr__(self, name: str):
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        dul = threading.current_thread()
        wake = getattr(dul, "_carina_wakeup", None)
        sock = getattr(getattr(dul, "socket", None), "socket", None)
        if wake is None or sock is None:  # not hooked, or the connection is gone: pynetdicom's own tick
            time.sleep(seconds)
            return
        if getattr(dul, "_kill_thread", False):  # stopping: the loop checks it next
            return
        try:
            ready, _, _ = select.select([sock, wake], [], [], max(seconds, IDLE_WAIT))
            if wake in ready:
                while wake.recv(4096):
                    pass
        except (OSError, ValueError):  # closed meanwhile: the loop notices itself
            pass


class _ReactorTime:
    """`time` inside pynetdicom.association: the tick of a hooked acceptor's
    reactor is spent waiting for work (`get_msg` above), so the sleep before
    it is skipped; every other wait is unchanged."""

    def __getattr__(self, name: str):
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        if seconds == _PYNETDICOM_TICK and getattr(threading.current_thread(), "_carina_waits_for_work", False):
            return
        time.sleep(seconds)


def install() -> None:
    """Put the two `time` stand-ins in place (once, process-wide). They change
    nothing for an association `LOW_LATENCY_HANDLER` has not hooked."""
    if pynetdicom.__version__ != "3.0.4":
        log.warning("pynetdicom %s: its 1 ms polling is left as is (the hooks are for 3.0.4)", pynetdicom.__version__)
        return
    if not isinstance(pynetdicom.dul.time, _DulTime):
        pynetdicom.dul.time = _DulTime()
    if not isinstance(pynetdicom.association.time, _ReactorTime):
        pynetdicom.association.time = _ReactorTime()


install()
