"""Forward the audit trail to a syslog collector, as IHE ATNA does (ITI-20).

Each record goes out as one RFC 5424 message over TCP, optionally TLS
(RFC 5425), framed by octet counting ("LEN SP MSG", RFC 5425 section 4.3 /
RFC 6587 section 3.4.1):

    <PRI>1 TIMESTAMP HOSTNAME carina PID IHE+RFC-3881 [carina@32473 seq=".." hash=".." prev=".."] BOM<AuditMessage .../>

PRI is facility 10 (security/authorization) with severity 5 (notice) for a
success and 4 (warning) otherwise. The structured data carries the record's
place in the hash chain, so the collector's copy can be compared with the
node's (`carina audit verify` checks the node's own chain).

Delivery is in order and resumes where it stopped: a thread sends every record
after the last one written to the collector's connection (kept in
`audit_forwarding`, so a node restart resumes too), reconnecting after
`audit.syslog.reconnect_seconds` when the collector is away; records wait in
the database meanwhile. Syslog over TCP has no acknowledgement, so a record
written at the very moment the collector dies can be lost there (never in the
node's own chain, which `carina audit verify` checks).
"""
from __future__ import annotations

import datetime as dt
import logging
import os
import select
import socket
import ssl
import threading

from node.audit.trail import AuditTrail
from node.config import SyslogSettings
from node.db import AuditForwarding, AuditRecord, now

log = logging.getLogger(__name__)

FACILITY_AUTH = 10
MSGID = "IHE+RFC-3881"
SD_ID = "carina@32473"  # 32473: the enterprise number RFC 5612 reserves for documentation and examples
BOM = "\ufeff"


def _sd_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


def format_message(record: AuditRecord, *, hostname: str, app_name: str, procid: str) -> bytes:
    severity = 5 if record.outcome == 0 else 4
    stamp = dt.datetime.fromtimestamp(record.recorded_at, dt.timezone.utc).isoformat(timespec="milliseconds")
    stamp = stamp.replace("+00:00", "Z")
    sd = f'[{SD_ID} seq="{record.seq}" hash="{record.hash}" prev="{_sd_value(record.prev_hash)}"]'
    header = f"<{FACILITY_AUTH * 8 + severity}>1 {stamp} {hostname or '-'} {app_name} {procid} {MSGID} {sd} "
    return (header + BOM + record.xml).encode("utf-8")


def frame(message: bytes) -> bytes:
    return str(len(message)).encode() + b" " + message


class SyslogForwarder:
    def __init__(self, trail: AuditTrail, settings: SyslogSettings):
        self.trail, self.settings = trail, settings
        scheme = "syslog+tls" if settings.tls else "syslog+tcp"
        self.target = f"{scheme}://{settings.host}:{settings.port}"
        self.hostname = socket.gethostname()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None
        trail.on_append(self._wake.set)

    def start(self) -> "SyslogForwarder":
        self._thread = threading.Thread(target=self._loop, name="audit-syslog", daemon=True)
        self._thread.start()
        log.info("audit trail forwarded to %s", self.target)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._close()

    # --- the loop ---------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                sent = self._send_pending()
            except OSError as exc:
                log.warning("audit syslog %s unreachable (%s); retrying in %gs", self.target, type(exc).__name__,
                            self.settings.reconnect_seconds)
                self._close()
                self._stop.wait(self.settings.reconnect_seconds)
                continue
            except Exception as exc:  # e.g. the database briefly away
                log.error("audit syslog forwarding failed: %s", type(exc).__name__)
                self._stop.wait(self.settings.reconnect_seconds)
                continue
            if not sent:
                self._wake.wait(1.0)
                self._wake.clear()

    def _send_pending(self) -> int:
        last = self._position()
        records = self.trail.after(last, 200)
        if not records:
            return 0
        sock = self._connection()
        procid = str(os.getpid())
        for record in records:
            sock.sendall(frame(format_message(record, hostname=self.hostname, app_name=self.settings.app_name,
                                              procid=procid)))
        self._advance(records[-1].seq)
        return len(records)

    def _position(self) -> int:
        with self.trail.db.session() as s:
            row = s.get(AuditForwarding, self.target)
            return row.last_seq if row is not None else 0

    def _advance(self, seq: int) -> None:
        with self.trail.db.session() as s:
            row = s.get(AuditForwarding, self.target)
            if row is None:
                s.add(AuditForwarding(target=self.target, last_seq=seq, updated_at=now()))
            else:
                row.last_seq, row.updated_at = seq, now()

    def _connection(self) -> socket.socket:
        if self._sock is not None and self._peer_closed(self._sock):
            self._close()
        if self._sock is not None:
            return self._sock
        st = self.settings
        sock = socket.create_connection((st.host, st.port), timeout=30)
        if st.tls:
            context = ssl.create_default_context(cafile=str(st.ca_file) if st.ca_file else None)
            if st.certfile:
                context.load_cert_chain(str(st.certfile), str(st.keyfile) if st.keyfile else None)
            sock = context.wrap_socket(sock, server_hostname=st.host)
        self._sock = sock
        return sock

    @staticmethod
    def _peer_closed(sock: socket.socket) -> bool:
        """A collector never writes to us, so a readable socket means it closed or reset:
        reconnect before sending, rather than write into a dead connection."""
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable)

    def _close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
            self._sock = None
