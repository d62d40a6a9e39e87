"""What the running node shares between its parts (API, SCP, pipeline)."""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from node.audit.trail import AuditTrail
from node.config import Settings
from node.db import Database
from node.metrics import Metrics

if TYPE_CHECKING:  # both pull in torch; the CLI and the API must start without it
    from dicom_scp.scp import StorageSCP
    from inference.batcher import BatchingEngine
    from inference.types import ModelInfo
    from node.models import ModelManager
    from node.pipeline.processes import StageProcesses
    from node.renditions import Renditions


def _renditions() -> "Renditions":
    from node.renditions import Renditions  # PIL and numpy: only when a pipeline runs

    return Renditions()


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def trail_for(settings: Settings, db: Database) -> AuditTrail:
    return AuditTrail(db, source_id=settings.audit.source_id, enterprise_site_id=settings.audit.enterprise_site_id)


@dataclass
class NodeContext:
    settings: Settings
    db: Database
    # Filled in as each part comes up; /healthz says "ok" only when all are True.
    # Only the parts of the process's role are keys (node/service.py ROLE_PARTS).
    ready: dict[str, bool] = field(default_factory=lambda: {"db": False, "scp": False, "model": False})
    # `carina serve --role`: all, receiver, worker or api (node/service.py).
    role: str = "all"
    # Running, but not as a hospital should run it (e.g. accepting any DICOM
    # peer): each a sentence for the operator; readiness reports them.
    warnings: list[str] = field(default_factory=list)
    # The batching worker once a model is loaded: thread-safe, callers share
    # its batches; `predict(images)` and `model_info` as on an InferenceEngine.
    engine: BatchingEngine | None = None
    # Loads the registry's active model and hot-swaps it.
    models: ModelManager | None = None
    # When a scored study is issued; tests fix it to pin outputs byte for byte.
    clock: Callable[[], dt.datetime] = utc_now
    # The audit trail (node/audit/); built from settings.audit unless given.
    audit: AuditTrail | None = None
    # Prometheus counters and histograms of this node (node/metrics.py).
    metrics: Metrics = field(default_factory=Metrics)
    # Set when a graceful shutdown has begun: /readyz answers 503 "draining".
    draining: bool = False
    # The running SCP, for /readyz ("is it listening?").
    scp: StorageSCP | None = None
    # Display renditions passed from infer to encode in memory (node/renditions.py).
    renditions: Renditions = field(default_factory=lambda: _renditions())
    # Where encode and capture run when pipeline.stage_processes > 0 (node/pipeline/processes.py).
    stage_processes: StageProcesses | None = None

    def __post_init__(self) -> None:
        if self.audit is None:
            self.audit = trail_for(self.settings, self.db)

    @property
    def model_info(self) -> ModelInfo | None:
        return None if self.engine is None else self.engine.model_info

    @property
    def data_dir(self) -> Path:
        return Path(self.settings.storage.data_dir)

    @property
    def instances_dir(self) -> Path:
        return self.data_dir / "instances"

    @property
    def outputs_dir(self) -> Path:
        return self.data_dir / "outputs"

    @property
    def work_dir(self) -> Path:
        return self.data_dir / "work"

    @property
    def tmp_dir(self) -> Path:
        return self.data_dir / "tmp"

    @property
    def quarantine_dir(self) -> Path:
        return self.data_dir / "quarantine"
