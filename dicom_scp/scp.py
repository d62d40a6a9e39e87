"""The Storage SCP: receive, check the header, hand over, answer. Nothing more.

The C-STORE response only leaves after the handler returns, so the handler's
whole job is to make the instance survive a crash and be known to the
database: it streams the dataset to a temp file, reads the few header values
the protocol needs, and passes the instance to the `accept` callback (the
node's receiver), which stores it durably and commits its row. Decoding,
routing and inference happen later in the pipeline.

Who may connect, the TLS listener, the PDU cap and the association events are
the listeners' business (dicom_scp/listener.py); both listeners share this
SCP's acceptor, peer policy and limits.

Status codes the C-STORE handler answers (PS3.4 Annex B.2.3):
- 0x0000 success: the acceptor returned, so the instance is durable and recorded;
- 0xA700 out of resources: the acceptor refused (disk floor) or failed (database);
- 0xA900 dataset does not match SOP class: the header's SOP Class/Instance UIDs
  differ from the request's;
- 0xC000 cannot understand: unreadable dataset, a UID longer than 64 characters,
  or a Deflated dataset that inflates beyond `max_inflated_bytes`;
- 0xC210 (cannot understand, missing attribute): no StudyInstanceUID.
"""
from __future__ import annotations

import logging
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

from pydicom.dataset import Dataset
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, _config, evt
from pynetdicom.sop_class import Verification

from dicom_scp.contexts import CHEST_CAPABLE_SOP_CLASSES, decodable_transfer_syntaxes, other_storage_classes
from dicom_scp.events import AssociationCallback, EventDispatcher
from dicom_scp.listener import Admission, AdmittingServer, start_listener
from dicom_scp.peers import PeerPolicy
from dicom_scp.sockets import LOW_LATENCY_HANDLER
from dicom_scp.tls import TlsListener
from inference.dicom_file import DEFAULT_MAX_INFLATED_BYTES, InflateLimitExceeded, read_header

log = logging.getLogger(__name__)

# Stream each incoming dataset to a temp file instead of RAM: a 1 GB instance
# (or ten concurrent 100 MB ones) must not exhaust memory.
_config.STORE_RECV_CHUNKED_DATASET = True

# The largest P-DATA-TF PDU we accept (and advertise); a peer's dataset arrives
# in pieces of at most this size, each streamed to disk.
DEFAULT_MAX_PDU_BYTES = 256 * 1024

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000
MISSING_ATTRIBUTE = 0xC210

_HEADER_TAGS = [
    "SpecificCharacterSet", "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID",
    "SeriesInstanceUID", "PatientID", "AccessionNumber", "Modality",
    "BodyPartExamined", "ViewPosition",
]


@dataclass(frozen=True)
class ReceivedInstance:
    calling_ae: str
    peer_address: str
    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    transfer_syntax_uid: str
    patient_id: str
    accession_number: str
    modality: str
    # The streamed dataset. pynetdicom unlinks it once the handler returns,
    # so the acceptor must move it into place before returning.
    temp_path: Path
    size_bytes: int


class InstanceAcceptor(Protocol):
    def __call__(self, instance: ReceivedInstance) -> None:
        """Store the instance durably and commit its record, or raise
        (`Refusal` for a chosen status; anything else answers 0xA700)."""


class Refusal(Exception):
    def __init__(self, status: int, comment: str, reason: str = ""):
        super().__init__(comment)
        self.status = status
        self.comment = comment
        # A short fixed slug for counting refusals (metrics), e.g. "disk_floor".
        self.reason = reason or f"status_{status:04x}"


