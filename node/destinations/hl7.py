"""HL7 v2 destinations: send the ORU^R01 over MLLP and act on the ACK.

Original-mode acknowledgment (HL7 v2.5.1 chapter 2): one message per
exchange, and the sender waits for the receiver's ACK on the same connection.

| ACK (MSA-1)            | outcome                                          |
|------------------------|--------------------------------------------------|
| AA (or CA)             | delivered                                        |
| AE (or CE)             | retry with backoff (the receiver had an error)   |
| AR (or CR)             | dead-letter with MSA-3 / ERR text (rejected)     |
| no ACK in time, refused or broken connection, MSA-2 not ours | retry  |

A retry resends the same message with the same MSH-10, so a receiver that
did process the first copy can recognise the duplicate.
"""
from __future__ import annotations

import dataclasses
import logging
import socket
import time
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from node import results
from node.config import Hl7Destination
from node.context import NodeContext
from node.db import InboundOrder, InboundPatient, Study
from node.er7 import Er7Message
from node.jobs import PermanentError, RetryableError
from node.outputs.hl7_oru import OrderContext, OruHeader, build_oru, encode, hd_from_system
from node.scored_study import ScoredStudy

log = logging.getLogger(__name__)

START, END = b"\x0b", b"\x1c\x0d"
MAX_ACK_BYTES = 1 << 20


class MllpError(Exception):
    """The exchange failed below the HL7 level (connection, framing, timeout)."""


def exchange(host: str, port: int, payload: bytes, *, connect_timeout: float, ack_timeout: float) -> bytes:
    """Send one MLLP-framed message and return the reply's payload (unframed)."""
    try:
        with socket.create_connection((host, port), timeout=connect_timeout) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(START + payload + END)
            deadline = time.monotonic() + ack_timeout
            buffer = b""
            while END not in buffer:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise MllpError(f"no ACK within {ack_timeout:g}s")
                sock.settimeout(remaining)
                chunk = sock.recv(65536)
                if not chunk:
                    raise MllpError("connection closed before a complete ACK")
                buffer += chunk
                if len(buffer) > MAX_ACK_BYTES:
                    raise MllpError("ACK larger than 1 MiB")
    except socket.timeout as exc:
        raise MllpError(f"no ACK within {ack_timeout:g}s") from exc
    except OSError as exc:
        raise MllpError(f"{type(exc).__name__}: {exc}") from exc
    start = buffer.find(START)
    if start < 0:
        raise MllpError("reply is not MLLP framed (no start block)")
    return buffer[start + 1 : buffer.index(END, start)]


@dataclass(frozen=True)
class Ack:
    code: str  # MSA-1
    control_id: str  # MSA-2
    text: str  # MSA-3, else ERR user message / diagnostic


def parse_ack(payload: str) -> Ack:
    """Read MSA (and ERR) from any v2 version's ACK."""
    message = Er7Message.parse(payload)
    if not message.has("MSA"):
        raise ValueError("reply has no MSA segment")
    texts = [message.get("MSA", 3)] if message.get("MSA", 3) else []
    for index in range(sum(1 for seg in message.segments if seg[0] == "ERR")):
        # v2.5+: ERR-8 user message, ERR-7 diagnostics, ERR-3 error code (CWE text); v2.3: ERR-1.
        for field, component in ((8, 0), (7, 0), (3, 2), (3, 1), (1, 0)):
            text = message.get("ERR", field, component, occurrence=index)
            if text:
                texts.append(text.replace(message.component_sep, " "))
                break
    return Ack(code=message.get("MSA", 1).strip().upper(), control_id=message.get("MSA", 2).strip(),
               text=" | ".join(texts))


@dataclass(frozen=True)
class Hl7Delivery:
    destination: Hl7Destination
    scored: ScoredStudy  # facts with the RIS's demographics filled in where DICOM had none
    order: OrderContext  # what an inbound ORM^O01 (and ADT) said about this accession


