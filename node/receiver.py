"""Durable intake: what the SCP received becomes a file that survives a crash
and a committed row. Runs inside the C-STORE handler (the SCP's `accept`
callback), so it hashes the file it was handed, does at most one durable
placement and one short transaction, nothing else.

Every instance is hashed (SHA-256) while it is still the temp file, which the
kernel has just written and still caches (measured by bench/receive_hash.py):

- the same bytes again under a known SOP Instance UID: acknowledged, and
  nothing else happens (no file, no row, no reopened study);
- different bytes under a known SOP Instance UID: the new file is kept beside
  the old one (node/storage.py `place_instance` never overwrites), the
  instance gets a new revision, the study reopens as a new version (amended
  outputs) and a `changed_content` event is recorded;
- a new SOP Instance UID: stored and recorded as before.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.exc import IntegrityError, OperationalError

from dicom_scp.contexts import CHEST_CAPABLE_SOP_CLASSES
from dicom_scp.scp import OUT_OF_RESOURCES, ReceivedInstance, Refusal
from node.db import Database, Instance, InstanceRevision, Study, server_now
from node.events import EventKind, record_event
from node.routing import NOT_CHEST
from node.states import InstanceState, StudyState
from node.storage import free_mb, instance_path, place_instance, sha256_file

if TYPE_CHECKING:
    from node.metrics import Metrics

log = logging.getLogger(__name__)


class Outcome:
    NEW = "new"
    DUPLICATE = "duplicate"
    CHANGED = "changed"


@dataclass(frozen=True)
class Receiver:
    """The SCP's acceptor: refuse below the disk floor, else hash, place durably, then record."""

    db: Database
    instances_dir: Path
    min_free_mb: float = 0
    metrics: "Metrics | None" = None

    def __call__(self, received: ReceivedInstance) -> None:
        if self.min_free_mb and free_mb(self.instances_dir) < self.min_free_mb:
            raise Refusal(OUT_OF_RESOURCES, "storage below configured free-space floor", "disk_floor")
        digest = sha256_file(received.temp_path)
        if known_content(self.db, received) == digest:
            # Same bytes again (a modality retrying an unanswered C-STORE):
            # acknowledged, nothing else. The temp file is pynetdicom's to drop.
            self._count(Outcome.DUPLICATE, received)
            return
        base = instance_path(self.instances_dir, received.calling_ae, received.study_uid, received.sop_instance_uid)
        final = place_instance(received.temp_path, base, digest)
        self._count(record_instance(self.db, received, final, digest), received)

    def _count(self, outcome: str, received: ReceivedInstance) -> None:
        if self.metrics is not None:
            self.metrics.instances_received.labels(outcome).inc()
            if outcome != Outcome.DUPLICATE:
                self.metrics.received_bytes.inc(received.size_bytes)


# The receiver's statements, built once with bound parameters: building a
# statement's expression objects cost more of the C-STORE handler's time (and
# so of the GIL it shares with every other association) than running it
# (py-spy, bench/ingest.py). SQLAlchemy caches their compiled SQL either way.
_KNOWN_CONTENT = select(Instance.sha256).join(Study, Study.id == Instance.study_id).where(
    Study.calling_ae == bindparam("calling_ae"), Study.study_uid == bindparam("study_uid"),
    Instance.sop_instance_uid == bindparam("sop_instance_uid"))
_STUDY_ROW_FOR_UPDATE = select(Study.id, Study.state, Study.study_uid).where(
    Study.calling_ae == bindparam("calling_ae"), Study.study_uid == bindparam("study_uid")).with_for_update()
_INSTANCE_ID_OF_STUDY = select(Instance.id).where(
    Instance.study_id == bindparam("study_id"), Instance.sop_instance_uid == bindparam("sop_instance_uid"))
_INSERT_INSTANCE = insert(Instance)
_INSERT_REVISION = insert(InstanceRevision)
_TOUCH_STUDY = update(Study).where(Study.id == bindparam("target_id"))


