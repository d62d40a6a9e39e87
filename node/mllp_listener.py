"""Optional inbound HL7 v2 listener (MLLP): orders and demographics before the images.

A RIS sends ORM^O01 when an exam is ordered and ADT when a patient is
registered or updated; Carina records them so that, when the images arrive,
the ORU can carry the placer order number and the order's procedure code
(node/outputs/hl7_oru.py) and demographics missing from the DICOM header can
be filled in. Each connection may carry many messages; each message gets an
original-mode ACK on the same connection:

- AA: recorded;
- AE: a transient failure (the database), the sender should retry;
- AR: the message cannot be accepted (not HL7, or a type Carina does not
  handle), with the reason in MSA-3 and ERR.

What is recorded (tables InboundOrder, InboundPatient):
- ORM^O01: accession (OBR-18, as IHE Radiology Scheduled Workflow places it,
  else the filler order number), placer/filler order numbers (ORC-2/3, else
  OBR-2/3), order control (ORC-1), procedure (OBR-4), priority (TQ1-9, else
  ORC-7.6 / OBR-27.6), and the PID demographics;
- ADT^A01/A04/A05/A08/A28/A31: PID demographics and PV1-2 patient class.
Patient data is never logged; logs carry control ids and message types.
"""
from __future__ import annotations

import datetime as dt
import logging
import socketserver
import threading

from sqlalchemy import select

from node.config import Hl7ListenerSettings
from node.db import Database, InboundOrder, InboundPatient, now
from node.er7 import Er7Message, escape

log = logging.getLogger(__name__)

START, END = b"\x0b", b"\x1c\x0d"
MAX_MESSAGE_BYTES = 4 << 20
ADT_EVENTS = {"A01", "A04", "A05", "A08", "A28", "A31"}


class Rejected(Exception):
    """The message is not acceptable (AR)."""


def record_message(db: Database, message: Er7Message) -> str:
    """Store what the message says; returns a short description for the log."""
    kind, event = message.message_type
    if kind == "ORM" and event == "O01":
        if not message.has("OBR"):
            raise Rejected("ORM^O01 without an OBR segment")
        _record_order(db, message)
        return "order"
    if kind == "ADT" and event in ADT_EVENTS:
        if not message.has("PID"):
            raise Rejected(f"ADT^{event} without a PID segment")
        _record_patient(db, message)
        return "demographics"
    raise Rejected(f"message type {kind}^{event} is not handled (accepted: ORM^O01, ADT^{'/'.join(sorted(ADT_EVENTS))})")


def _pn(message: Er7Message) -> str:
    """PID-5 (XPN) -> DICOM PN Family^Given^Middle^Prefix^Suffix."""
    family = message.get("PID", 5, 1).split(message.subcomponent_sep)[0]
    given, middle = message.get("PID", 5, 2), message.get("PID", 5, 3)
    suffix, prefix = message.get("PID", 5, 4), message.get("PID", 5, 5)
    return "^".join((family, given, middle, prefix, suffix)).rstrip("^")


def _record_patient(db: Database, message: Er7Message, session=None) -> str:
    patient_id = message.get("PID", 3, 1)
    if not patient_id:
        raise Rejected("PID-3 (patient identifier) is empty")

    def write(s) -> None:
        row = s.get(InboundPatient, patient_id[:64])
        if row is None:
            row = InboundPatient(patient_id=patient_id[:64])
            s.add(row)
        row.name = _pn(message)[:255]
        birth = message.get("PID", 7, 1)[:8]
        row.birth_date = birth if birth.isdigit() and len(birth) == 8 else ""
        sex = message.get("PID", 8)[:1].upper()
        row.sex = sex if sex in ("M", "F", "O", "U", "A", "N") else ""
        if message.has("PV1") and message.get("PV1", 2):
            row.patient_class = message.get("PV1", 2)[:1]
        row.message_control_id = message.control_id[:64]
        row.updated_at = now()

    if session is not None:
        write(session)
    else:
        with db.session() as s:
            write(s)
    return patient_id


