"""Backup and restore on PostgreSQL: `pg_dump` of the node's schema, the schema
dropped (the disaster), `pg_restore` into a fresh data directory, and the
same rows, FHIR versions and files back, with a new output UID salt and the
job that was running handed back to the queue."""
from __future__ import annotations

import uuid

import pytest
from sqlalchemy import create_engine, select, text

from node.backup import BackupError, create_backup, restore_backup
from node.config import Settings
from node.db import UID_SALT, Database, FhirResource, Instance, Job, Study, get_meta
from node.fhir_store import save_resources
from node.jobs import claim, enqueue
from node.states import JobState
from peers import require_tool


def test_pg_dump_backup_restores_into_a_fresh_data_directory(postgres_url, tmp_path):
    require_tool("pg_dump")
    require_tool("pg_restore")
    schema = f"carina_bak_{uuid.uuid4().hex[:8]}"
    admin = create_engine(postgres_url)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    url = f"{postgres_url}?options=-csearch_path%3D{schema}"
    try:
        old = tmp_path / "old"
        settings = Settings(storage={"data_dir": str(old)}, database={"url": url})
        db = Database(url)
        db.create_schema()
        received = old / "instances" / "MOD" / "1.2.3" / "1.2.3.4.dcm"
        received.parent.mkdir(parents=True)
        received.write_bytes(b"DICM-ish bytes of a received instance")
        with db.session() as s:
            study = Study(calling_ae="MOD", study_uid="1.2.3", state="done", version=1)
            s.add(study)
            s.flush()
            s.add(Instance(study_id=study.id, sop_instance_uid="1.2.3.4", sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
                           path=str(received), sha256="ab" * 32))
            save_resources(s, [{"resourceType": "Device", "id": "dev-1", "status": "active"}], study.id)
            save_resources(s, [{"resourceType": "Device", "id": "dev-1", "status": "inactive"}], study.id)
            enqueue(s, study.id, "deliver", 1, destination="pacs")
        running = claim(db, "old-node", lease_seconds=600)
        assert running is not None
        db.dispose()

        backup = tmp_path / "backup"
        manifest = create_backup(settings, backup)
        assert manifest["database"] == "postgresql" and manifest["files"] == 1
        assert (backup / "database.dump").stat().st_size > 0
        with pytest.raises(BackupError):
            create_backup(settings, backup)  # never over an existing backup

        with admin.begin() as conn:  # the disaster: the schema is gone
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        new = tmp_path / "new"
        restored = restore_backup(Settings(storage={"data_dir": str(new)}, database={"url": url}), backup)
        assert restored["uid_salt"]
        db = Database(url)
        with db.session() as s:
            instance = s.scalar(select(Instance))
            assert instance.path == str(new / "instances" / "MOD" / "1.2.3" / "1.2.3.4.dcm")
            assert (new / "instances" / "MOD" / "1.2.3" / "1.2.3.4.dcm").read_bytes() == received.read_bytes()
            versions = s.execute(select(FhirResource.version_id, FhirResource.is_current)
                                 .order_by(FhirResource.version_id)).all()
            assert versions == [(1, False), (2, True)]
            job = s.scalar(select(Job))
            assert (job.state, job.attempts, job.lease_owner) == (JobState.PENDING, 0, "")
            assert get_meta(s, UID_SALT) == restored["uid_salt"]
        db.dispose()
        with pytest.raises(BackupError):  # the database is no longer fresh
            restore_backup(Settings(storage={"data_dir": str(tmp_path / "again")}, database={"url": url}), backup)
    finally:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin.dispose()
