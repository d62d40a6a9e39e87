"""More processes receiving on the node's DICOM port (`dicom.receiver_processes`).

Why (issue 12): one process receives at most what one GIL allows. With one
association the receiver already kept about 0.9 of a core busy on 128 KB
instances (pynetdicom's PDU handling, the header check, hashing, SQLAlchemy),
so four concurrent associations were received no faster than one. With
`receiver_processes: N` a node of role `all` or `receiver` starts N - 1
receiving processes beside its own SCP, and every one of them accepts
associations from the same listening sockets (plain and TLS): the node makes
the sockets and hands them over at spawn (dicom_scp/listener.py
`AdmittingServer`). The kernel gives each connection to one process, and the
whole association runs there: the same peer check, header check, durable
placement and committed row before the answer, on the shared database and
storage (node/intake.py builds the same SCP for both kinds of process).
Senders see one port and one AE title.

A receiving process is spawned (the node has threads), imports no torch and
runs only the SCP: no HTTP, no schedulers, no start-up sweep (only the node
sweeps, before any process listens, so no one removes another's temp files).
It talks to the node over one pipe:
- to the node: "ready" once it listens; every second, how much its counters
  (instances received, bytes, refusals, associations) grew and how many
  associations it has open, which the node adds to its own `/metrics`; and
  "wake" when a release completed studies (dicom.complete_on_release), so the
  node's workers start at once;
- from the node: "drain", at a graceful shutdown. It then stops accepting and
  lets its associations finish for up to the grace period, as the node does.
  It does the same on SIGTERM (systemd signals every process of the unit) and
  when the pipe reaches EOF: the node died, even by SIGKILL, so no receiving
  process outlives it holding the port. It ignores SIGINT: a Ctrl-C reaches
  the whole process group, and the node decides.

A receiving process that dies is started again (at most one start per slot
per `RESTART_SECONDS`). Associations it had open are lost to their senders
unacknowledged, so they send again; nothing acknowledged is lost, as an
acknowledgement means durable and committed.
"""
from __future__ import annotations

import logging
import logging.handlers
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
import time
from dataclasses import dataclass, field

from dicom_scp.scp import SharedSockets
from node import logs
from node.config import Settings
from node.metrics import Metrics

log = logging.getLogger("carina")

# The counters a receiving process adds to the node's (node/metrics.py attribute names).
RELAYED_COUNTERS = ("instances_received", "received_bytes", "instances_rejected", "associations")
REPORT_SECONDS = 1.0
RESTART_SECONDS = 5.0
READY_TIMEOUT = 120.0
# /proc/PID/comm of a receiving process (at most 15 bytes), so that ps and top tell it from the node.
PROCESS_NAME = "carina-intake"


@dataclass
class _Slot:
    index: int
    process: multiprocessing.process.BaseProcess | None = None
    conn: multiprocessing.connection.Connection | None = None
    started_at: float = 0.0
    active_associations: int = 0
    starts: int = 0
    ready: threading.Event = field(default_factory=threading.Event)