def _header_fields(path: Path, max_inflated_bytes: int) -> dict[str, str]:
    """The few header values the receiver records, as stripped text, plus the
    file's TransferSyntaxUID (from its File Meta).

    A Deflated dataset is inflated in chunks up to `max_inflated_bytes`
    (InflateLimitExceeded beyond); nothing else is inflated or decoded.
    pydicom converts values lazily, so a malformed value raises here, inside
    the caller's try, rather than later."""
    header = read_header(path, _HEADER_TAGS, max_inflated_bytes=max_inflated_bytes)
    fields = {}
    for keyword in _HEADER_TAGS[1:]:
        value = header.get(keyword, "")
        fields[keyword] = "" if value is None else str(value).strip()
    meta = getattr(header, "file_meta", None)
    fields["TransferSyntaxUID"] = str((meta or {}).get("TransferSyntaxUID", "") or "").strip()
    return fields


def check_header(path: Path, max_inflated_bytes: int, *, sop_class_uid: str | None = None,
                 sop_instance_uid: str | None = None) -> dict[str, str]:
    """The header check every intake shares (the C-STORE handler here, STOW-RS in
    node/api/dicomweb_routes.py): the header fields of `_header_fields`, or a
    `Refusal` with the DICOM status that says why not (the module docstring
    lists them). `sop_class_uid`/`sop_instance_uid` are what the request
    announced (a C-STORE's Affected SOP Class/Instance UID), when it did."""
    try:
        fields = _header_fields(path, max_inflated_bytes)
    except InflateLimitExceeded as exc:
        raise Refusal(CANNOT_UNDERSTAND, str(exc), "inflate_limit") from exc
    except Exception as exc:
        # Whatever pydicom raises on hostile bytes (BytesLengthException,
        # zlib.error, struct.error, ...) means "cannot understand", never
        # Out of Resources: a sender retries that forever.
        raise Refusal(CANNOT_UNDERSTAND, f"unreadable dataset: {type(exc).__name__}", "unreadable") from exc

    sop_class, sop_uid, study_uid = fields["SOPClassUID"], fields["SOPInstanceUID"], fields["StudyInstanceUID"]
    if (sop_class_uid is not None and sop_class != sop_class_uid) or (
            sop_instance_uid is not None and sop_uid != sop_instance_uid):
        raise Refusal(DOES_NOT_MATCH_SOP_CLASS, "SOP Class/Instance UID differ from the request", "uid_mismatch")
    if not study_uid:
        raise Refusal(MISSING_ATTRIBUTE, "missing StudyInstanceUID", "missing_study_uid")
    if not sop_uid or not sop_class:
        raise Refusal(MISSING_ATTRIBUTE, "missing SOP Class or SOP Instance UID", "missing_sop_uid")
    if len(study_uid) > 64 or len(sop_uid) > 64:
        # UI is at most 64 characters; the database keys on these.
        raise Refusal(CANNOT_UNDERSTAND, "invalid UID: longer than 64 characters", "invalid_uid")
    return fields


def _status(status: int, comment: str) -> Dataset:
    rsp = Dataset()
    rsp.Status = status
    rsp.ErrorComment = comment[:64]  # LO
    return rsp


@dataclass(frozen=True)
class SharedSockets:
    """Listening sockets (plain, TLS) that several processes accept from."""

    plain: socket.socket | None
    tls: socket.socket | None