def load(ctx: NodeContext, session: Session, study: Study, destination: Hl7Destination) -> Hl7Delivery:
    scored = results.load(session, study.id, study.version)
    facts = scored.facts
    order = None
    if facts.accession_number:
        order = session.scalar(select(InboundOrder).where(InboundOrder.accession_number == facts.accession_number))
    known = session.get(InboundPatient, facts.patient_id) if facts.patient_id else None
    if known is not None:
        # DICOM stays authoritative; the RIS only fills what the header left empty.
        facts = dataclasses.replace(
            facts,
            patient_name=facts.patient_name or known.name,
            patient_birth_date=facts.patient_birth_date or known.birth_date,
            patient_sex=facts.patient_sex or known.sex,
        )
    return Hl7Delivery(
        destination=destination,
        scored=dataclasses.replace(scored, facts=facts),
        order=OrderContext(
            placer_order_number=order.placer_order_number if order else "",
            filler_order_number=order.filler_order_number if order else "",
            procedure_code=order.procedure_code if order else "",
            procedure_text=order.procedure_text if order else "",
            procedure_system=order.procedure_system if order else "",
            patient_class=known.patient_class if known is not None else "",
        ),
    )


def message_for(ctx: NodeContext, work: Hl7Delivery):
    """The ORU^R01 this delivery sends (hl7apy Message)."""
    destination = work.destination
    return build_oru(
        work.scored,
        header=OruHeader(
            sending_application=destination.sending_application,
            sending_facility=destination.sending_facility,
            receiving_application=destination.receiving_application,
            receiving_facility=destination.receiving_facility,
            processing_id=destination.processing_id,
        ),
        patient_authority=destination.patient_id_authority
        or hd_from_system(ctx.settings.api.patient_identifier_system),
        order=work.order,
    )


def send(ctx: NodeContext, work: Hl7Delivery) -> None:
    destination = work.destination
    message = message_for(ctx, work)
    control_id = str(message.msh.msh_10.value)
    try:
        reply = exchange(
            destination.host, destination.port, encode(message).encode("utf-8"),
            connect_timeout=destination.connect_timeout_seconds, ack_timeout=destination.ack_timeout_seconds,
        )
    except MllpError as exc:
        raise RetryableError(f"{destination.name} ({destination.host}:{destination.port}): {exc}") from exc
    try:
        ack = parse_ack(reply.decode("utf-8", errors="replace"))
    except ValueError as exc:
        raise RetryableError(f"{destination.name}: unreadable ACK", f"{destination.name}: unreadable ACK ({exc})") from exc
    if ack.control_id and ack.control_id != control_id:
        raise RetryableError(f"{destination.name}: ACK is for another message than ORU {control_id}",
                             f"{destination.name}: ACK is for message {ack.control_id!r}, not {control_id!r}")
    # MSA-3 is the receiver's free text and may name the patient: detail only.
    code = f"MSA-1 {ack.code[:2]!s}"
    detail = f"MSA-1 {ack.code}" + (f": {ack.text}" if ack.text else "")
    if ack.code in ("AA", "CA"):
        log.info("ORU %s accepted by %s (study %s v%d)", control_id, destination.name, work.scored.study_uid,
                 work.scored.version)
        return
    if ack.code in ("AR", "CR"):
        raise PermanentError(f"{destination.name} rejected ORU {control_id}: {code}",
                             f"{destination.name} rejected ORU {control_id}: {detail}")
    if ack.code in ("AE", "CE"):
        raise RetryableError(f"{destination.name} could not process ORU {control_id}: {code}",
                             f"{destination.name} could not process ORU {control_id}: {detail}")
    raise RetryableError(f"{destination.name}: unknown acknowledgment code in ORU {control_id} ACK",
                         f"{destination.name}: unknown acknowledgment code in ORU {control_id} ACK: {detail}")
