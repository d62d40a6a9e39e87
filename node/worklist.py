"""The reading app's worklist: which studies a radiologist sees, in which order.

Order: STAT (the persisted triage priority, node/triage.py) first, then newest
first (last instance received). Filters: state, priority and study date in
SQL; free text matches patient name, patient ID or accession number (every
word must match one of them); a positive finding is read from each study's
latest `ScoredStudy` (node/results.py), so that filter scans at most
`SCAN_LIMIT` studies in worklist order.

Patient name and study date come from the study row (read at receipt,
node/receiver.py) or, for rows made before those columns existed, from the
scored study's facts.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass

from sqlalchemy import and_, case, or_, select
from sqlalchemy.orm import Session

from inference.types import CHESTXRAY14
from node.db import Job, Result, Study, StudyTriage
from node.jobs import delivery_per_destination
from node.scored_study import ScoredStudy
from node.states import DELIVERY_STAGES, JobState, Priority, StudyState

SCAN_LIMIT = 2000  # studies examined at most for one worklist (the finding filter reads results)
PAGE = 200
MAX_QUERY = 64


class BadFilter(ValueError):
    """A filter value the worklist does not know; the message names it."""


@dataclass(frozen=True)
class Filters:
    state: str = ""
    finding: str = ""
    priority: str = ""
    date_from: str = ""  # YYYY-MM-DD, inclusive (the DICOM StudyDate)
    date_to: str = ""
    q: str = ""
    limit: int = 100

    @classmethod
    def parse(cls, params) -> "Filters":
        """From query parameters (a mapping); empty values mean "any"."""
        get = lambda key: (params.get(key) or "").strip()  # noqa: E731
        state, finding, priority, q = get("state"), get("finding"), get("priority"), get("q")
        if state and state not in set(StudyState):
            raise BadFilter(f"state must be one of {', '.join(StudyState)}")
        if finding and finding not in CHESTXRAY14:
            raise BadFilter(f"finding must be one of {', '.join(CHESTXRAY14)}")
        if priority and priority not in set(Priority):
            raise BadFilter(f"priority must be one of {', '.join(Priority)}")
        if len(q) > MAX_QUERY:
            raise BadFilter(f"search text is at most {MAX_QUERY} characters")
        dates = {}
        for key in ("date_from", "date_to"):
            value = get(key)
            if value:
                try:
                    dt.date.fromisoformat(value)
                except ValueError:
                    raise BadFilter(f"{key} must be a date, YYYY-MM-DD") from None
            dates[key] = value
        try:
            limit = max(1, min(500, int(get("limit") or 100)))
        except ValueError:
            raise BadFilter("limit must be a number") from None
        return cls(state, finding, priority, dates["date_from"], dates["date_to"], q, limit)

    @property
    def active(self) -> bool:
        return any((self.state, self.finding, self.priority, self.date_from, self.date_to, self.q))


@dataclass(frozen=True)
class Delivery:
    destination: str
    state: str  # a JobState


@dataclass(frozen=True)
class Row:
    study_id: int
    study_uid: str
    calling_ae: str
    patient_name: str  # DICOM PN (Family^Given)
    patient_id: str
    accession_number: str
    study_date: str  # YYYYMMDD or ""
    state: str
    reason: str
    priority: str  # a Priority, "" before the study was scored
    positives: tuple[str, ...]
    deliveries: tuple[Delivery, ...]
    received_at: float
    version: int

    @property
    def stat(self) -> bool:
        return self.priority == Priority.STAT

    @property
    def delivery_summary(self) -> str:
        """One word for the list: delivered, sending, failed (a dead letter) or none."""
        states = {d.state for d in self.deliveries}
        if not states:
            return "none"
        if JobState.DEAD in states:
            return "failed"
        if states == {JobState.DONE}:
            return "delivered"
        return "sending"


@dataclass(frozen=True)
class _Facts:
    """What the worklist needs from a scored study."""

    positives: tuple[str, ...]
    patient_name: str
    study_date: str


class _FactsCache:
    """Parsed facts by the SHA-1 of the stored JSON: a result is immutable per
    version, and polling clients would otherwise parse every study's JSON
    (heatmaps included) every few seconds."""

    def __init__(self, size: int = 1024):
        self.size = size
        self._items: OrderedDict[bytes, _Facts] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, text: str) -> _Facts:
        key = hashlib.sha1(text.encode()).digest()
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        scored = ScoredStudy.from_json(text)
        facts = _Facts(tuple(f.label for f in scored.positives), scored.facts.patient_name, scored.facts.study_date)
        with self._lock:
            self._items[key] = facts
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return facts


_cache = _FactsCache()


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _statement(filters: Filters):
    stat_first = case((StudyTriage.priority == Priority.STAT, 0), else_=1)
    stmt = (select(Study, StudyTriage.priority).outerjoin(StudyTriage, StudyTriage.study_id == Study.id)
            .order_by(stat_first, Study.last_received_at.desc(), Study.id.desc()))
    if filters.state:
        stmt = stmt.where(Study.state == filters.state)
    if filters.priority == Priority.STAT:
        stmt = stmt.where(StudyTriage.priority == Priority.STAT)
    elif filters.priority == Priority.ROUTINE:
        stmt = stmt.where(or_(StudyTriage.priority.is_(None), StudyTriage.priority != Priority.STAT))
    if filters.date_from:
        stmt = stmt.where(Study.study_date != "", Study.study_date >= filters.date_from.replace("-", ""))
    if filters.date_to:
        stmt = stmt.where(Study.study_date != "", Study.study_date <= filters.date_to.replace("-", ""))
    for word in filters.q.split():
        pattern = f"%{_escape_like(word)}%"
        stmt = stmt.where(or_(Study.patient_name.ilike(pattern, escape="\\"),
                              Study.patient_id.ilike(pattern, escape="\\"),
                              Study.accession_number.ilike(pattern, escape="\\")))
    return stmt


def _latest_results(session: Session, study_ids: list[int]) -> dict[int, str]:
    """study id -> its latest scored study's JSON."""
    latest: dict[int, tuple[int, str]] = {}
    rows = session.execute(select(Result.study_id, Result.version, Result.scored_study)
                           .where(Result.study_id.in_(study_ids)))
    for study_id, version, text in rows:
        if study_id not in latest or version > latest[study_id][0]:
            latest[study_id] = (version, text)
    return {study_id: text for study_id, (_, text) in latest.items()}


