"""What the running node shares between its parts (API, SCP, pipeline)."""
from __future__ import annotations

from dataclasses import dataclass, field

from node.config import Settings
from node.db import Database


@dataclass
class NodeContext:
    settings: Settings
    db: Database
    # Filled in as each part comes up; /healthz is 200 only when all are True.
    ready: dict[str, bool] = field(default_factory=lambda: {"db": False, "scp": False, "model": False})
    model_info: object | None = None  # inference.types.ModelInfo once loaded
