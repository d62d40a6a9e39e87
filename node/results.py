"""Where scored studies are kept: one `Result` row per study version, holding
the `ScoredStudy` codec's JSON. The infer stage stores it; the encode and
deliver stages and the API read it back here, and nowhere else."""
from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from node.db import Result
from node.scored_study import ScoredStudy


def store(session: Session, study_id: int, scored: ScoredStudy) -> None:
    """Insert or (after a crash and a re-run of the same version) replace."""
    row = session.scalar(select(Result).where(Result.study_id == study_id, Result.version == scored.version))
    if row is None:
        row = Result(study_id=study_id, version=scored.version)
        session.add(row)
    row.model_name, row.model_version, row.demo = scored.model.name, scored.model.version, scored.model.demo
    row.scored_study = scored.to_json()


def load(session: Session, study_id: int, version: int) -> ScoredStudy:
    """The scored study of one version; LookupError when that version has none."""
    text = session.scalar(select(Result.scored_study).where(Result.study_id == study_id, Result.version == version))
    if text is None:
        raise LookupError(f"no scored study for study id {study_id} v{version}")
    return ScoredStudy.from_json(text)


def load_latest(session: Session, study_id: int) -> ScoredStudy | None:
    text = session.scalar(
        select(Result.scored_study).where(Result.study_id == study_id).order_by(Result.version.desc()).limit(1)
    )
    return None if text is None else ScoredStudy.from_json(text)


def load_before(session: Session, study_id: int, version: int) -> ScoredStudy | None:
    """The latest scored study of an earlier version (what an amended report supersedes), or None."""
    text = session.scalar(
        select(Result.scored_study).where(Result.study_id == study_id, Result.version < version)
        .order_by(Result.version.desc()).limit(1)
    )
    return None if text is None else ScoredStudy.from_json(text)


def latest_version(session: Session, study_id: int) -> int | None:
    """The newest version that has a scored study, or None."""
    return session.scalar(select(Result.version).where(Result.study_id == study_id)
                          .order_by(Result.version.desc()).limit(1))
