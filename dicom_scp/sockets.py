"""Latency settings for every DICOM association, inbound or outbound.

pynetdicom answers each message late by design, three ways; on loopback
with 128 KB instances over one association (bench/ingest.py) they are most
of its time per instance:

- Nagle is left on: each small PDU waits for the peer's delayed ACK (the
  SCU runs ~8x slower). TCP_NODELAY is set.
- The DUL thread sleeps 1 ms whenever a loop iteration found nothing to do,
  so a PDU that arrives, or a response queued to go out, waits up to 1 ms.
  Here that idle wait is a `select` on the association's socket and on a
  wake-up socket that queuing a PDU pokes: it ends the moment there is
  something to do, and still lasts 1 ms when there is not.
- The acceptor's reactor (`Association._run_reactor`) sleeps a fixed 1 ms
  before each look at its DIMSE queue, so every request waits up to 1 ms
  more before its handler runs. Here, on associations we accept, it waits
  on the queue itself, for up to 1 ms, instead. Not on associations we
  request: there the reactor must not take anything off the queue, since
  the sending thread reads its responses from it. pynetdicom pauses the
  reactor around each `send_*`, but a sender can pass the pause on a stale
  "paused" flag while the reactor is just waking; a reactor then waiting on
  the queue takes the response meant for the sender ("Received unexpected
  C-STORE service message", then a DIMSE timeout and an abort). On an
  association we requested where we accepted no SCP role (all of Carina's)
  nothing on the queue can be the reactor's, so its look finds nothing:
  that closes the same race, narrower, in pynetdicom itself. Its sender
  waits on the queue already.

So an idle association wakes as often as before (no extra CPU, however many
are open) and a busy one never waits for a tick. Measured with
bench/bare_pynetdicom_scp.py (the stack alone, no durable work) and Carina's
receiver in bench/ingest.py; the figures are in README.md (Performance).
The hooks replace two module-level `time` references and three methods of
pynetdicom 3.0.4 objects (pinned in pyproject.toml), per association.
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

# What pynetdicom 3.0.4 sleeps in both loops: kept as the idle wait.
_PYNETDICOM_TICK = 0.001


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
    waits_on_queue = assoc.is_acceptor  # see the module docstring: never a requestor's
    wake_r, wake_w = socket.socketpair()
    wake_r.setblocking(False)
    wake_w.setblocking(False)
    queue_pdu = dul.send_pdu

    def send_pdu(primitive) -> None:
        queue_pdu(primitive)
        try:
            wake_w.send(b"\0")
        except OSError:  # full (the DUL is awake anyway) or closed
            pass

    serves_peer: bool | None = None  # did we accept an SCP role? Known once the reactor runs

    def get_msg(block: bool = False):
        nonlocal serves_peer
        if block:  # the requestor's calls and service classes: unchanged
            return _GET_MSG(dimse, block=True)
        if not waits_on_queue:  # the reactor of an association we requested
            if serves_peer is None:  # the reactor starts once negotiation has fixed the contexts
                serves_peer = any(cx.as_scp for cx in assoc.accepted_contexts)
            if serves_peer:
                return _GET_MSG(dimse, block=False)  # it serves the peer's requests: as pynetdicom does
            return None, None  # only responses to our sender can be queued: they are its
        try:  # the reactor's look at its queue: wait there instead of in a sleep before it
            return dimse.msg_queue.get(timeout=_PYNETDICOM_TICK)
        except queue.Empty:
            return None, None

    def close(_event: evt.Event) -> None:
        dul._carina_wakeup = None
        wake_r.close()
        wake_w.close()

    dul._carina_wakeup = wake_r
    dul.send_pdu = send_pdu
    dimse.get_msg = get_msg
    assoc._carina_waits_on_queue = waits_on_queue
    assoc.bind(evt.EVT_CONN_CLOSE, close)


_GET_MSG = pynetdicom.dimse.DIMSEServiceProvider.get_msg


class _DulTime:
    """`time` inside pynetdicom.dul: a DUL of a hooked association waits for
    socket data or a queued PDU instead of sleeping; others sleep as before."""

    def __getattr__(self, name: str):
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        dul = threading.current_thread()
        wake = getattr(dul, "_carina_wakeup", None)
        sock = getattr(getattr(dul, "socket", None), "socket", None)
        if wake is None or sock is None:
            time.sleep(seconds)
            return
        try:
            ready, _, _ = select.select([sock, wake], [], [], seconds)
            if wake in ready:
                while wake.recv(4096):
                    pass
        except (OSError, ValueError):  # closed meanwhile: the loop notices itself
            pass


class _ReactorTime:
    """`time` inside pynetdicom.association: the reactor tick of a hooked
    association is spent waiting on its DIMSE queue (`get_msg` above), so
    the sleep before it is skipped; every other wait is unchanged."""

    def __getattr__(self, name: str):
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        if seconds == _PYNETDICOM_TICK and getattr(threading.current_thread(), "_carina_waits_on_queue", False):
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