def known_content(db: Database, received: ReceivedInstance) -> str | None:
    """SHA-256 of what is stored under this (caller, study, SOP Instance UID), if anything."""
    with db.session() as s:  # a plain row: no ORM entity to build
        return s.connection().execute(_KNOWN_CONTENT, {
            "calling_ae": received.calling_ae, "study_uid": received.study_uid,
            "sop_instance_uid": received.sop_instance_uid}).scalar() or None


def record_instance(db: Database, received: ReceivedInstance, path: Path, sha256: str = "", attempts: int = 3) -> str:
    """Commit the row of an instance placed at `path`; returns its Outcome."""
    # Two associations may create the same study at once; the loser of the
    # unique-key race simply runs again and finds the winner's row.
    for attempt in range(1, attempts + 1):
        try:
            return _record(db, received, path, sha256)
        except (IntegrityError, OperationalError):
            if attempt == attempts:
                raise
            log.info("retrying record of %s after a concurrent write", received.sop_instance_uid)
    raise AssertionError("unreachable")


def _record(db: Database, received: ReceivedInstance, path: Path, sha256: str) -> str:
    with db.session() as s:
        t = server_now(s)
        # Nearly every instance is a new one of a study already here: that case
        # is written as plain rows, without the ORM's objects and unit of work
        # (a third of the handler's GIL time when it went through them). A new
        # study, a re-sent or changed instance take the ORM path below, in the
        # same transaction.
        conn = s.connection()
        known = conn.execute(_STUDY_ROW_FOR_UPDATE, {"calling_ae": received.calling_ae,
                                                     "study_uid": received.study_uid}).first()
        instance_id = None
        if known is not None:
            instance_id = conn.execute(_INSTANCE_ID_OF_STUDY, {
                "study_id": known.id, "sop_instance_uid": received.sop_instance_uid}).scalar()
            if instance_id is None:
                return _insert_new(conn, known, received, path, sha256, t)
        # The rows found above, as ORM objects (the study's row is locked already).
        study = s.get(Study, known.id) if known is not None else None
        if study is None:
            study = Study(
                calling_ae=received.calling_ae,
                study_uid=received.study_uid,
                patient_id=received.patient_id[:64],
                accession_number=received.accession_number[:16],
                first_received_at=t,
                **worklist_fields(path),
                last_received_at=t,
            )
            s.add(study)
            s.flush()
        instance = s.get(Instance, instance_id) if instance_id is not None else None
        chest = received.sop_class_uid in CHEST_CAPABLE_SOP_CLASSES
        if instance is None:
            instance = Instance(study_id=study.id, sop_instance_uid=received.sop_instance_uid, revision=1)
            s.add(instance)
            _describe(instance, received, path, sha256, t, chest)
            s.flush()
            s.add(InstanceRevision(instance_id=instance.id, revision=1, sha256=sha256, path=str(path),
                                   size_bytes=received.size_bytes, received_at=t))
            outcome = Outcome.NEW
        else:
            current = instance.sha256 or _legacy_hash(instance)
            if not sha256 or not current or current == sha256:
                # The same content again (or a caller that did not hash): the
                # instance keeps the outcome the pipeline recorded for it.
                return Outcome.DUPLICATE
            outcome = _changed(s, study, instance, received, path, sha256, t, chest)
        study.last_received_at = t
        if study.state != StudyState.RECEIVED:
            # A late or changed instance: the study is processed again as a new
            # version once it is quiet; the pipeline supersedes earlier results.
            log.info("study %s reopened by %s instance %s", study.study_uid, outcome, received.sop_instance_uid)
            study.state = StudyState.RECEIVED
            study.reason = ""
        return outcome


def worklist_fields(path: Path) -> dict[str, str]:
    """PatientName and StudyDate of a new study's first instance, for the
    reading app's worklist. Best effort: an unreadable or odd value gives ""
    and never fails the C-STORE (the SCP has already vetted the header)."""
    from inference.dicom_file import read_header

    try:
        header = read_header(path, ["PatientName", "StudyDate"])
        name = str(header.get("PatientName", "") or "").strip()
        date = str(header.get("StudyDate", "") or "").strip()
    except Exception:
        return {}
    return {"patient_name": name[:255], "study_date": date if len(date) == 8 and date.isdigit() else ""}


