"""The Storage SCU: send a study's outputs over one association."""
from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE

from dicom_scp.sockets import LOW_LATENCY_HANDLER

log = logging.getLogger(__name__)


# DIMSE "Refused: SOP Class not supported" (PS3.7 C.4.2.1.4): recorded for an
# instance whose SOP class the peer did not accept at association.
SOP_CLASS_NOT_SUPPORTED = 0x0122


class SendError(Exception):
    """The destination could not be reached or refused the association."""


class SendStopped(SendError):
    """The caller's `should_stop` said stop (e.g. its lease was lost): the
    association was aborted before the next object went out."""


@dataclass
class SendReport:
    statuses: dict[str, int] = field(default_factory=dict)  # SOP Instance UID -> DIMSE status

    @property
    def failed(self) -> dict[str, int]:
        # 0xB000-0xB007 are warnings (e.g. coercion): the instance is stored.
        return {uid: st for uid, st in self.statuses.items() if st != 0x0000 and not 0xB000 <= st <= 0xB0FF}


def send_files(
    paths: list[Path],
    *,
    calling_ae: str,
    called_ae: str,
    host: str,
    port: int,
    timeout: float = 30.0,
    tls: ssl.SSLContext | None = None,
    server_name: str | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> SendReport:
    """C-STORE every file; one association for all of them.

    With `tls` the connection is TLS and the server's certificate must match
    `server_name` (default: `host`). Raises SendError when no association is
    possible (a failed TLS handshake included); per-instance failures are in
    the report so the caller can decide what to retry. `should_stop` is asked
    before each object: True aborts the association (SendStopped), so a
    sender that lost its right to send stops within one object."""
    datasets = [dcmread(p) for p in paths]  # our own outputs, written Explicit VR LE
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.maximum_pdu_size = 256 * 1024  # what we accept back; responses are small
    for sop_class in sorted({str(ds.SOPClassUID) for ds in datasets}):
        # Our objects are written Explicit VR LE; Implicit is the universal fallback.
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])

    tls_args = (tls, server_name or host) if tls is not None else None
    assoc = ae.associate(host, port, ae_title=called_ae, evt_handlers=[LOW_LATENCY_HANDLER], tls_args=tls_args)
    if not assoc.is_established:
        how = "TLS " if tls is not None else ""
        raise SendError(f"{how}association with {called_ae}@{host}:{port} not established")
    report = SendReport()
    accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
    try:
        for ds in datasets:
            uid = str(ds.SOPInstanceUID)
            if should_stop is not None and should_stop():
                assoc.abort()
                raise SendStopped(f"stopped before sending {uid} to {called_ae}")
            if str(ds.SOPClassUID) not in accepted:
                # The peer refused the presentation context: nothing to send it over.
                report.statuses[uid] = SOP_CLASS_NOT_SUPPORTED
                continue
            rsp = assoc.send_c_store(ds)
            if not assoc.is_established and not rsp:
                raise SendError(f"association with {called_ae} lost while sending {uid}")
            report.statuses[uid] = int(rsp.Status) if rsp and "Status" in rsp else 0xFFFF
    finally:
        if assoc.is_established:
            assoc.release()
    return report


def echo(*, calling_ae: str, called_ae: str, host: str, port: int, timeout: float = 5.0,
         tls: ssl.SSLContext | None = None, server_name: str | None = None) -> int:
    """C-ECHO (Verification) once: the DIMSE status (0x0000 is success). Raises
    SendError when no association is possible."""
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = timeout
    ae.add_requested_context("1.2.840.10008.1.1")  # Verification
    tls_args = (tls, server_name or host) if tls is not None else None
    assoc = ae.associate(host, port, ae_title=called_ae, evt_handlers=[LOW_LATENCY_HANDLER], tls_args=tls_args)
    if not assoc.is_established:
        raise SendError(f"association with {called_ae}@{host}:{port} not established")
    try:
        rsp = assoc.send_c_echo()
        return int(rsp.Status) if rsp and "Status" in rsp else 0xFFFF
    finally:
        if assoc.is_established:
            assoc.release()
