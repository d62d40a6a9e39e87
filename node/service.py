"""`carina serve --role ROLE`: bring up the parts of a node in one process, and take them down cleanly.

Roles (`ROLE_PARTS`), so that a site can run several receivers behind a load
balancer, workers on GPU hosts and the API apart, all on one PostgreSQL
database and one shared storage directory (`storage.data_dir`, an NFS or CSI
volume); `all` (the default) is the single-process node:

- `receiver`: the DICOM SCP with its durable intake (in `dicom.receiver_processes`
  processes: node/intake_processes.py), the HL7 v2 listener,
  and the node-wide schedulers: study completion and the retention purge
  (plus the start-up sweep and the syslog audit forwarder). Several
  receivers may run: completion claims quiet studies with FOR UPDATE SKIP
  LOCKED and the purge re-checks each study under its row lock, so each
  study is completed and purged once whichever replica gets it.
- `worker`: the infer, encode, capture and deliver jobs, with the warm model; jobs are
  claimed under leases (node/jobs.py), so any number of workers share the
  queue and a dead one's job is taken over when its lease expires.
- `api`: HTTP: the reading app, operator API, FHIR, DICOMweb (STOW-RS intake
  included: it writes the same durable rows as the SCP, and a receiver's
  completion scheduler picks those studies up). It also loads the model, for
  the direct-scoring endpoints (/api/v1/predict, upload), but is ready
  without it.
- `all`: every part above.

Every role serves /healthz, /readyz and /metrics on `api.port`; only `api`
and `all` serve the rest of the HTTP API. Every role refuses to start on a
database whose schema is not this Carina's revision (node/schema.py: run
`carina db upgrade`), except a brand-new, empty SQLite database, which it
creates (the embedded default needs no setup).

Shutdown (SIGTERM from systemd, `docker stop` or Kubernetes; SIGINT from a
terminal): uvicorn's own signal handling is replaced, because it re-raises
the signal after stopping HTTP, which kills the process before the rest of
the node stops. The first signal starts `Node.drain`: the SCP stops accepting
associations and lets open ones finish for up to `shutdown.grace_seconds`
(then aborts them: nothing the sender saw acknowledged is lost, as an
acknowledgement means durable and committed), the workers stop claiming and
running stages get the same grace to finish, after which their leases are
released (so another worker or the restarted node takes them at once). Then
HTTP stops and the process exits 0. A second signal exits at once (status
128+signal) after a best-effort release of the leases it holds: still safe,
as nothing acknowledged or settled depends on the process.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import gc
import logging
import os
import signal
import threading
import time
from functools import partial

import uvicorn
from apscheduler.schedulers.background import BackgroundScheduler

from dicom_scp.peers import PeerPolicy
from dicom_scp.scp import StorageSCP
from dicom_scp.tls import TlsListener
from node import logs
from node.api.app import create_app, create_probe_app
from node.audit import events
from node.config import ConfigError, Settings, check_serve
from node.context import NodeContext
from node.db import Database
from node.fhir_store import reindex_missing
from node.intake import Intake, peer_policy, prepare_storage, tls_listener
from node.intake_processes import IntakeProcesses
from node.roles import ROLE_PARTS, ROLES, runs
from node.worker import WorkerPool

log = logging.getLogger("carina")


def configure_logging(settings: Settings | None = None) -> None:
    # UIDs only in logs, never patient names: handlers log SOP/Study UIDs.
    if settings is None:
        logs.configure()
        return
    lg = settings.logging
    logs.configure(lg.level, fmt=lg.format, file=lg.file, max_bytes=lg.max_bytes, backup_count=lg.backup_count)


def freeze_start_up_heap() -> None:
    """Exempt what start-up built from the cyclic garbage collector.

    The modules, the model and the settings live as long as the process, yet
    every full collection walks them again: 267 ms with the GIL held for the
    ~720k objects of an all-in-one node, during which no other thread of the
    node runs. pynetdicom's association server forces one every 60 turns of
    its loop (`AssociationServer.service_actions`: every 30 s when idle, more
    often under load), and Python starts its own as the heap grows.
    `gc.freeze()` moves the objects alive now to a permanent generation that
    collections skip (reference counting still frees them); the collection
    before it keeps start-up's garbage out. `carina_gc_frozen_objects` shows it.
    """
    gc.collect()
    gc.freeze()


def load_engine(ctx: NodeContext) -> None:
    """The model (registry's active one, or `inference.weights` if pinned) behind a batching
    worker, with hot-swap polling. On failure the node stays up, unready, and keeps polling
    so that activating a loadable model recovers it."""
    from node.models import ModelManager

    manager = ctx.models = ModelManager(ctx.settings)

    def ready(batcher) -> None:
        batcher.on_batch = ctx.metrics.observe_batch  # inference batch size and latency
        ctx.engine = batcher
        info = batcher.model_info
        log.info("model ready: %s %s%s", info.name, info.version, f" — {info.caveat}" if info.demo else "")
        if "model" in ctx.ready:  # the api role loads it too, but is ready without it
            ctx.ready["model"] = True

    manager.on_ready = ready
    try:
        manager.start()
    except Exception:
        log.exception("model failed to load; the node stays up but will not score studies until a loadable "
                      "model is activated (carina model list / activate)")
        manager.start_watching_only()


class Node:
    """All parts of a running node (those of its role); start() then stop()."""

    def __init__(self, settings: Settings, role: str = "all"):
        if role not in ROLES:
            raise ConfigError(f"--role must be one of {', '.join(ROLES)}, not {role!r}")
        self.role = role
        self.ctx = NodeContext(settings=settings, db=Database(settings.database_url), role=role,
                               ready={part: False for part in ROLE_PARTS[role]})
        self.scp: StorageSCP | None = None
        self.scheduler: BackgroundScheduler | None = None
        self.workers: WorkerPool | None = None
        self.hl7_listener = None  # node.mllp_listener.MllpListener when hl7_listener.enabled
        self.syslog = None  # node.audit.syslog.SyslogForwarder when audit.syslog.enabled
        self.intake = Intake(self.ctx, wake_workers=self._wake_workers)
        # More processes receiving on the SCP's sockets (dicom.receiver_processes).
        self.intake_processes: IntakeProcesses | None = None
        self._stopping = threading.Event()

    def start(self) -> None:
        from node.retention import finish_queued
        from node.schema import SchemaError, check
        from node.sweep import sweep

        ctx, s, role = self.ctx, self.ctx.settings, self.role
        check_serve(s, role)
        policy = peer_policy(ctx) if runs(role, "scp") else None
        tls = tls_listener(s) if runs(role, "scp") else None
        prepare_storage(ctx)
        try:
            check(ctx.db)  # this Carina's schema revision, or a clear refusal naming `carina db upgrade`
        except SchemaError as exc:
            raise ConfigError(f"database: {exc}") from None
        if runs(role, "fhir_reindex"):
            with ctx.db.session() as session:  # FHIR resources stored before the search index existed
                reindex_missing(session)
        if runs(role, "sweep"):
            finish_queued(ctx)  # files a crashed purge had unlinked from the database
            sweep(ctx)  # before the SCP listens: orphans of a crash, stale temp files
        ctx.metrics.bind(ctx)
        ctx.ready["db"] = True
        if runs(role, "syslog") and s.audit.syslog.enabled:
            from node.audit.syslog import SyslogForwarder

            self.syslog = SyslogForwarder(ctx.audit, s.audit.syslog).start()
        events.application(ctx.audit, started=True)
        if runs(role, "hl7_listener") and s.hl7_listener.enabled:
            from node.mllp_listener import MllpListener

            self.hl7_listener = MllpListener(ctx.db, s.hl7_listener).start()
        if runs(role, "scp"):
            self._start_scp(policy, tls)
        if runs(role, "schedulers"):
            self._start_schedulers()
        if runs(role, "workers"):
            self.workers = WorkerPool(ctx, s.pipeline.workers)
        if runs(role, "model"):
            threading.Thread(target=self._model_then_workers, name="model-loader", daemon=True).start()
        else:
            freeze_start_up_heap()  # the receiver role: its SCP's server forces the collections too
        log.info("node started as role %s", role)

    def _start_scp(self, policy: PeerPolicy, tls: TlsListener | None) -> None:
        ctx = self.ctx
        self.scp = self.intake.scp(policy, tls)
        ctx.metrics.associations_active.set_function(self._active_associations)
        ctx.scp = self.scp
        self.scp.start()
        extra = ctx.settings.dicom.receiver_processes - 1
        if extra:
            self.intake_processes = IntakeProcesses(ctx.settings, self.scp.share(), extra, ctx.metrics,
                                                    self._wake_workers)
            self.intake_processes.start()
        ctx.ready["scp"] = True

    def _active_associations(self) -> int:
        here = self.scp.active_associations if self.scp else 0
        return here + (self.intake_processes.active_associations if self.intake_processes else 0)

    def _wake_workers(self) -> None:
        if self.workers:
            self.workers.wake()

    def _start_schedulers(self) -> None:
        """Study completion and the retention purge: safe on several replicas (module docstring)."""
        s = self.ctx.settings
        self.scheduler = BackgroundScheduler(timezone="UTC")
        self.scheduler.add_job(
            self.intake.complete_studies,
            "interval",
            # Latency from the end of a study's window is at most one tick; the
            # query is one indexed SELECT that finds nothing most of the time.
            seconds=max(0.05, min(0.1, s.dicom.stable_seconds / 10)),
            max_instances=1,
            coalesce=True,
            id="study-completion",
        )
        r = s.retention
        if any(days is not None for days in (r.instances_days, r.outputs_days, r.jobs_days)):
            from node.retention import purge

            self.scheduler.add_job(
                partial(self._purge, purge), "interval", seconds=r.interval_seconds, max_instances=1, coalesce=True,
                id="retention-purge", next_run_time=dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=5),
            )
        self.scheduler.start()

    def _purge(self, purge) -> None:
        try:
            purge(self.ctx)
        except Exception:
            log.exception("retention purge failed; it runs again at the next interval")

    def _model_then_workers(self) -> None:
        spawning = None
        if self.workers is not None and self.ctx.settings.pipeline.stage_processes:
            spawning = threading.Thread(target=self._start_stage_processes, name="stage-processes", daemon=True)
            spawning.start()  # beside the model's loading: each takes seconds
        load_engine(self.ctx)
        freeze_start_up_heap()  # the model is the largest part of it
        if self.workers is None:
            return  # the api role: the model only serves the direct-scoring endpoints
        if spawning is not None:
            spawning.join()
        # Workers start once a model is there (now, or after a later activation).
        while self.ctx.engine is None and not self._stopping.wait(0.5):
            pass
        if self.ctx.engine is not None and not self._stopping.is_set():
            self.workers.start()

    def _start_stage_processes(self) -> None:
        """Encode and capture apart from the workers' GIL (node/pipeline/processes.py); should
        the processes fail to start, the stages run in this process, as with stage_processes: 0."""
        from node.pipeline.processes import StageProcesses

        processes = None
        try:
            processes = StageProcesses(self.ctx.settings, self.ctx.settings.pipeline.stage_processes)
            processes.start()
        except Exception:
            log.exception("stage processes failed to start; encode and capture run in the worker process")
            if processes is not None:
                processes.stop(0)
            return
        self.ctx.stage_processes = processes

    def drain(self, grace: float) -> None:
        """The graceful half of shutdown (see the module docstring): stop
        accepting, let associations and stages finish within `grace`, release
        the leases of stages still running. HTTP keeps answering meanwhile
        (/readyz says "draining")."""
        started = time.monotonic()
        self.ctx.draining = True
        self._stopping.set()
        if self.hl7_listener:
            self.hl7_listener.stop()
        if self.scheduler:
            self.scheduler.shutdown(wait=False)
            self.scheduler = None
        results: dict[str, int] = {}
        parts = []
        if self.intake_processes:  # first: they stop accepting before the sockets they share are shut
            parts.append(threading.Thread(target=self.intake_processes.drain, args=(grace,), name="drain-intake"))
        if self.scp:
            parts.append(threading.Thread(target=lambda: results.__setitem__("aborted", self.scp.stop(grace)),
                                          name="drain-scp"))
        if self.workers:
            parts.append(threading.Thread(target=lambda: results.__setitem__("released", self.workers.stop(grace)),
                                          name="drain-workers"))
        for part in parts:
            part.start()
        for part in parts:
            part.join()
        self.ctx.ready["scp"] = False
        log.info("drained in %.1f s: %d association(s) aborted after the grace period, %d running job(s) released",
                 time.monotonic() - started, results.get("aborted", 0), results.get("released", 0))

    def release_now(self) -> None:
        """The second signal: hand back the leases this process holds, quickly, best effort."""
        if self.workers:
            self.workers.release_running()

    def stop(self) -> None:
        self._stopping.set()
        if self.hl7_listener:
            self.hl7_listener.stop()
        if self.intake_processes:
            self.intake_processes.drain(0)  # at once if drain() has run, else as a second signal does
        if self.scp:
            self.scp.stop()
        if self.scheduler:
            self.scheduler.shutdown(wait=False)
        if self.workers:
            self.workers.stop(0)
        if self.ctx.stage_processes:
            self.ctx.stage_processes.stop()
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


class _Server(uvicorn.Server):
    """uvicorn without its signal handling: `serve` owns SIGTERM/SIGINT."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


def serve(settings: Settings, role: str = "all") -> None:
    configure_logging(settings)
    node = Node(settings, role)
    app = create_app(node.ctx) if runs(role, "http_api") else create_probe_app(node.ctx)
    server = _Server(http_config(app, settings))
    signals: list[int] = []

    def graceful() -> None:
        try:
            node.drain(settings.shutdown.grace_seconds)
        finally:
            server.should_exit = True

    def on_signal(signum: int, _frame) -> None:
        signals.append(signum)
        if len(signals) == 1:
            log.info("%s: graceful shutdown, grace %.0f s (a second signal exits at once)",
                     signal.Signals(signum).name, settings.shutdown.grace_seconds)
            threading.Thread(target=graceful, name="graceful-shutdown", daemon=True).start()
            return
        log.warning("%s again: exiting now", signal.Signals(signum).name)
        releasing = threading.Thread(target=node.release_now, daemon=True)
        releasing.start()
        releasing.join(2.0)
        logging.shutdown()
        os._exit(128 + signum)

    node.start()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    try:
        server.run()
    finally:
        node.stop()
    log.info("stopped")
    # Everything is durable and committed by now. Skip the interpreter's
    # finalisation: tearing down torch's native state takes seconds (measured
    # ~4 s on 2 cores) that count against the orchestrator's stop timeout.
    logging.shutdown()
    os._exit(0)
