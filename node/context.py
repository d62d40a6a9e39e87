"""What the running node shares between its parts (API, SCP, pipeline)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from node.config import Settings
from node.db import Database


@dataclass
class NodeContext:
    settings: Settings
    db: Database
    # Filled in as each part comes up; /healthz is 200 only when all are True.
    ready: dict[str, bool] = field(default_factory=lambda: {"db": False, "scp": False, "model": False})
    # inference.batcher.BatchingEngine once a model is loaded: thread-safe, callers
    # share its batches; `predict(images)` and `model_info` as on an InferenceEngine.
    engine: Any = None
    # node.models.ModelManager: loads the registry's active model and hot-swaps it.
    models: Any = None

    @property
    def model_info(self):
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
    def tmp_dir(self) -> Path:
        return self.data_dir / "tmp"
