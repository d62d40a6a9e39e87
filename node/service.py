"""`carina serve`: bring up the database, SCP, scheduler, model, workers and
HTTP API in one process, and take them down cleanly."""
from __future__ import annotations

import logging
import shutil
import tempfile
import threading
from functools import partial

import uvicorn
from apscheduler.schedulers.background import BackgroundScheduler

from dicom_scp.events import AssociationEvent
from dicom_scp.peers import Peer, PeerPolicy
from dicom_scp.scp import StorageSCP
from dicom_scp.tls import TlsListener, server_context
from node.api.app import create_app
from node.audit import events
from node.audit.associations import association_auditor
from node.completion import complete_quiet_studies
from node.config import ConfigError, Settings, check_serve
from node.context import NodeContext
from node.db import Database
from node.fhir_store import reindex_missing
from node.receiver import Receiver, record_release
from node.worker import WorkerPool

log = logging.getLogger("carina")


def configure_logging(level: str = "INFO") -> None:
    # UIDs only in logs, never patient names: handlers log SOP/Study UIDs.
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("apscheduler").setLevel(logging.WARNING)  # it logs every 1 s tick


def prepare_storage(ctx: NodeContext) -> None:
    for d in (ctx.instances_dir, ctx.outputs_dir, ctx.work_dir):
        d.mkdir(parents=True, exist_ok=True)
    # Partial uploads from a crash are not acknowledged instances; drop them.
    shutil.rmtree(ctx.tmp_dir, ignore_errors=True)
    ctx.tmp_dir.mkdir(parents=True)
    # pynetdicom streams C-STORE data to tempfile's directory; keeping it on
    # the storage filesystem makes the final os.replace an atomic rename.
    tempfile.tempdir = str(ctx.tmp_dir)


def load_engine(ctx: NodeContext) -> None:
    """The model (registry's active one, or `inference.weights` if pinned) behind a batching
    worker, with hot-swap polling. On failure the node stays up, unready, and keeps polling
    so that activating a loadable model recovers it."""
    from node.models import ModelManager

    manager = ctx.models = ModelManager(ctx.settings)

    def ready(batcher) -> None:
        ctx.engine = batcher
        info = batcher.model_info
        log.info("model ready: %s %s%s", info.name, info.version, f" — {info.caveat}" if info.demo else "")
        ctx.ready["model"] = True

    manager.on_ready = ready
    try:
        manager.start()
    except Exception:
        log.exception("model failed to load; the node stays up but will not score studies until a loadable "
                      "model is activated (carina model list / activate)")
        manager.start_watching_only()


ACCEPT_ANY_PEER_WARNING = (
    "dicom.accept_any_peer is set: any calling AE title from any address may push studies; "
    "list the senders in dicom.peers"
)


def peer_policy(ctx: NodeContext) -> PeerPolicy:
    dicom = ctx.settings.dicom
    if dicom.accept_any_peer:
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