def _deliveries(session: Session, study_ids: list[int]) -> dict[int, tuple[Delivery, ...]]:
    """Each study's delivery per destination (node/jobs.py `delivery_per_destination`)."""
    by_study: dict[int, list] = {}
    rows = session.execute(select(Job.study_id, Job.stage, Job.destination, Job.study_version, Job.state)
                           .where(and_(Job.study_id.in_(study_ids), Job.stage.in_(DELIVERY_STAGES))))
    for row in rows:
        by_study.setdefault(row.study_id, []).append(row)
    return {study_id: tuple(Delivery(d, j.state) for d, j in delivery_per_destination(jobs).items())
            for study_id, jobs in by_study.items()}


def rows(session: Session, filters: Filters) -> list[Row]:
    out: list[Row] = []
    stmt = _statement(filters)
    for offset in range(0, SCAN_LIMIT, PAGE):
        page = session.execute(stmt.offset(offset).limit(PAGE)).all()
        if not page:
            break
        ids = [study.id for study, _ in page]
        texts = _latest_results(session, ids)
        deliveries = _deliveries(session, ids)
        for study, priority in page:
            facts = _cache.get(texts[study.id]) if study.id in texts else _Facts((), "", "")
            if filters.finding and filters.finding not in facts.positives:
                continue
            out.append(Row(
                study_id=study.id, study_uid=study.study_uid, calling_ae=study.calling_ae,
                patient_name=study.patient_name or facts.patient_name, patient_id=study.patient_id,
                accession_number=study.accession_number, study_date=study.study_date or facts.study_date,
                state=study.state, reason=study.reason, priority=priority or "", positives=facts.positives,
                deliveries=deliveries.get(study.id, ()), received_at=study.last_received_at, version=study.version,
            ))
            if len(out) >= filters.limit:
                return out
        if len(page) < PAGE:
            break
    return out


def person_name(pn: str) -> str:
    """A DICOM PN (Family^Given^Middle^Prefix^Suffix) as people write it: "FAMILY, Given Middle"."""
    parts = [p.strip() for p in pn.split("=")[0].split("^")]
    family, given = (parts + ["", ""])[:2]
    rest = " ".join(p for p in [given, *parts[2:3]] if p)
    return f"{family.upper()}, {rest}" if family and rest else (family.upper() or rest)


def display_date(value: str) -> str:
    """YYYYMMDD as YYYY-MM-DD; anything else as it is."""
    return f"{value[:4]}-{value[4:6]}-{value[6:]}" if len(value) == 8 and value.isdigit() else value