def _record_order(db: Database, message: Er7Message) -> None:
    placer = message.get("ORC", 2, 1) or message.get("OBR", 2, 1)
    filler = message.get("ORC", 3, 1) or message.get("OBR", 3, 1)
    accession = message.get("OBR", 18, 1) or filler
    if not accession:
        raise Rejected("no accession number: OBR-18 and the filler order number are empty")
    priority = message.get("TQ1", 9, 1) or message.get("ORC", 7, 6) or message.get("OBR", 27, 6)
    with db.session() as s:
        patient_id = _record_patient(db, message, session=s) if message.has("PID") and message.get("PID", 3, 1) else ""
        row = s.scalar(select(InboundOrder).where(InboundOrder.accession_number == accession[:64]))
        if row is None:
            row = InboundOrder(accession_number=accession[:64])
            s.add(row)
        row.placer_order_number = placer[:64]
        row.filler_order_number = filler[:64]
        row.order_control = message.get("ORC", 1)[:4]
        row.patient_id = patient_id[:64]
        row.procedure_code = message.get("OBR", 4, 1)[:64]
        row.procedure_text = message.get("OBR", 4, 2)[:255]
        row.procedure_system = message.get("OBR", 4, 3)[:32]
        row.priority = priority[:8]
        row.message_control_id = message.control_id[:64]
        row.updated_at = now()


def ack(message: Er7Message | None, code: str, text: str, settings: Hl7ListenerSettings) -> str:
    """An original-mode ACK (MSH + MSA [+ ERR]) in the sender's own version and delimiters."""
    fs = message.field_sep if message else "|"
    enc = (message.component_sep + message.repetition_sep + message.escape + message.subcomponent_sep) if message else "^~\\&"
    comp = enc[0]

    def esc(value: str) -> str:
        return escape(value, fs, enc)

    control = message.control_id if message else ""
    version = (message.version if message else "") or "2.5.1"
    event = message.message_type[1] if message else ""
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d%H%M%S%z")
    msh = [
        "MSH", enc, esc(settings.application), esc(settings.facility),
        esc(message.get("MSH", 3, 1)) if message else "", esc(message.get("MSH", 4, 1)) if message else "",
        stamp, "", f"ACK{comp}{esc(event)}{comp}ACK" if event else "ACK",
        esc(f"ACK{control}"[:20] if control else f"ACK{int(now() * 1000)}"),
        esc(message.get("MSH", 11, 1) or "P") if message else "P", esc(version),
    ]
    segments = [fs.join(msh), fs.join(["MSA", code, esc(control), esc(text[:80])])]
    if code != "AA":
        # ERR-3 (v2.5 CWE, Table 0357): 200 unsupported message type, 207 application internal error.
        error = "200" if code == "AR" else "207"
        severity = "E"
        segments.append(fs.join(["ERR", "", "", f"{error}{comp}{esc(text[:80])}{comp}HL70357", severity,
                                 "", "", "", esc(text)]))
    return "\r".join(segments) + "\r"


def handle_payload(db: Database, payload: bytes, settings: Hl7ListenerSettings) -> str:
    """One received message -> its ACK text. Never raises."""
    text = payload.decode("utf-8", errors="replace")
    try:
        message = Er7Message.parse(text)
    except ValueError as exc:
        log.warning("HL7 listener: unreadable message rejected (%s)", exc)
        return ack(None, "AR", str(exc), settings)
    kind = "^".join(message.message_type)
    try:
        what = record_message(db, message)
    except Rejected as exc:
        log.warning("HL7 listener: %s %s rejected: %s", kind, message.control_id, exc)
        return ack(message, "AR", str(exc), settings)
    except Exception as exc:  # the database: the sender should retry
        log.exception("HL7 listener: %s %s could not be recorded", kind, message.control_id)
        return ack(message, "AE", f"temporary failure: {type(exc).__name__}", settings)
    log.info("HL7 listener: %s %s recorded (%s)", kind, message.control_id, what)
    return ack(message, "AA", "", settings)


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        server: "MllpListener" = self.server  # type: ignore[assignment]
        sock = self.request
        sock.settimeout(server.settings.idle_timeout_seconds)
        buffer = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except OSError:
                return
            if not chunk:
                return
            buffer += chunk
            if len(buffer) > MAX_MESSAGE_BYTES:
                log.warning("HL7 listener: message over %d bytes from %s; closing", MAX_MESSAGE_BYTES,
                            self.client_address[0])
                return
            while END in buffer:
                block, _, buffer = buffer.partition(END)
                start = block.find(START)
                if start < 0:
                    continue  # junk before a frame: skip it
                reply = handle_payload(server.db, block[start + 1 :], server.settings)
                try:
                    sock.sendall(START + reply.encode("utf-8") + END)
                except OSError:
                    return


class MllpListener(socketserver.ThreadingTCPServer):
    """`start()` in a background thread, `stop()` to close; one thread per connection."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, db: Database, settings: Hl7ListenerSettings):
        self.db, self.settings = db, settings
        super().__init__((settings.host, settings.port), _Handler)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self.server_address[1]

    def start(self) -> "MllpListener":
        self._thread = threading.Thread(target=self.serve_forever, name="hl7-listener", daemon=True)
        self._thread.start()
        log.info("HL7 listener on %s:%d", self.settings.host, self.port)
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
