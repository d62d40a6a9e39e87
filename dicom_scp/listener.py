"""The SCP's listeners: pynetdicom's association server with the gate Carina needs.

pynetdicom has no address filter, finishes a TLS handshake on its single
accepting thread, and reads whatever PDU length a peer announces. Each
connection here instead gets, on its own thread:

1. the TLS handshake, with a deadline (a silent client cannot stall the listener);
2. a cap on every PDU it may read: a P-DATA-TF longer than the maximum we
   advertised (`max_pdu_bytes`), or any other PDU over 1 MiB, is answered with
   A-ABORT before its body is read;
3. the peer check, inside negotiation: an unknown calling AE title, or a known
   one from the wrong address, gets A-ASSOCIATE-RJ (rejected-permanent,
   service-user, "calling AE title not recognised"). It fails closed: an error
   while checking rejects;
4. one `AssociationEvent` when negotiation ends, and one when an accepted
   association ends, whatever the way.

The classes override pynetdicom 3.0.4 internals (`RequestHandler._create_association`,
`ACSE._negotiate_as_acceptor`, `AssociationServer.get_request`); the version is
pinned, and tests/test_dicom_peers.py checks the wire behaviour with dcmtk.
"""
from __future__ import annotations

import copy
import logging
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Callable

from pynetdicom import evt
from pynetdicom.acse import ACSE
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from dicom_scp.events import AssociationEvent
from dicom_scp.peers import Decision, PeerPolicy

if TYPE_CHECKING:
    from pynetdicom import AE
    from pynetdicom.association import Association

log = logging.getLogger(__name__)

P_DATA_TF = 0x04
# A-ASSOCIATE-RQ with 128 contexts and user identity stays far below this.
OTHER_PDU_LIMIT = 1 << 20
# Peers that count the PDU header into the maximum length are not worth an abort.
PDU_TOLERANCE = 64
# How long a process sharing its listening socket lets others take a new
# connection first, per association it has open (AdmittingServer.get_request).
SHARED_ACCEPT_DELAY = 0.002
# A-ABORT, source: service provider (2), reason: invalid PDU parameter value (6).
_A_ABORT_INVALID_PARAMETER = bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 2, 6])

# A-ASSOCIATE-RJ (source, diagnostic) -> why, for the rejections pynetdicom makes itself.
_REJECT_REASONS = {
    (1, 1): "no reason given",
    (1, 2): "application context name not supported",
    (1, 3): "calling AE title not recognised",
    (1, 7): "called AE title not recognised",
    (2, 1): "no reason given (ACSE)",
    (2, 2): "protocol version not supported",
    (3, 1): "temporary congestion",
    (3, 2): "too many associations (local limit exceeded)",
}


@dataclass(frozen=True)
class Admission:
    """What every connection on every listener is checked against and reports to."""

    policy: PeerPolicy
    max_pdu_bytes: int
    report: Callable[[AssociationEvent], None]
    # The studies an association brought, taken when it ends.
    studies_of: Callable[["Association"], tuple[str, ...]]
    handshake_timeout: float = 30.0


class PduTooLarge(OSError):
    """Raised inside pynetdicom's PDU reader; it closes the association (Evt17)."""


class _PduLimit:
    """Wraps AssociationSocket.recv, which pynetdicom's DUL calls twice per PDU:
    recv(6) for type and length, then recv(length) for the body."""

    def __init__(self, sock, max_pdu_bytes: int):
        self._sock = sock
        self._recv = sock.recv
        self._max_pdu = max_pdu_bytes + PDU_TOLERANCE
        self._pdu_type: int | None = None

    def __call__(self, nr_bytes: int) -> bytearray:
        if self._pdu_type is not None:  # the body of the PDU whose header we just read
            pdu_type, self._pdu_type = self._pdu_type, None
            limit = self._max_pdu if pdu_type == P_DATA_TF else OTHER_PDU_LIMIT
            if nr_bytes > limit:
                reason = f"a {nr_bytes}-byte PDU of type 0x{pdu_type:02X}; the limit is {limit}"
                log.warning("aborting the association from %s: %s", self._peer(), reason)
                self._abort()
                raise PduTooLarge(f"peer sent {reason}")
            return self._recv(nr_bytes)
        data = self._recv(nr_bytes)
        if nr_bytes == 6 and len(data) == 6:
            self._pdu_type = data[0]
        return data

    def _peer(self) -> str:
        try:
            return str(self._sock.socket.getpeername()[0])
        except (AttributeError, OSError):
            return "?"

    def _abort(self) -> None:
        # Runs on the DUL thread, the only writer of this socket.
        try:
            self._sock.socket.sendall(_A_ABORT_INVALID_PARAMETER)
        except (AttributeError, OSError):
            pass


