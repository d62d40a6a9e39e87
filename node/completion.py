"""Study completion: a study is complete once no instance of it has arrived
for `dicom.stable_seconds`. DICOM has no "end of study" message, so quiet time
is the only signal that works with every PACS and modality.

With `dicom.complete_on_release` (off by default), a study is also complete
as soon as the association that brought its last instance is released (the
receiver's `released_at` is then at or after its `last_received_at`): for
senders that push a whole study in one association, the stability window is
not waited for. A study still receiving on another association is not
released that way (its last instance came after the release) and completes
when quiet, as always."""
from __future__ import annotations

import logging

from sqlalchemy import and_, func, or_, select

from node.db import Database, Instance, Study, server_now
from node.jobs import enqueue
from node.states import SCOREABLE_INSTANCE_STATES, Stage, StudyState

log = logging.getLogger(__name__)


def complete_quiet_studies(db: Database, stable_seconds: float, *, at: float | None = None, limit: int = 100,
                           on_release: bool = False) -> list[int]:
    """Move quiet studies (and, with `on_release`, released ones) to
    processing (queueing inference) or ignored.

    Quiet is measured on `server_now` (the database server's clock on
    PostgreSQL), the clock the receiver stamped `last_received_at` with."""
    completed: list[int] = []
    with db.session() as s:
        t = server_now(s)
        cutoff = (t if at is None else at) - stable_seconds
        ready = Study.last_received_at <= cutoff
        if on_release:
            ready = or_(ready, and_(Study.released_at.is_not(None), Study.released_at >= Study.last_received_at))
        studies = s.scalars(
            select(Study)
            .where(Study.state == StudyState.RECEIVED, ready)
            .order_by(Study.last_received_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
        ).all()
        for study in studies:
            scoreable = s.scalar(
                select(func.count()).select_from(Instance).where(Instance.study_id == study.id, Instance.state.in_(SCOREABLE_INSTANCE_STATES))
            )
            study.version += 1
            study.completed_at = t
            if scoreable:
                study.state = StudyState.PROCESSING
                enqueue(s, study.id, Stage.INFER, study.version)
                log.info("study %s complete (version %d): queued for inference", study.study_uid, study.version)
            else:
                study.state = StudyState.IGNORED
                study.reason = "no chest radiograph in study"
                log.info("study %s complete: ignored (no chest radiograph)", study.study_uid)
            completed.append(study.id)
    return completed
