"""The audit trail: append-only DICOM audit messages in a hash chain.

Each record's hash is SHA-256 over the previous record's hash and every column
of the record (`_payload`), so:

- an edited record no longer matches its hash;
- a deleted record leaves a gap in `seq` and the next record's `prev_hash`
  names a hash that is no longer there;
- a truncated tail no longer matches the one-row head (`audit_head`), which
  every append updates in the same transaction.

`verify` walks the chain and names the first record where it breaks. An
attacker who can rewrite the whole database can rebuild a consistent chain;
forwarding to syslog (node/audit/syslog.py, each message carrying its seq and
hash) keeps a copy outside the node to compare against.

Appends lock the head row (`FOR UPDATE` on PostgreSQL; SQLite's BEGIN
IMMEDIATE serialises writers), so appends from the server's threads and from
`carina` CLI processes form one chain.
"""
from __future__ import annotations

import csv
import datetime as dt
import hashlib
import io
import json
import socket
import threading
from dataclasses import dataclass
from typing import Callable, Iterator

from sqlalchemy import select

from node.audit.messages import AuditMessage, patient_ids_in, study_uids_in, xml_safe
from node.db import AuditHead, AuditPatient, AuditRecord, Database, now

GENESIS = "0" * 64


def _payload(record: AuditRecord) -> bytes:
    fields = {
        "seq": record.seq, "recorded_at": repr(float(record.recorded_at)), "event_id": record.event_id,
        "event_type": record.event_type, "action": record.action, "outcome": record.outcome,
        "user_id": record.user_id, "role": record.role, "address": record.address, "xml": record.xml,
    }
    return json.dumps(fields, sort_keys=True, ensure_ascii=False).encode()


def chain_hash(prev_hash: str, record: AuditRecord) -> str:
    return hashlib.sha256(prev_hash.encode() + b"\n" + _payload(record)).hexdigest()


def default_source_id() -> str:
    return f"carina@{socket.gethostname()}"


@dataclass(frozen=True)
class Break:
    seq: int
    problem: str

    def __str__(self) -> str:
        return f"record {self.seq}: {self.problem}"


@dataclass(frozen=True)
class Verification:
    records: int
    head_seq: int
    head_hash: str
    first_break: Break | None

    @property
    def ok(self) -> bool:
        return self.first_break is None