class _AdmittingACSE(ACSE):
    """ACSE whose acceptor negotiation starts with the peer check."""

    def __init__(self, assoc: "Association", admission: Admission, address: str, tls: bool):
        super().__init__(assoc)
        self._admission = admission
        self._address = address
        self._tls = tls
        self.reject_reason = ""
        self.was_accepted = False

    def _negotiate_as_acceptor(self) -> None:
        request = self.requestor.primitive
        calling = (request.calling_ae_title or "").strip()
        try:
            decision = self._admission.policy.check(calling, self._address)
        except Exception:  # fail closed
            log.exception("peer check failed for %s", calling)
            decision = Decision(False, "calling AE title not recognised: peer check failed")
        if not decision.accepted:
            self.requestor.ae_title = request.calling_ae_title
            self.reject_reason = decision.reason
            log.warning("association from %s at %s rejected: %s", calling, self._address, decision.reason)
            # As pynetdicom rejects (acse.py): A-ASSOCIATE-RJ, the event, then stop the DUL.
            self.send_reject(0x01, 0x01, 0x03)
            evt.trigger(self.assoc, evt.EVT_REJECTED, {})
            self.assoc.kill()
            return
        super()._negotiate_as_acceptor()
        if self.assoc.is_established:
            self.was_accepted = True
            self._admission.report(_event(self.assoc, "accepted", self._tls))


def _titles(assoc: "Association") -> tuple[str, str]:
    request = assoc.requestor.primitive
    if request is None:
        return "", ""
    return (request.calling_ae_title or "").strip(), (request.called_ae_title or "").strip()


def _event(assoc: "Association", kind: str, tls: bool, reason: str = "", studies: tuple[str, ...] = ()) -> AssociationEvent:
    calling, called = _titles(assoc)
    info = assoc.requestor.address_info
    return AssociationEvent(kind=kind, calling_ae=calling, called_ae=called,
                            peer_address=info.address if info else "", peer_port=info.port if info else 0,
                            reason=reason, study_uids=studies, tls=tls)


def _reject_reason(assoc: "Association") -> str:
    reason = getattr(assoc.acse, "reject_reason", "")
    if reason:
        return reason
    primitive = assoc.acceptor.primitive
    source, diagnostic = getattr(primitive, "result_source", None), getattr(primitive, "diagnostic", None)
    return _REJECT_REASONS.get((source, diagnostic), f"rejected (source {source}, diagnostic {diagnostic})")


def _tls_failure(exc: Exception) -> str:
    detail = getattr(exc, "verify_message", None) or getattr(exc, "reason", None) or str(exc) or type(exc).__name__
    return f"TLS handshake failed: {detail}"


class _AdmittingHandler(RequestHandler):
    server: "AdmittingServer"

    def handle(self) -> None:
        admission = self.server.admission
        tls = self.server.ssl_context is not None
        host, port = str(self.client_address[0]), int(self.client_address[1])
        if tls and not self._handshake(admission, host, port):
            return
        assoc = self._create_association()
        assoc.acse = _AdmittingACSE(assoc, admission, host, tls)
        assoc.dul.socket.recv = _PduLimit(assoc.dul.socket, admission.max_pdu_bytes)
        evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
        assoc.start()
        # This thread is this connection's anyway: wait for the association to
        # end, so exactly one closing event is reported however it ends.
        assoc.join()
        self._report_end(assoc, admission, tls)

    def _handshake(self, admission: Admission, host: str, port: int) -> bool:
        sock: ssl.SSLSocket = self.request
        try:
            previous = sock.gettimeout()
            sock.settimeout(admission.handshake_timeout)
            sock.do_handshake()
            sock.settimeout(previous)
            return True
        except (OSError, ValueError) as exc:  # ssl.SSLError, a timeout, a reset
            reason = _tls_failure(exc)
            log.warning("DICOM TLS connection from %s refused: %s", host, reason)
            admission.report(AssociationEvent("rejected", "", "", host, port, reason, tls=True))
            self.server.shutdown_request(sock)
            return False

    @staticmethod
    def _report_end(assoc: "Association", admission: Admission, tls: bool) -> None:
        if assoc.is_rejected:
            event = _event(assoc, "rejected", tls, _reject_reason(assoc))
            if not getattr(assoc.acse, "reject_reason", ""):  # pynetdicom's own (e.g. too many associations)
                log.warning("association from %s at %s rejected: %s", event.calling_ae, event.peer_address, event.reason)
            admission.report(event)
        elif getattr(assoc.acse, "was_accepted", False):
            studies = admission.studies_of(assoc)
            if assoc.is_released:
                admission.report(_event(assoc, "released", tls, studies=studies))
            else:
                how = "aborted" if assoc.is_aborted else "connection closed without release"
                admission.report(_event(assoc, "aborted", tls, how, studies))
        # else: no A-ASSOCIATE-RQ ever came (not DICOM, or the ACSE timeout); nothing to report