def _insert_new(conn, known, received: ReceivedInstance, path: Path, sha256: str, t: float) -> str:
    """A new instance of a study already here (`known`: its id, state and UID),
    as `_record`'s ORM path would write it: the instance, its first revision,
    and the study touched (reopened if it had been processed)."""
    chest = received.sop_class_uid in CHEST_CAPABLE_SOP_CLASSES
    instance_id = conn.execute(_INSERT_INSTANCE, {
        "study_id": known.id, "sop_instance_uid": received.sop_instance_uid, "revision": 1,
        **_description(received, path, sha256, t, chest)}).inserted_primary_key[0]
    conn.execute(_INSERT_REVISION, {"instance_id": instance_id, "revision": 1, "sha256": sha256, "path": str(path),
                                    "size_bytes": received.size_bytes, "received_at": t})
    touched = {"target_id": known.id, "last_received_at": t}
    if known.state != StudyState.RECEIVED:
        log.info("study %s reopened by %s instance %s", known.study_uid, Outcome.NEW, received.sop_instance_uid)
        touched.update(state=StudyState.RECEIVED, reason="")
    conn.execute(_TOUCH_STUDY, touched)
    return Outcome.NEW


def _description(received: ReceivedInstance, path: Path, sha256: str, t: float, chest: bool) -> dict:
    """An instance row's columns that describe its current content."""
    return {
        "sop_class_uid": received.sop_class_uid,
        "series_uid": received.series_uid[:64],  # informational; a malformed UID must not fail the commit
        "transfer_syntax_uid": received.transfer_syntax_uid,
        "path": str(path),
        "size_bytes": received.size_bytes,
        "received_at": t,
        "sha256": sha256,
        "state": InstanceState.STORED if chest else InstanceState.IGNORED,
        "reason": "" if chest else NOT_CHEST,
    }


def _describe(instance: Instance, received: ReceivedInstance, path: Path, sha256: str, t: float, chest: bool) -> None:
    for column, value in _description(received, path, sha256, t, chest).items():
        setattr(instance, column, value)


def _changed(s, study: Study, instance: Instance, received: ReceivedInstance, path: Path, sha256: str, t: float,
             chest: bool) -> str:
    """New bytes under a known SOP Instance UID: a new revision beside the old."""
    has_revisions = s.scalar(select(InstanceRevision.id).where(InstanceRevision.instance_id == instance.id).limit(1))
    if has_revisions is None:  # a row from before revisions were kept: remember its file too
        s.add(InstanceRevision(instance_id=instance.id, revision=instance.revision, sha256=instance.sha256 or "",
                               path=instance.path, size_bytes=instance.size_bytes, received_at=instance.received_at))
    previous = (instance.revision, instance.sha256)
    instance.revision += 1
    _describe(instance, received, path, sha256, t, chest)
    s.add(InstanceRevision(instance_id=instance.id, revision=instance.revision, sha256=sha256, path=str(path),
                           size_bytes=received.size_bytes, received_at=t))
    record_event(s, EventKind.CHANGED_CONTENT, study=study, sop_instance_uid=received.sop_instance_uid,
                 detail=f"revision {previous[0]} (sha256 {previous[1][:16] or 'unknown'}) replaced by revision "
                        f"{instance.revision} (sha256 {sha256[:16]}); both files kept; study reopened")
    return Outcome.CHANGED


def _legacy_hash(instance: Instance) -> str:
    """A row written before hashing existed: hash its file once, now."""
    try:
        instance.sha256 = sha256_file(Path(instance.path))
    except OSError:
        return ""
    return instance.sha256


def record_release(db: Database, calling_ae: str, study_uids: list[str]) -> None:
    """The sender closed an association that brought these studies."""
    with db.session() as s:
        t = server_now(s)
        for study in s.scalars(select(Study).where(Study.calling_ae == calling_ae, Study.study_uid.in_(study_uids))):
            study.released_at = t
    log.info("association from %s released after %d study(ies)", calling_ae, len(study_uids))
