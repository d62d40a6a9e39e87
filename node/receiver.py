"""Durable intake: what the SCP received becomes a file that survives a crash
and a committed row. Runs inside the C-STORE handler (the SCP's `accept`
callback), so it does one durable move and one short transaction, nothing else.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError, OperationalError

from dicom_scp.contexts import CHEST_CAPABLE_SOP_CLASSES
from dicom_scp.scp import OUT_OF_RESOURCES, ReceivedInstance, Refusal
from node.db import Database, Instance, Study, now
from node.routing import NOT_CHEST
from node.states import InstanceState, StudyState
from node.storage import free_mb, instance_path, move_durably

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Receiver:
    """The SCP's acceptor: refuse below the disk floor, else move durably, then record."""

    db: Database
    instances_dir: Path
    min_free_mb: float = 0

    def __call__(self, received: ReceivedInstance) -> None:
        if self.min_free_mb and free_mb(self.instances_dir) < self.min_free_mb:
            raise Refusal(OUT_OF_RESOURCES, "storage below configured free-space floor")
        final = instance_path(self.instances_dir, received.calling_ae, received.study_uid, received.sop_instance_uid)
        move_durably(received.temp_path, final)
        record_instance(self.db, received, final)


def record_instance(db: Database, received: ReceivedInstance, path: Path, attempts: int = 3) -> None:
    # Two associations may create the same study at once; the loser of the
    # unique-key race simply runs again and finds the winner's row.
    for attempt in range(1, attempts + 1):
        try:
            _record(db, received, path)
            return
        except (IntegrityError, OperationalError):
            if attempt == attempts:
                raise
            log.info("retrying record of %s after a concurrent write", received.sop_instance_uid)


def _record(db: Database, received: ReceivedInstance, path: Path) -> None:
    t = now()
    with db.session() as s:
        study = s.scalar(
            select(Study)
            .where(Study.calling_ae == received.calling_ae, Study.study_uid == received.study_uid)
            .with_for_update()
        )
        if study is None:
            study = Study(
                calling_ae=received.calling_ae,
                study_uid=received.study_uid,
                patient_id=received.patient_id[:64],
                accession_number=received.accession_number[:16],
                first_received_at=t,
            )
            s.add(study)
            s.flush()
        instance = s.scalar(
            select(Instance).where(Instance.study_id == study.id, Instance.sop_instance_uid == received.sop_instance_uid)
        )
        is_new = instance is None
        if is_new:
            instance = Instance(study_id=study.id, sop_instance_uid=received.sop_instance_uid)
            s.add(instance)
        chest = received.sop_class_uid in CHEST_CAPABLE_SOP_CLASSES
        instance.sop_class_uid = received.sop_class_uid
        instance.series_uid = received.series_uid[:64]  # informational; a malformed UID must not fail the commit
        instance.transfer_syntax_uid = received.transfer_syntax_uid
        instance.path = str(path)
        instance.size_bytes = received.size_bytes
        instance.received_at = t
        if is_new or study.state == StudyState.RECEIVED:
            instance.state = InstanceState.STORED if chest else InstanceState.IGNORED
            instance.reason = "" if chest else NOT_CHEST
        # else: a re-send of an instance whose study was already processed
        # (a modality retrying an unanswered C-STORE). It does not reopen the
        # study, so it keeps the outcome the pipeline recorded for it.

        study.last_received_at = t
        if study.state != StudyState.RECEIVED and is_new:
            # A late arrival: the study is processed again as a new version
            # once it is quiet; the pipeline supersedes the earlier results.
            log.info("study %s reopened by late instance %s", study.study_uid, received.sop_instance_uid)
            study.state = StudyState.RECEIVED
            study.reason = ""


def record_release(db: Database, calling_ae: str, study_uids: list[str]) -> None:
    """The sender closed an association that brought these studies."""
    with db.session() as s:
        for study in s.scalars(select(Study).where(Study.calling_ae == calling_ae, Study.study_uid.in_(study_uids))):
            study.released_at = now()
    log.info("association from %s released after %d study(ies)", calling_ae, len(study_uids))