class SupportedContexts(list):
    """The listener's presentation contexts, copied cheaply for each association.

    pynetdicom gives every association its own `deepcopy` of the server's
    contexts (`RequestHandler._create_association`). With every storage SOP
    class offered in up to 45 transfer syntaxes (5400 UIDs), that deepcopy
    took 40 ms per association with the GIL held, on the one thread that also
    runs the workers' Python. A context's state is a few scalars, its UIDs
    (immutable `str`s) and its transfer syntax list, so a shallow copy of each
    context with its own copy of every list is the same independent copy.
    """

    def __deepcopy__(self, memo) -> list:
        copies = []
        for context in self:
            twin = copy.copy(context)
            for name, value in vars(context).items():
                if isinstance(value, list):
                    setattr(twin, name, list(value))
            copies.append(twin)
        return copies


class AdmittingServer(ThreadedAssociationServer):
    """A listener whose connections go through `_AdmittingHandler`.

    Several processes may accept from one listening socket (node/intake_processes.py):
    the process that made it calls `share()`, which makes its accepts
    non-blocking, and the others pass it as `listening_socket`. All of them
    select on the socket, and those that lose the race for a connection get
    `BlockingIOError` from `accept()`, which socketserver ignores. A process
    holds off `SHARED_ACCEPT_DELAY` per connection it has open before it
    accepts, so the connections spread over the processes.
    Only the process that made the socket shuts it down (`server_close`): a
    shutdown acts on the socket every process shares, a close on one
    process's descriptor only.
    """

    # Handler threads wait for their association; stopping the listener must not.
    daemon_threads = True
    block_on_close = False

    def __init__(self, *args, admission: Admission, listening_socket: socket.socket | None = None, **kwargs):
        self.admission = admission
        self._inherited = listening_socket
        self._shared = False
        # Connections accepted and not yet ended (counted from the accept on, as
        # an association's own thread starts a little later).
        self._connections = 0
        self._count_lock = threading.Lock()
        super().__init__(*args, request_handler=_AdmittingHandler, **kwargs)
        self.contexts = SupportedContexts(self.contexts)

    def server_bind(self) -> None:
        if self._inherited is None:
            super().server_bind()
            return
        self.socket.close()  # the unbound one socketserver made
        self.socket = self._inherited
        self.server_address = self.socket.getsockname()

    def server_activate(self) -> None:
        if self._inherited is None:  # an inherited socket is listening already
            super().server_activate()

    def server_close(self) -> None:
        if self._inherited is None:
            super().server_close()
        else:
            self.socket.close()

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._count_lock:
                self._connections -= 1

    def share(self) -> socket.socket:
        """The listening socket, for other processes to accept from as well."""
        self.socket.setblocking(False)
        self._shared = True
        return self.socket

    def get_request(self):
        if self._inherited is not None or self._shared:
            # Leave the connection to a process with fewer associations open, if
            # one is there to take it: the kernel would give it to whichever
            # process asks first, so four associations split 3:1 as often as 2:2.
            # Bounded (a stopped sibling takes nothing), and only this thread waits.
            time.sleep(SHARED_ACCEPT_DELAY * min(self._connections, 10))
        client, address = self.socket.accept()
        with self._count_lock:
            self._connections += 1
        if self.ssl_context:
            # The handshake happens on the connection's own thread (_AdmittingHandler).
            client = self.ssl_context.wrap_socket(client, server_side=True, do_handshake_on_connect=False)
        return client, address


def start_listener(ae: "AE", address: tuple[str, int], admission: Admission, *,
                   ssl_context: ssl.SSLContext | None, evt_handlers: list,
                   listening_socket: socket.socket | None = None) -> AdmittingServer:
    """Like `ae.start_server(address, block=False, ...)`, with the gate; on
    `listening_socket` (another process's, `AdmittingServer.share`) if given."""
    server = ae.make_server(address, ssl_context=ssl_context, evt_handlers=evt_handlers,
                            server_class=AdmittingServer, admission=admission, listening_socket=listening_socket)
    stamp = datetime.now().strftime("%Y%m%d%H%M%S")
    kind = "TLS" if ssl_context else "TCP"
    threading.Thread(target=server.serve_forever, name=f"AcceptorServer-{kind}@{stamp}", daemon=True).start()
    ae._servers.append(server)  # so that server.shutdown() (which removes it) and ae.shutdown() work
    return server