class StorageSCP:
    """The C-STORE/C-ECHO service on a plain listener and, optionally, a TLS one.

    `peers` decides who may associate (see dicom_scp/peers.py);
    `on_association` receives one AssociationEvent when each association's
    negotiation ends and one when an accepted association ends, on its own
    thread (dicom_scp/events.py)."""

    def __init__(
        self,
        *,
        ae_title: str,
        host: str,
        port: int,
        accept: InstanceAcceptor,
        peers: PeerPolicy,
        max_associations: int = 10,
        max_pdu_bytes: int = DEFAULT_MAX_PDU_BYTES,
        max_inflated_bytes: int = DEFAULT_MAX_INFLATED_BYTES,
        tls: TlsListener | None = None,
        on_release: Callable[[str, list[str]], None] | None = None,
        on_association: AssociationCallback | None = None,
        on_reject: Callable[[str], None] | None = None,
        listening_sockets: SharedSockets | None = None,
    ):
        self.accept = accept
        # Another process's listening sockets, to accept from beside it (`share`).
        self.listening_sockets = listening_sockets
        self.on_release = on_release
        self.on_association = on_association
        # Observer for counting (the node's metrics): a refused C-STORE's reason slug.
        self.on_reject = on_reject
        self.peers = peers
        self.tls = tls
        self.max_inflated_bytes = max_inflated_bytes
        self.max_pdu_bytes = max_pdu_bytes
        self.address = (host, port)
        self.ae = AE(ae_title=ae_title)
        self.ae.maximum_pdu_size = max_pdu_bytes  # advertised; larger PDUs are aborted (listener.py)
        self.ae.maximum_associations = max_associations
        self.ae.add_supported_context(Verification)
        for sop_class in CHEST_CAPABLE_SOP_CLASSES:
            self.ae.add_supported_context(sop_class, list(decodable_transfer_syntaxes()))
        for sop_class in other_storage_classes():
            # Not ours to decode, so any syntax is fine: stored and marked ignored.
            self.ae.add_supported_context(sop_class, ALL_TRANSFER_SYNTAXES)
        self._server: AdmittingServer | None = None
        self._tls_server: AdmittingServer | None = None
        self._events: EventDispatcher | None = None
        # Which studies each open association has brought, for the release hook
        # and the association's closing event.
        self._studies_by_assoc: dict[int, set[str]] = {}
        self._lock = threading.Lock()

    # -- lifecycle ---------------------------------------------------------
    def start(self) -> None:
        handlers = [
            LOW_LATENCY_HANDLER,
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_ECHO, lambda event: SUCCESS),
            (evt.EVT_RELEASED, self._on_released),
        ]
        if self.on_association is not None:
            self._events = EventDispatcher(self.on_association)
        admission = Admission(
            policy=self.peers,
            max_pdu_bytes=self.max_pdu_bytes,
            report=self._events.emit if self._events else (lambda event: None),
            studies_of=self._pop_association,
            handshake_timeout=self.ae.acse_timeout or 30.0,
        )
        inherited = self.listening_sockets or SharedSockets(None, None)
        self._server = start_listener(self.ae, self.address, admission, ssl_context=None, evt_handlers=handlers,
                                      listening_socket=inherited.plain)
        log.info("DICOM SCP %s listening on %s:%d", self.ae.ae_title, self.address[0], self.port)
        if self.tls is not None:
            self._tls_server = start_listener(self.ae, (self.address[0], self.tls.port), admission,
                                              ssl_context=self.tls.context, evt_handlers=handlers,
                                              listening_socket=inherited.tls)
            log.info("DICOM SCP %s listening for TLS on %s:%d", self.ae.ae_title, self.address[0], self.tls_port)

    def share(self) -> SharedSockets:
        """The started listeners' sockets, for other processes to accept
        associations from as well (a `listening_sockets` of their own SCP;
        dicom_scp/listener.py `AdmittingServer`). Stopping this SCP stops them
        all from accepting; stopping one of the others does not."""
        assert self._server is not None, "start() first"
        return SharedSockets(self._server.share(), self._tls_server.share() if self._tls_server else None)

    def stop(self, grace: float = 0.0) -> int:
        """Stop accepting associations at once (both listeners); let open ones
        finish for up to `grace` seconds, then abort those still open. Returns
        how many were aborted. An instance is only acknowledged once durable
        and recorded, so an aborted association loses nothing the sender saw
        acknowledged."""
        servers = [server for server in (self._server, self._tls_server) if server is not None]
        self._server = self._tls_server = None
        for server in servers:
            server.shutdown()  # closes the listening socket only; associations run on
        deadline = time.monotonic() + grace
        while any(server.active_associations for server in servers) and time.monotonic() < deadline:
            time.sleep(0.05)
        still_open = [assoc for server in servers for assoc in server.active_associations]
        for assoc in still_open:
            log.warning("aborting association from %s still open after the %.0f s grace period",
                        assoc.requestor.ae_title, grace)
            assoc.abort()
        if self._events is not None:
            self._events.close()  # after the aborts: their closing events still go out
            self._events = None
        return len(still_open)

    @property
    def listening(self) -> bool:
        return self._server is not None

    @property
    def active_associations(self) -> int:
        return sum(len(server.active_associations) for server in (self._server, self._tls_server)
                   if server is not None)

    @property
    def port(self) -> int:
        return self._server.server_address[1] if self._server else self.address[1]

    @property
    def tls_port(self) -> int | None:
        if self._tls_server is not None:
            return self._tls_server.server_address[1]
        return self.tls.port if self.tls else None

    # -- handlers ----------------------------------------------------------
    def _on_store(self, event: evt.Event):
        request = event.request
        sop_uid = str(request.AffectedSOPInstanceUID or "")
        try:
            received = self._received(event)
            self.accept(received)
            self._remember(event, received.study_uid)
        except Refusal as refusal:
            log.warning("C-STORE %s refused: %s", sop_uid, refusal.comment)
            self._discard(event)
            self._rejected(refusal.reason)
            return _status(refusal.status, refusal.comment)
        except Exception as exc:  # a handler must answer, never take the process down
            log.exception("C-STORE %s failed", sop_uid)
            self._discard(event)
            self._rejected("record_failed")
            return _status(OUT_OF_RESOURCES, f"could not record instance: {type(exc).__name__}")
        log.info("stored %s study=%s from %s", received.sop_instance_uid, received.study_uid, received.calling_ae,
                 extra={"study_uid": received.study_uid, "sop_instance_uid": received.sop_instance_uid})
        return SUCCESS

    def _rejected(self, reason: str) -> None:
        if self.on_reject is not None:
            try:
                self.on_reject(reason)
            except Exception:
                log.exception("reject observer failed")

    def _on_released(self, event: evt.Event) -> None:
        with self._lock:
            studies = set(self._studies_by_assoc.get(id(event.assoc), ()))
        if studies and self.on_release is not None:
            try:
                self.on_release(event.assoc.requestor.ae_title, sorted(studies))
            except Exception:
                log.exception("release hook failed")

    def _pop_association(self, assoc) -> tuple[str, ...]:
        with self._lock:
            return tuple(sorted(self._studies_by_assoc.pop(id(assoc), ())))

    def _remember(self, event: evt.Event, study_uid: str) -> None:
        with self._lock:
            self._studies_by_assoc.setdefault(id(event.assoc), set()).add(study_uid)

    def _received(self, event: evt.Event) -> ReceivedInstance:
        request = event.request
        temp = Path(event.dataset_path)
        fields = check_header(temp, self.max_inflated_bytes, sop_class_uid=str(request.AffectedSOPClassUID),
                              sop_instance_uid=str(request.AffectedSOPInstanceUID))
        sop_class, sop_uid, study_uid = fields["SOPClassUID"], fields["SOPInstanceUID"], fields["StudyInstanceUID"]

        return ReceivedInstance(
            calling_ae=event.assoc.requestor.ae_title,
            peer_address=str(event.assoc.requestor.address),
            sop_class_uid=sop_class,
            sop_instance_uid=sop_uid,
            study_uid=study_uid,
            series_uid=fields["SeriesInstanceUID"],
            transfer_syntax_uid=str(event.context.transfer_syntax),
            patient_id=fields["PatientID"],
            accession_number=fields["AccessionNumber"],
            modality=fields["Modality"],
            temp_path=temp,
            size_bytes=temp.stat().st_size,
        )

    @staticmethod
    def _discard(event: evt.Event) -> None:
        try:
            Path(event.dataset_path).unlink(missing_ok=True)
        except (AttributeError, OSError):
            pass
