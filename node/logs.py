"""Logging: plain text (default) or JSON lines, to stderr or a size-rotated file.

One log record is one line. In JSON each line carries, besides time, level,
logger and message, the study UID, SOP Instance UID and job id the record
belongs to when there is one: the pipeline worker and the C-STORE handler set
them in a context (`log_context`), so a `grep` or a log shipper can follow one
study through the node without parsing messages.

No PHI: Carina logs UIDs, states and reasons, never patient names, ids or
birth dates; the context holds UIDs only.

Rotation: under systemd (journald) or Docker (its `json-file`/`local` log
drivers rotate with `max-size`/`max-file`), log to stderr and let them rotate.
Without either, `logging.file` writes a size-rotated file
(`logging.max_bytes`, `logging.backup_count`).
"""
from __future__ import annotations

import contextlib
import contextvars
import datetime as dt
import json
import logging
import logging.handlers
from pathlib import Path
from typing import Iterator

_CONTEXT: contextvars.ContextVar[dict[str, object]] = contextvars.ContextVar("carina_log_context", default={})
CONTEXT_KEYS = ("study_uid", "sop_instance_uid", "job_id", "stage", "destination")


@contextlib.contextmanager
def log_context(**values: object) -> Iterator[None]:
    """Attach these fields (UIDs, job id; never PHI) to every record logged inside."""
    token = _CONTEXT.set({**_CONTEXT.get(), **{k: v for k, v in values.items() if v not in (None, "")}})
    try:
        yield
    finally:
        _CONTEXT.reset(token)


def bind_context(**values: object) -> None:
    """Add fields to the current context (e.g. the study UID once a job has loaded it)."""
    _CONTEXT.set({**_CONTEXT.get(), **{k: v for k, v in values.items() if v not in (None, "")}})


def current_context() -> dict[str, object]:
    """The fields bound here, to carry into another process (node/pipeline/processes.py)."""
    return dict(_CONTEXT.get())


def forward_to(records, level: str) -> None:
    """In a child process: every record, with its context fields, goes to
    `records` (a multiprocessing queue) for the parent's handlers."""
    _install(logging.handlers.QueueHandler(records), level)


class Reroute(logging.Handler):
    """In the parent: hands a child's record (`forward_to`) to the parent's logger of the same name."""

    def handle(self, record: logging.LogRecord) -> bool:
        logging.getLogger(record.name).handle(record)
        return True


def _install(handler: logging.Handler, level: str) -> None:
    """`handler`, stamping the context fields, as the root logger's only handler."""
    handler.addFilter(_ContextFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)


class _ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in _CONTEXT.get().items():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key in CONTEXT_KEYS:
            value = getattr(record, key, None)
            if value not in (None, ""):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure(level: str = "INFO", *, fmt: str = "text", file: Path | None = None, max_bytes: int = 0,
              backup_count: int = 0) -> None:
    if file is not None:
        Path(file).parent.mkdir(parents=True, exist_ok=True)
        handler: logging.Handler = logging.handlers.RotatingFileHandler(
            file, maxBytes=max_bytes, backupCount=backup_count, encoding="utf-8")
    else:
        handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    _install(handler, level)
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("apscheduler").setLevel(logging.WARNING)  # it logs every tick at INFO
    # The completion tick (0.1 s) is skipped while the previous one still runs
    # (max_instances=1, on purpose): apscheduler warns each time, which under
    # load would fill the log with lines no one can act on.
    logging.getLogger("apscheduler.scheduler").setLevel(logging.ERROR)
