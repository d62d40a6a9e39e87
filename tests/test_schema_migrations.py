"""Schema migrations (node/schema.py, node/migrations/), on SQLite and PostgreSQL.

What README.md ("Schema migrations") claims:
- `carina db upgrade` on an empty database gives exactly the schema of the
  models in node/db.py (Alembic's autogenerate comparison finds no difference);
- a database made by `create_all` before Alembic (no alembic_version table) is
  recognised, brought to the baseline, stamped and upgraded, its rows kept;
- a node refuses to start on an unmigrated database (PostgreSQL) or on a schema
  a newer Carina made, with a message naming the command; a brand-new SQLite
  database is created by `carina serve` itself;
- upgrading twice, or from two processes at once, migrates once.
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import yaml
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import text

from node.db import Base, Database, Study
from node.schema import BASELINE, SchemaError, check, head, status, upgrade
from peers import free_port

REPO = Path(__file__).resolve().parent.parent


def schema_differences(db: Database) -> list:
    """What Alembic's autogenerate would add or change to make the database match the models."""
    with db.engine.connect() as conn:
        return compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)


def carina(workdir: Path, database_url: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """The `carina` command on a config whose database is `database_url` (given by environment, as in a container)."""
    config = workdir / "carina.yaml"
    if not config.exists():
        config.write_text(yaml.safe_dump({
            "storage": {"data_dir": str(workdir / "var"), "min_free_mb": 0},
            "dicom": {"host": "127.0.0.1", "port": free_port(), "accept_any_peer": True},
            "api": {"host": "127.0.0.1", "port": free_port()},
        }))
    env = dict(os.environ, CARINA_DATABASE__URL=database_url)
    return subprocess.run([sys.executable, "-m", "node.cli", *args, "--config", str(config)], capture_output=True,
                          text=True, cwd=workdir, env=env, timeout=timeout)


def test_upgrade_of_an_empty_database_gives_the_models_schema(empty_database_url, tmp_path):
    db = Database(empty_database_url)
    try:
        assert status(db).state == "empty"
        proc = carina(tmp_path, empty_database_url, "db", "upgrade")
        assert proc.returncode == 0, proc.stderr
        assert f"to revision {head()}" in proc.stdout
        assert status(db).state == "current"
        assert schema_differences(db) == []
        again = carina(tmp_path, empty_database_url, "db", "upgrade")
        assert again.returncode == 0 and "already current" in again.stdout, again.stdout + again.stderr
        assert carina(tmp_path, empty_database_url, "db", "status").returncode == 0
    finally:
        db.dispose()


def test_a_database_made_before_alembic_is_stamped_and_upgraded(empty_database_url, tmp_path):
    """As an old node left it: create_all of that day's models, i.e. without the
    tables and server-default columns added since (study_triage, instances.sha256)."""
    db = Database(empty_database_url)
    try:
        Base.metadata.create_all(db.engine, tables=[t for t in Base.metadata.sorted_tables if t.name != "study_triage"])
        with db.engine.begin() as conn:
            conn.execute(text("ALTER TABLE instances DROP COLUMN sha256"))
        with db.session() as s:
            s.add(Study(calling_ae="MODALITY", study_uid="1.2.3.4", patient_id="P1"))
        assert status(db).state == "legacy"
        assert schema_differences(db) != []  # really older than the models

        refused = carina(tmp_path, empty_database_url, "serve", "--role", "worker", timeout=180)
        assert refused.returncode == 2
        assert "carina db upgrade" in refused.stderr and "before schema migrations" in refused.stderr

        proc = carina(tmp_path, empty_database_url, "db", "upgrade")
        assert proc.returncode == 0, proc.stderr
        assert "stamped at the baseline" in proc.stdout
        assert status(db).state == "current"
        assert schema_differences(db) == []
        with db.session() as s:
            study = s.query(Study).one()
            assert (study.study_uid, study.patient_id) == ("1.2.3.4", "P1")
    finally:
        db.dispose()


def test_a_newer_schema_is_refused_by_serve_and_by_upgrade(empty_database_url, tmp_path):
    db = Database(empty_database_url)
    try:
        upgrade(db)
        with db.engine.begin() as conn:  # as a future Carina would leave it
            conn.execute(text("UPDATE alembic_version SET version_num = '9999_from_the_future'"))
        found = status(db)
        assert found.state == "newer" and found.current == "9999_from_the_future"
        for call in (check, upgrade, Database.create_schema):
            try:
                call(db)
            except SchemaError as exc:
                assert "newer Carina" in str(exc)
            else:
                raise AssertionError(f"{call.__name__} accepted a newer schema")

        served = carina(tmp_path, empty_database_url, "serve", timeout=180)
        assert served.returncode == 2
        assert "9999_from_the_future" in served.stderr and "newer Carina" in served.stderr
        upgraded = carina(tmp_path, empty_database_url, "db", "upgrade")
        assert upgraded.returncode == 2 and "newer Carina" in upgraded.stderr
        assert carina(tmp_path, empty_database_url, "db", "status").returncode == 1
    finally:
        db.dispose()


def test_an_unmigrated_postgresql_database_is_refused_naming_the_command(postgres_url, tmp_path):
    """PostgreSQL is migrated by the operator (`carina db upgrade`), never by a starting node."""
    from conftest import postgres_schema

    url, drop = postgres_schema(postgres_url)
    try:
        for role in ("all", "receiver", "worker", "api"):
            proc = carina(tmp_path, url, "serve", "--role", role, timeout=180)
            assert proc.returncode == 2, (role, proc.stderr)
            assert "run `carina db upgrade`" in proc.stderr, (role, proc.stderr)
        db = Database(url)
        try:
            assert status(db).state == "empty"  # the refusals created nothing
        finally:
            db.dispose()
    finally:
        drop()


def test_an_empty_sqlite_database_is_created_by_the_node_itself(tmp_path):
    """The embedded default: a fresh machine runs `carina serve` with no other step."""
    db = Database(f"sqlite:///{tmp_path / 'carina.db'}")
    try:
        assert check(db).state == "current"
        assert schema_differences(db) == []
    finally:
        db.dispose()


def test_concurrent_upgrades_migrate_once(empty_database_url):
    """Several nodes or jobs may run `carina db upgrade` at the same moment."""
    dbs = [Database(empty_database_url) for _ in range(4)]
    results, errors = [], []

    def run(db):
        try:
            results.append(upgrade(db))
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(db,)) for db in dbs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    try:
        assert errors == []
        assert sorted(before.state for before, _ in results) == ["current", "current", "current", "empty"]
        assert all(after.state == "current" for _, after in results)
        with dbs[0].engine.connect() as conn:
            assert conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all() == [head()]
    finally:
        for db in dbs:
            db.dispose()


def test_the_baseline_is_the_first_revision():
    from node.schema import script

    base = script().get_revision(BASELINE)
    assert base.down_revision is None
    assert script().get_bases() == [BASELINE]