class Node:
    """All parts of a running node; start() then stop()."""

    def __init__(self, settings: Settings):
        self.ctx = NodeContext(settings=settings, db=Database(settings.database_url))
        self.scp: StorageSCP | None = None
        self.scheduler: BackgroundScheduler | None = None
        self.workers: WorkerPool | None = None
        self.hl7_listener = None  # node.mllp_listener.MllpListener when hl7_listener.enabled
        self.syslog = None  # node.audit.syslog.SyslogForwarder when audit.syslog.enabled
        # The SCP's on_association callback (dicom_scp/events.py): one audit record
        # per inbound association, and a log line for those that were aborted.
        audit = association_auditor(self.ctx.db, self.ctx.audit, settings.dicom.ae_title)

        def on_association(event: AssociationEvent) -> None:
            log_association(event)
            audit(event)

        self.on_association = on_association
        self._stopping = threading.Event()

    def start(self) -> None:
        ctx, s = self.ctx, self.ctx.settings
        check_serve(s)
        policy, tls = peer_policy(ctx), tls_listener(s)
        prepare_storage(ctx)
        ctx.db.create_schema()
        with ctx.db.session() as session:  # FHIR resources stored before the search index existed
            reindex_missing(session)
        ctx.ready["db"] = True
        if s.audit.syslog.enabled:
            from node.audit.syslog import SyslogForwarder

            self.syslog = SyslogForwarder(ctx.audit, s.audit.syslog).start()
        events.application(ctx.audit, started=True)
        if s.hl7_listener.enabled:
            from node.mllp_listener import MllpListener

            self.hl7_listener = MllpListener(ctx.db, s.hl7_listener).start()
        self.scp = StorageSCP(
            ae_title=s.dicom.ae_title,
            host=s.dicom.host,
            port=s.dicom.port,
            accept=Receiver(ctx.db, ctx.instances_dir, s.storage.min_free_mb),
            peers=policy,
            max_associations=s.dicom.max_associations,
            max_pdu_bytes=s.dicom.max_pdu_bytes,
            max_inflated_bytes=s.dicom.max_inflated_bytes,
            tls=tls,
            on_release=partial(record_release, ctx.db),
            on_association=self.on_association,
        )
        self.scp.start()
        ctx.ready["scp"] = True
        self.scheduler = BackgroundScheduler(timezone="UTC")
        self.scheduler.add_job(
            complete_quiet_studies,
            "interval",
            args=[ctx.db, s.dicom.stable_seconds],
            seconds=max(0.2, min(1.0, s.dicom.stable_seconds / 5)),
            max_instances=1,
            coalesce=True,
            id="study-completion",
        )
        self.scheduler.start()
        self.workers = WorkerPool(ctx, s.pipeline.workers)
        threading.Thread(target=self._model_then_workers, name="model-loader", daemon=True).start()

    def _model_then_workers(self) -> None:
        load_engine(self.ctx)
        # Workers start once a model is there (now, or after a later activation).
        while self.ctx.engine is None and not self._stopping.wait(0.5):
            pass
        if self.ctx.engine is not None and not self._stopping.is_set():
            self.workers.start()

    def stop(self) -> None:
        self._stopping.set()
        if self.hl7_listener:
            self.hl7_listener.stop()
        if self.scp:
            self.scp.stop()
        if self.scheduler:
            self.scheduler.shutdown(wait=False)
        if self.workers:
            self.workers.stop()
        if self.ctx.models:
            self.ctx.models.stop()  # after the workers: they may be waiting on a batch
        try:
            events.application(self.ctx.audit, started=False)
        except Exception as exc:
            log.error("could not record the node's stop in the audit trail: %s", type(exc).__name__)
        if self.syslog:
            self.syslog.stop()
        self.ctx.db.dispose()


def http_config(app, settings: Settings) -> uvicorn.Config:
    """uvicorn's settings: TLS from api.tls, forwarded headers only from api.trusted_proxies.

    No access log: request lines carry FHIR search parameters (patient identifiers);
    who asked for what is in the audit trail instead."""
    api = settings.api
    tls = {}
    if api.tls.enabled:
        import os

        tls = {"ssl_certfile": str(api.tls.certfile), "ssl_keyfile": str(api.tls.keyfile) if api.tls.keyfile else None}
        if api.tls.keyfile_password_env:
            tls["ssl_keyfile_password"] = os.environ.get(api.tls.keyfile_password_env)
    return uvicorn.Config(
        app, host=api.host, port=api.port, log_config=None, access_log=False,
        proxy_headers=bool(api.trusted_proxies), forwarded_allow_ips=list(api.trusted_proxies) or None,
        server_header=False, **tls,
    )


def serve(settings: Settings) -> None:
    configure_logging()
    node = Node(settings)
    node.start()
    try:
        uvicorn.Server(http_config(create_app(node.ctx), settings)).run()
    finally:
        node.stop()