class AuditTrail:
    def __init__(self, db: Database, *, source_id: str = "", enterprise_site_id: str = ""):
        self.db = db
        self.source_id = source_id or default_source_id()
        self.enterprise_site_id = enterprise_site_id
        self._listeners: list[Callable[[], None]] = []
        self._lock = threading.Lock()

    def on_append(self, listener: Callable[[], None]) -> None:
        """Called (outside the transaction) after every append, e.g. to wake the syslog forwarder."""
        self._listeners.append(listener)

    # --- writing -----------------------------------------------------------------------

    def append(self, message: AuditMessage) -> int:
        """Record one message; returns its seq. Raises if it cannot be recorded:
        callers that serve PHI fail closed rather than serve it unrecorded."""
        xml = message.to_xml(self.source_id, self.enterprise_site_id)
        requestor = message.requestor
        role = next((c.code for c in (requestor.roles if requestor else ()) if c.system == "99CARINA"), "")
        with self._lock, self.db.session() as s:
            head = s.scalar(select(AuditHead).where(AuditHead.id == 1).with_for_update())
            if head is None:
                head = AuditHead(id=1, seq=0, hash=GENESIS)
                s.add(head)
                s.flush()
            record = AuditRecord(
                seq=head.seq + 1,
                recorded_at=now(),
                event_id=message.event.code,
                event_type=message.event_types[0].code if message.event_types else "",
                action=message.action,
                outcome=message.outcome,
                user_id=xml_safe(requestor.user_id if requestor else "")[:128],
                role=xml_safe(role)[:32],
                address=xml_safe(requestor.address if requestor else "")[:64],
                xml=xml,
                prev_hash=head.hash,
            )
            record.hash = chain_hash(head.hash, record)
            s.add(record)
            s.flush()
            for patient_id in message.patient_ids:
                s.add(AuditPatient(record_seq=record.seq, patient_id=xml_safe(patient_id)[:64]))
            head.seq, head.hash = record.seq, record.hash
            seq = record.seq
        for listener in self._listeners:
            listener()
        return seq

    # --- checking ----------------------------------------------------------------------

    def verify(self) -> Verification:
        with self.db.session() as s:
            head = s.get(AuditHead, 1)
            index: dict[int, list[str]] = {}
            for seq, patient_id in s.execute(select(AuditPatient.record_seq, AuditPatient.patient_id)):
                index.setdefault(seq, []).append(patient_id)
            expected_seq, prev_hash, count, problem = 1, GENESIS, 0, None
            for record in s.scalars(select(AuditRecord).order_by(AuditRecord.seq)).yield_per(500):
                count += 1
                if problem is not None:
                    continue
                if record.seq != expected_seq:
                    problem = Break(expected_seq, f"missing (the chain jumps from {expected_seq - 1} to {record.seq})")
                elif record.prev_hash != prev_hash:
                    problem = Break(record.seq, "its previous-hash does not match the record before it")
                elif chain_hash(record.prev_hash, record) != record.hash:
                    problem = Break(record.seq, "its content does not match its hash (edited)")
                else:
                    try:
                        named = sorted(patient_ids_in(record.xml))
                    except Exception:
                        named = None
                    if named is None or sorted(index.get(record.seq, [])) != [p[:64] for p in named]:
                        problem = Break(record.seq, "its patient index does not match the message")
                expected_seq, prev_hash = record.seq + 1, record.hash
            head_seq, head_hash = (head.seq, head.hash) if head is not None else (0, GENESIS)
            if problem is None and (head_seq != expected_seq - 1 or head_hash != prev_hash):
                problem = Break(head_seq, f"the chain head says {head_seq} records but the chain ends at "
                                          f"{expected_seq - 1} (records removed from the end)")
            orphan = set(index) - {r for r in range(1, expected_seq)}
            if problem is None and orphan:
                problem = Break(min(orphan), "patient index rows name a record that does not exist")
        return Verification(count, head_seq, head_hash, problem)

    # --- reading -----------------------------------------------------------------------

    def records(self, *, since: float | None = None, until: float | None = None, patient_id: str | None = None,
                limit: int | None = None, newest_first: bool = False) -> list[AuditRecord]:
        with self.db.session() as s:
            stmt = select(AuditRecord)
            if since is not None:
                stmt = stmt.where(AuditRecord.recorded_at >= since)
            if until is not None:
                stmt = stmt.where(AuditRecord.recorded_at < until)
            if patient_id:
                stmt = stmt.where(AuditRecord.seq.in_(
                    select(AuditPatient.record_seq).where(AuditPatient.patient_id == patient_id)))
            stmt = stmt.order_by(AuditRecord.seq.desc() if newest_first else AuditRecord.seq)
            if limit:
                stmt = stmt.limit(limit)
            return list(s.scalars(stmt))

    def after(self, seq: int, limit: int = 200) -> list[AuditRecord]:
        with self.db.session() as s:
            return list(s.scalars(select(AuditRecord).where(AuditRecord.seq > seq).order_by(AuditRecord.seq).limit(limit)))


EVENT_NAMES = {
    "110100": "Application Activity", "110104": "DICOM Instances Transferred", "110106": "Export",
    "110107": "Import", "110110": "Patient Record", "110112": "Query", "110113": "Security Alert",
    "110114": "User Authentication",
}
TYPE_NAMES = {
    "110120": "Application Start", "110121": "Application Stop", "110122": "Login", "110123": "Logout",
    "110126": "Node Authentication", "110131": "Software Configuration", "110132": "Use of Restricted Function",
    "110136": "Security Roles Changed", "110137": "User Security Attributes Changed",
}
OUTCOMES = {0: "success", 4: "minor failure", 8: "serious failure", 12: "major failure"}
CSV_COLUMNS = ("seq", "time_utc", "event", "event_type", "action", "outcome", "user", "role", "address",
               "patients", "studies", "description")


def iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).isoformat(timespec="seconds")


def summary(record: AuditRecord) -> dict:
    """The listing view of one record: who, when, what, which patients."""
    import xml.etree.ElementTree as ET

    root = ET.fromstring(record.xml)
    description = root.findtext("EventIdentification/EventOutcomeDescription") or ""
    return {
        "seq": record.seq,
        "time_utc": iso(record.recorded_at),
        "event": f"{record.event_id} {EVENT_NAMES.get(record.event_id, '')}".strip(),
        "event_type": f"{record.event_type} {TYPE_NAMES.get(record.event_type, '')}".strip(),
        "action": record.action,
        "outcome": OUTCOMES.get(record.outcome, str(record.outcome)),
        "user": record.user_id,
        "role": record.role,
        "address": record.address,
        "patients": " ".join(patient_ids_in(record.xml)),
        "studies": " ".join(study_uids_in(record.xml)),
        "description": description,
    }


def to_csv(records: list[AuditRecord]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for record in records:
        writer.writerow({k: _cell(v) for k, v in summary(record).items()})
    return out.getvalue()


def _cell(value):
    # A cell that starts like a formula would run in a spreadsheet (CSV injection);
    # user names and patient IDs come from outside, so neutralise them.
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def iter_summaries(records: list[AuditRecord]) -> Iterator[dict]:
    return (summary(r) for r in records)