class IntakeProcesses:
    """`count` receiving processes on `sockets`, reporting to `metrics`; `wake_workers` on their "wake"."""

    def __init__(self, settings: Settings, sockets: SharedSockets, count: int, metrics: Metrics, wake_workers):
        self._settings, self._sockets, self._metrics, self._wake = settings, sockets, metrics, wake_workers
        self._mp = multiprocessing.get_context("spawn")
        self._slots = [_Slot(i + 1) for i in range(count)]
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._records = self._mp.Queue()
        # Records from the children are handled by the parent's loggers, so they
        # reach whatever handlers (stderr, rotating file, JSON) the node configured.
        self._listener = logging.handlers.QueueListener(self._records, logs.Reroute())
        self._relaying_logs = False
        self._supervisor = threading.Thread(target=self._supervise, name="intake-processes", daemon=True)

    def start(self) -> None:
        """Spawn every process and wait until each listens (or READY_TIMEOUT has passed)."""
        self._listener.start()
        self._relaying_logs = True
        for slot in self._slots:
            self._spawn(slot)
        self._supervisor.start()
        deadline = time.monotonic() + READY_TIMEOUT
        for slot in self._slots:
            # Not past a first start that failed: the supervisor keeps trying, and the node starts meanwhile.
            while not slot.ready.wait(0.1):
                if slot.starts > 1 or time.monotonic() > deadline:
                    log.error("receiving process %d did not start listening; see its log above", slot.index)
                    break
        log.info("%d more receiving process(es) accept on the DICOM port", self.listening)

    @property
    def listening(self) -> int:
        return sum(1 for slot in self._slots if slot.ready.is_set())

    @property
    def active_associations(self) -> int:
        return sum(slot.active_associations for slot in self._slots)

    def drain(self, grace: float) -> None:
        """Tell every process to stop accepting and finish within `grace`; wait for them (a
        few seconds more for their last reports), then kill those still running."""
        with self._lock:
            self._stopping.set()
            running = [(slot.index, slot.process, slot.conn) for slot in self._slots if slot.process is not None]
        for _, _, conn in running:
            try:
                conn.send(("drain", grace))
            except OSError:
                pass  # already gone
        deadline = time.monotonic() + grace + 5.0
        for index, process, _ in running:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                log.warning("receiving process %d still running after the grace period: killing it", index)
                process.kill()
                process.join()
        self._supervisor.join(2 * REPORT_SECONDS)
        if self._relaying_logs:  # not at a second drain() (the node's stop after its drain)
            self._relaying_logs = False
            self._listener.stop()

    def _spawn(self, slot: _Slot) -> None:
        with self._lock:  # under the lock that drain() sets _stopping with: a process drain() sees, or none
            if self._stopping.is_set():
                return
            parent_end, child_end = self._mp.Pipe()
            process = self._mp.Process(target=_main, name=f"carina-intake-{slot.index}", daemon=True,
                                       args=(self._settings, self._sockets, child_end, self._records))
            process.start()
            child_end.close()  # the child's copy is the only one left: its EOF is the child's end
            slot.process, slot.conn, slot.started_at = process, parent_end, time.monotonic()
            slot.starts += 1
            slot.active_associations = 0
            slot.ready.clear()

    def _supervise(self) -> None:
        """Applies the children's reports; starts again a child that died (module docstring)."""
        while True:
            with self._lock:
                by_conn = {slot.conn: slot for slot in self._slots if slot.process is not None}
            if not by_conn:
                return  # all ended while draining
            for conn in multiprocessing.connection.wait(list(by_conn), timeout=REPORT_SECONDS):
                slot = by_conn[conn]
                try:
                    message = conn.recv()
                except (EOFError, OSError):
                    self._ended(slot)
                    continue
                try:
                    self._apply(slot, message)
                except Exception:  # this thread must outlive a bad report
                    log.exception("receiving process %d: report not applied", slot.index)

    def _apply(self, slot: _Slot, message: tuple) -> None:
        kind = message[0]
        if kind == "ready":
            slot.ready.set()
        elif kind == "wake":
            self._wake()
        elif kind == "counters":
            _, grown, slot.active_associations = message
            for (name, labels), amount in grown.items():
                counter = getattr(self._metrics, name)
                (counter.labels(*labels) if labels else counter).inc(amount)

    def _ended(self, slot: _Slot) -> None:
        process = slot.process
        process.join()
        with self._lock:
            slot.process, slot.active_associations = None, 0
            slot.ready.clear()
        slot.conn.close()
        if self._stopping.is_set():
            return
        log.error("receiving process %d ended (exit code %s); starting it again", slot.index, process.exitcode)
        wait = RESTART_SECONDS - (time.monotonic() - slot.started_at)
        if wait > 0 and self._stopping.wait(wait):
            return
        self._spawn(slot)


def counter_totals(metrics: Metrics) -> dict[tuple[str, tuple[str, ...]], float]:
    """The relayed counters' values, keyed by (attribute, label values)."""
    totals = {}
    for name in RELAYED_COUNTERS:
        for family in getattr(metrics, name).collect():
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    totals[(name, tuple(sample.labels.values()))] = sample.value
    return totals


class _Reporter:
    """The child's end of the pipe: every send under one lock, as several threads send."""

    def __init__(self, conn, metrics: Metrics):
        self._conn, self._metrics, self._lock = conn, metrics, threading.Lock()
        self._sent: dict = {}
        self._active = 0

    def send(self, message: tuple) -> None:
        with self._lock:
            try:
                self._conn.send(message)
            except OSError:
                pass  # the node is gone; the lifeline ends this process

    def wake(self) -> None:
        self.send(("wake",))

    def counters(self, active: int) -> None:
        totals = counter_totals(self._metrics)
        grown = {key: value - self._sent.get(key, 0.0) for key, value in totals.items()
                 if value != self._sent.get(key, 0.0)}
        if grown or active != self._active:
            self.send(("counters", grown, active))
            self._sent, self._active = totals, active


def _name_process(name: str) -> None:
    """What `ps -o comm`, `top` and /proc/PID/comm show for this process (Linux; elsewhere nothing)."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        pass


def _main(settings: Settings, sockets: SharedSockets, conn, records) -> None:
    """A receiving process: the node's SCP on the node's sockets, until told to drain."""
    from node.context import NodeContext
    from node.db import Database
    from node.intake import Intake, peer_policy, prepare_storage, tls_listener

    _name_process(PROCESS_NAME)
    logs.forward_to(records, settings.logging.level)
    grace = [settings.shutdown.grace_seconds]
    drain = threading.Event()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: drain.set())

    def lifeline() -> None:
        try:
            while True:
                message = conn.recv()
                if message[0] == "drain":
                    grace[0] = message[1]
                    break
        except (EOFError, OSError):
            pass  # the node died: drain all the same, then end
        drain.set()

    ctx = NodeContext(settings=settings, db=Database(settings.database_url), role="intake", ready={"scp": False})
    prepare_storage(ctx)
    reporter = _Reporter(conn, ctx.metrics)
    scp = Intake(ctx, wake_workers=reporter.wake).scp(peer_policy(ctx, warn=False), tls_listener(settings), sockets)
    scp.start()
    threading.Thread(target=lifeline, name="lifeline", daemon=True).start()
    reporter.send(("ready",))
    while not drain.wait(REPORT_SECONDS):
        reporter.counters(scp.active_associations)
    scp.stop(grace[0])
    reporter.counters(0)
    ctx.db.dispose()
    logging.shutdown()
    os._exit(0)
