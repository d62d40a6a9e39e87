"""The node's DICOM intake: the Storage SCP wired to the receiver, the audit
trail, the metrics and study completion.

One place builds it, because two kinds of process run it: a node of role
`all` or `receiver` (node/service.py), and the extra receiving processes such
a node starts with `dicom.receiver_processes` (node/intake_processes.py),
which accept associations from the node's own listening sockets.
"""
from __future__ import annotations

import logging
import tempfile
from typing import Callable

from dicom_scp.events import AssociationEvent
from dicom_scp.peers import Peer, PeerPolicy
from dicom_scp.scp import SharedSockets, StorageSCP
from dicom_scp.tls import TlsListener, server_context
from node.audit.associations import association_auditor
from node.completion import complete_quiet_studies
from node.config import ConfigError, Settings
from node.context import NodeContext
from node.receiver import Receiver, record_release

log = logging.getLogger("carina")

ACCEPT_ANY_PEER_WARNING = (
    "dicom.accept_any_peer is set: any calling AE title from any address may push studies; "
    "list the senders in dicom.peers"
)


def peer_policy(ctx: NodeContext, warn: bool = True) -> PeerPolicy:
    dicom = ctx.settings.dicom
    if dicom.accept_any_peer:
        if warn:
            log.warning("%s", ACCEPT_ANY_PEER_WARNING)
            ctx.warnings.append(ACCEPT_ANY_PEER_WARNING)
        return PeerPolicy.any_peer()
    return PeerPolicy(Peer(p.ae_title, p.host) for p in dicom.peers)


def tls_listener(settings: Settings) -> TlsListener | None:
    tls = settings.dicom.tls
    if tls is None:
        return None
    try:
        context = server_context(certificate=tls.certificate, private_key=tls.private_key,
                                 ca_certificates=tls.ca_certificates,
                                 require_client_certificate=tls.require_client_certificate)
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        raise ConfigError(f"dicom.tls: cannot load the certificate, key or CA bundle: {exc}") from None
    return TlsListener(tls.port, context)


def log_association(event: AssociationEvent) -> None:
    """Logs the associations that ended without a release (AE title, address and
    a count, never PHI). Rejections are logged by dicom_scp, releases that
    brought studies by node/receiver.py `record_release`."""
    if event.kind != "aborted":
        return
    how = " over TLS" if event.tls else ""
    log.warning("association from %s at %s:%d%s ended without release after %d study(ies): %s", event.calling_ae,
                event.peer_address, event.peer_port, how, len(event.study_uids), event.reason)


def prepare_storage(ctx: NodeContext) -> None:
    for d in (ctx.instances_dir, ctx.outputs_dir, ctx.work_dir, ctx.tmp_dir):
        d.mkdir(parents=True, exist_ok=True)
    # pynetdicom streams C-STORE data to tempfile's directory; keeping it on
    # the storage filesystem makes the final placement an atomic link/rename.
    # Partial uploads a crash left there are removed by the start-up sweep.
    tempfile.tempdir = str(ctx.tmp_dir)


class Intake:
    """Builds and runs the SCP of one process; `wake_workers` is called when
    studies were completed (the workers of this node, or of the node that
    started this receiving process)."""

    def __init__(self, ctx: NodeContext, wake_workers: Callable[[], None]):
        self.ctx = ctx
        self.wake_workers = wake_workers
        audit = association_auditor(ctx.db, ctx.audit, ctx.settings.dicom.ae_title)

        # The SCP's on_association callback (dicom_scp/events.py): one audit record
        # per inbound association, and a log line for those that were aborted.
        def on_association(event: AssociationEvent) -> None:
            if event.kind == "accepted":
                ctx.metrics.associations.inc()
            log_association(event)
            audit(event)

        self.on_association = on_association

    def scp(self, policy: PeerPolicy, tls: TlsListener | None, sockets: SharedSockets | None = None) -> StorageSCP:
        """The SCP (not started), on `sockets` if another process made them."""
        ctx, dicom = self.ctx, self.ctx.settings.dicom
        return StorageSCP(
            ae_title=dicom.ae_title,
            host=dicom.host,
            port=dicom.port,
            accept=Receiver(ctx.db, ctx.instances_dir, ctx.settings.storage.min_free_mb, ctx.metrics),
            peers=policy,
            max_associations=dicom.max_associations,
            max_pdu_bytes=dicom.max_pdu_bytes,
            max_inflated_bytes=dicom.max_inflated_bytes,
            tls=tls,
            on_release=self.released,
            on_reject=lambda reason: ctx.metrics.instances_rejected.labels(reason).inc(),
            on_association=self.on_association,
            listening_sockets=sockets,
        )

    def complete_studies(self) -> None:
        dicom = self.ctx.settings.dicom
        if complete_quiet_studies(self.ctx.db, dicom.stable_seconds, on_release=dicom.complete_on_release):
            self.wake_workers()

    def released(self, calling_ae: str, study_uids: list[str]) -> None:
        """An association that brought studies was released (node/receiver.py
        `record_release`); with dicom.complete_on_release they complete now."""
        record_release(self.ctx.db, calling_ae, study_uids)
        if self.ctx.settings.dicom.complete_on_release:
            self.complete_studies()
