"""`carina backup create PATH` and `carina backup restore PATH`.

A backup is a directory:

    manifest.json        format, when, which database, the data_dir it came from, counts
    carina.db            SQLite: a consistent copy made with SQLite's online backup API
    database.dump        PostgreSQL: `pg_dump --format=custom`
    models/              the model registry (weights, sidecars, ACTIVE)
    config.yaml          the settings the node ran with (database password redacted)
    files/               every received instance (all revisions) and encoded output
                         the database copy refers to, by path relative to data_dir

`create` runs while the node runs: the database copy is one consistent
snapshot, and the files it lists are immutable once recorded (a changed
re-send goes beside the old file, outputs are rewritten only with identical
bytes), so copying them after the snapshot gives a consistent whole. A file
that retention purged in between is listed in the manifest as missing. The
backup is written to PATH.partial and renamed when complete.

`restore` needs a fresh data_dir (and, for PostgreSQL, a database without
Carina's tables). It copies everything back, rewrites the stored paths to the
new data_dir, hands jobs that were running at backup time back to the queue
(no attempt charged), and sets a new output UID salt: a study processed after
the restore (one the original node may already have processed after the
backup was taken) gets output UIDs the original node never issued, so the
PACS never sees one UID with two contents. FHIR resources keep their ids and
versions; the records of the restore are a `restored` node event.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import os
import secrets
import shutil
import sqlite3
import subprocess
from pathlib import Path

import yaml
from sqlalchemy import create_engine, func, inspect, literal, select, update
from sqlalchemy.engine import make_url

from node.config import Settings

log = logging.getLogger(__name__)

FORMAT = "carina-backup/1"


class BackupError(Exception):
    """The backup or restore cannot be done; the message says why."""


# --- create ---------------------------------------------------------------------------------


def create_backup(settings: Settings, target: Path, *, include_files: bool = True) -> dict:
    target = Path(target)
    if target.exists():
        raise BackupError(f"{target} exists; a backup is written to a new path")
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    data_dir = Path(settings.storage.data_dir).resolve()
    url = make_url(settings.database_url)
    manifest: dict = {
        "format": FORMAT,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(),
        "data_dir": str(data_dir),
        # As configured: paths in the database start with this when it was relative.
        "data_dir_configured": str(settings.storage.data_dir),
        "database": url.get_backend_name(),
    }
    if url.get_backend_name() == "sqlite":
        snapshot = partial / "carina.db"
        _sqlite_backup(Path(url.database), snapshot)
        paths = _referenced_paths(f"sqlite:///{snapshot}")
    else:
        _pg_dump(settings.database_url, partial / "database.dump")
        # The dump is one snapshot; listing paths afterwards can only add rows
        # committed since (harmless extra files) or miss purged ones (listed as missing).
        paths = _referenced_paths(settings.database_url)
    models = data_dir / "models"
    if models.is_dir():
        shutil.copytree(models, partial / "models", ignore=shutil.ignore_patterns(".staging"))
    (partial / "config.yaml").write_text(yaml.safe_dump(_redacted(settings), sort_keys=False))
    copied, missing = 0, []
    if include_files:
        for path in sorted(paths):
            relative = _relative(Path(path), data_dir)
            if relative is None:
                missing.append(path)  # outside data_dir: not Carina's to copy
                continue
            dst = partial / "files" / relative
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                shutil.copy2(path, dst)
                copied += 1
            except FileNotFoundError:
                missing.append(str(relative))
    manifest.update(files=copied, missing_files=missing, include_files=include_files)
    (partial / "manifest.json").write_text(json.dumps(manifest, indent=2))
    os.replace(partial, target)
    log.info("backup written to %s: %d files (%d missing)", target, copied, len(missing))
    return manifest


def _sqlite_backup(source: Path, snapshot: Path) -> None:
    if not source.exists():
        raise BackupError(f"no database at {source}")
    src = sqlite3.connect(f"file:{source}?mode=ro", uri=True, timeout=60)
    dst = sqlite3.connect(snapshot)
    try:
        src.backup(dst)  # all pages in one step: one consistent read snapshot (WAL lets writers go on)
    finally:
        dst.close()
        src.close()


def _libpq(url: str) -> tuple[str, list[str]]:
    """The libpq URI of a SQLAlchemy URL, and `-n SCHEMA` when its search_path names one."""
    u = make_url(url)
    options = u.query.get("options", "")
    schema = []
    if "search_path" in options:
        schema = ["-n", options.split("search_path=")[-1].split()[0].replace("%3D", "=")]
    plain = u.set(drivername="postgresql", query={})
    return plain.render_as_string(hide_password=False), schema


def _pg_dump(url: str, out: Path) -> None:
    uri, schema = _libpq(url)
    tool = shutil.which("pg_dump")
    if tool is None:
        raise BackupError("pg_dump is not installed (Debian: postgresql-client)")
    proc = subprocess.run([tool, "--format=custom", "--no-owner", "--no-privileges", *schema, f"--file={out}",
                           f"--dbname={uri}"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise BackupError(f"pg_dump failed: {proc.stderr.strip()}")


def _referenced_paths(url: str) -> set[str]:
    from node.db import Instance, InstanceRevision, Output

    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            paths = set(conn.scalars(select(Instance.path)))
            if inspect(conn).has_table(InstanceRevision.__tablename__):
                paths |= set(conn.scalars(select(InstanceRevision.path)))
            paths |= set(conn.scalars(select(Output.path)))
    finally:
        engine.dispose()
    return paths


def _relative(path: Path, root: Path) -> Path | None:
    try:
        return path.resolve().relative_to(root)
    except ValueError:
        return None


def _redacted(settings: Settings) -> dict:
    data = settings.model_dump(mode="json", warnings=False)  # severity_bands defaults are lists, typed as tuples
    if data["database"]["url"]:
        data["database"]["url"] = make_url(data["database"]["url"]).render_as_string(hide_password=True)
    return data


# --- restore --------------------------------------------------------------------------------


def restore_backup(settings: Settings, source: Path) -> dict:
    source = Path(source)
    try:
        manifest = json.loads((source / "manifest.json").read_text())
    except (OSError, ValueError) as exc:
        raise BackupError(f"{source} is not a Carina backup (no readable manifest.json)") from exc
    if manifest.get("format") != FORMAT:
        raise BackupError(f"unsupported backup format {manifest.get('format')!r}, expected {FORMAT!r}")
    data_dir = Path(settings.storage.data_dir).resolve()
    if data_dir.exists() and any(data_dir.iterdir()):
        raise BackupError(f"{data_dir} is not empty; restore into a fresh data directory")
    url = make_url(settings.database_url)
    if url.get_backend_name() != manifest["database"]:
        raise BackupError(f"the backup holds a {manifest['database']} database, the configuration names "
                          f"{url.get_backend_name()}")
    data_dir.mkdir(parents=True, exist_ok=True)
    if manifest["database"] == "sqlite":
        db_file = Path(url.database)
        if db_file.exists():
            raise BackupError(f"{db_file} exists; restore into a fresh database")
        db_file.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / "carina.db", db_file)
    else:
        _pg_restore(settings.database_url, source / "database.dump")
    if (source / "models").is_dir():
        shutil.copytree(source / "models", data_dir / "models")
    if (source / "files").is_dir():
        shutil.copytree(source / "files", data_dir, dirs_exist_ok=True)
    old_roots = {manifest["data_dir"], manifest.get("data_dir_configured", manifest["data_dir"])}
    salt = _reconcile(settings, sorted(old_roots, key=len, reverse=True), data_dir, manifest["created_at"])
    log.info("restored %s into %s (new output UID salt %s)", source, data_dir, salt)
    return {**manifest, "uid_salt": salt}


def _pg_restore(url: str, dump: Path) -> None:
    engine = create_engine(url)
    try:
        if inspect(engine).has_table("studies"):
            raise BackupError("the configured PostgreSQL database already has Carina's tables; restore into a fresh one")
    finally:
        engine.dispose()
    uri, _ = _libpq(url)
    tool = shutil.which("pg_restore")
    if tool is None:
        raise BackupError("pg_restore is not installed (Debian: postgresql-client)")
    proc = subprocess.run([tool, "--no-owner", "--no-privileges", "--exit-on-error", f"--dbname={uri}", str(dump)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise BackupError(f"pg_restore failed: {proc.stderr.strip()}")


def _reconcile(settings: Settings, old_roots: list[str], new_root: Path, created_at: str) -> str:
    """Make the restored database right for its new home; returns the new UID salt."""
    from node.db import (UID_SALT, Database, Instance, InstanceRevision, Job, Output, PurgeFile, server_now,
                         set_meta)
    from node.events import EventKind, record_event
    from node.states import JobState
    from node.sweep import LAST_SWEEP

    db = Database(settings.database_url)
    db.create_schema()  # a backup of an older version gains the newer tables and columns
    salt = secrets.token_hex(8)
    try:
        with db.session() as s:
            new = str(new_root)
            for model in (Instance, InstanceRevision, Output, PurgeFile):
                for old in old_roots:  # longest first: an absolute root before a relative one
                    prefix = old.rstrip("/") + "/"
                    s.execute(update(model).where(func.substr(model.path, 1, len(prefix)) == prefix).values(
                        path=literal(new + "/") + func.substr(model.path, len(prefix) + 1))
                        .execution_options(synchronize_session=False))
            # Jobs a worker held when the snapshot was taken: runnable now, the attempt not charged.
            s.execute(update(Job).where(Job.state == JobState.RUNNING).values(
                state=JobState.PENDING, run_after=server_now(s), lease_owner="", lease_until=0.0,
                attempts=Job.attempts - 1).execution_options(synchronize_session=False))
            set_meta(s, UID_SALT, salt)
            set_meta(s, LAST_SWEEP, "0")
            record_event(s, EventKind.RESTORED, detail=f"restored from a backup made {created_at}; "
                                                      f"output UIDs from now on use a new salt")
    finally:
        db.dispose()
    return salt

