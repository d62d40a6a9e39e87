"""Versioned storage of the FHIR resources Carina serves.

Every version of every resource is a row of `FhirResource`; exactly one row per
(type, id) is current. Search values are copied out of the JSON at write time
into `FhirSearchIndex` (one row per value: every identifier, coding, reference
and date range), so every search parameter is a plain indexed EXISTS on SQLite
and PostgreSQL alike; the sort key (clinical date) stays a column.
"""
from __future__ import annotations

import copy
import datetime as dt
import json
import re
from dataclasses import dataclass
from typing import Iterable

from sqlalchemy import ColumnElement, and_, exists, false, func, insert, not_, or_, select
from sqlalchemy.orm import Session

from node.db import FhirResource, FhirSearchIndex, now

# Search prefixes FHIR defines for dates (see `_range_comparison`).
DATE_PREFIXES = ("eq", "ne", "gt", "lt", "ge", "le", "sa", "eb")


def save_resources(session: Session, resources: list[dict], study_id: int | None) -> None:
    """Write a new version of each resource whose content changed.

    Content means everything except meta.versionId/meta.lastUpdated, so a
    re-run that produces identical JSON leaves the version alone. The previous
    version stays readable (vread) but stops being current.
    """
    for resource in resources:
        rtype, rid = resource["resourceType"], resource["id"]
        previous = session.scalars(
            select(FhirResource)
            .where(FhirResource.resource_type == rtype, FhirResource.resource_id == rid, FhirResource.is_current)
            .with_for_update()  # PostgreSQL: serialise two writers of one resource; SQLite locks anyway
        ).first()
        if previous is not None and _content(json.loads(previous.body)) == _content(resource):
            continue
        version_id = previous.version_id + 1 if previous is not None else 1
        if previous is not None:
            previous.is_current = False
            session.flush()  # one current row at any time, even mid-transaction
        stamp = now()
        body = with_meta(resource, version_id, stamp)
        row = FhirResource(
            resource_type=rtype,
            resource_id=rid,
            version_id=version_id,
            is_current=True,
            last_updated=stamp,
            study_id=study_id,
            body=json.dumps(body, ensure_ascii=False, separators=(",", ":")),
            **search_columns(body),
        )
        session.add(row)
        session.flush()  # the row id keys its index entries
        _write_index(session, row, body)
    session.flush()


def _write_index(session: Session, row: FhirResource, body: dict) -> None:
    # One bulk INSERT, not an ORM object per value: a study's ~15 resources have
    # ~150 values, and the unit of work flushing them one by one was most of
    # the encode stage's database time (issue 12).
    entries = [{"resource_row_id": row.id, "system": "", "value": "", "low": None, "high": None, **entry}
               for entry in index_entries(body)]
    if entries:
        session.execute(insert(FhirSearchIndex), entries)


def reindex_missing(session: Session) -> int:
    """Index current resources written before the search index existed; returns how many."""
    has_index = exists().where(FhirSearchIndex.resource_row_id == FhirResource.id)
    rows = session.scalars(select(FhirResource).where(FhirResource.is_current, not_(has_index))).all()
    for row in rows:
        _write_index(session, row, json.loads(row.body))
    session.flush()
    return len(rows)


def index_entries(resource: dict) -> list[dict]:
    """The search index rows of one resource: what each search parameter matches.

    Reference values are stored as `Type/id` (relative, as Carina writes
    them); token values keep their system. Dates are [low, high) ranges."""
    entries: list[dict] = []

    def token(param: str, system: str | None, value: str | None) -> None:
        if value:
            entries.append({"param": param, "system": (system or "")[:255], "value": str(value)[:255]})

    def coded(param: str, concept: dict | None) -> None:
        for coding in (concept or {}).get("coding", []):
            token(param, coding.get("system"), coding.get("code"))

    def when(param: str, text: str | None) -> None:
        if text:
            low, high = time_range(text)
            entries.append({"param": param, "system": "", "value": "", "low": low, "high": high})

    for identifier in resource.get("identifier") or []:
        token("identifier", identifier.get("system"), identifier.get("value"))
    rtype = resource.get("resourceType")
    if rtype in ("DiagnosticReport", "Observation"):
        subject = resource.get("subject") or {}
        token("subject", "", subject.get("reference"))
        ident = subject.get("identifier") or {}
        token("subject:identifier", ident.get("system"), ident.get("value"))
        token("status", "", resource.get("status"))
        for category in resource.get("category") or []:
            coded("category", category)
        coded("code", resource.get("code"))
        when("date", resource.get("effectiveDateTime"))
        when("issued", resource.get("issued"))
    if rtype == "DiagnosticReport":
        for based_on in resource.get("basedOn") or []:
            ident = based_on.get("identifier") or {}
            token("based-on:identifier", ident.get("system"), ident.get("value"))
            token("based-on", "", based_on.get("reference"))
    if rtype == "Provenance":
        for target in resource.get("target") or []:
            token("target", "", target.get("reference"))
    return entries


def with_meta(resource: dict, version_id: int, last_updated: float) -> dict:
    body = copy.deepcopy(resource)
    meta = {"versionId": str(version_id), "lastUpdated": instant(last_updated)}
    meta.update({k: v for k, v in body.get("meta", {}).items() if k not in meta})
    body["meta"] = meta
    # resourceType and id first: people read these files.
    return {"resourceType": body.pop("resourceType"), "id": body.pop("id"), "meta": body.pop("meta"), **body}


def _content(resource: dict) -> dict:
    body = copy.deepcopy(resource)
    meta = body.get("meta", {})
    meta.pop("versionId", None)
    meta.pop("lastUpdated", None)
    if not meta:
        body.pop("meta", None)
    return body


def search_columns(resource: dict) -> dict:
    """The denormalised search columns of one resource."""
    subject = (resource.get("subject") or {}).get("identifier") or {}
    identifiers = resource.get("identifier") or []
    first_id = identifiers[0] if identifiers else {}
    when = resource.get("effectiveDateTime") or resource.get("started") or (resource.get("effectivePeriod") or {}).get("start")
    start, end = time_range(when) if when else (None, None)
    return {
        "patient_system": subject.get("system", ""),
        "patient_value": subject.get("value", ""),
        "identifier_system": first_id.get("system", ""),
        "identifier_value": first_id.get("value", ""),
        "status": resource.get("status", ""),
        "effective_at": start,
        "effective_end": end,
    }


# --- reading -----------------------------------------------------------------

def read_current(session: Session, resource_type: str, resource_id: str) -> FhirResource | None:
    return session.scalars(
        select(FhirResource).where(
            FhirResource.resource_type == resource_type,
            FhirResource.resource_id == resource_id,
            FhirResource.is_current,
        )
    ).first()


def read_version(session: Session, resource_type: str, resource_id: str, version_id: int) -> FhirResource | None:
    return session.scalars(
        select(FhirResource).where(
            FhirResource.resource_type == resource_type,
            FhirResource.resource_id == resource_id,
            FhirResource.version_id == version_id,
        )
    ).first()


def read_current_many(session: Session, resource_type: str, resource_ids: Iterable[str]) -> list[FhirResource]:
    ids = list(dict.fromkeys(resource_ids))
    if not ids:
        return []
    rows = session.scalars(
        select(FhirResource).where(
            FhirResource.resource_type == resource_type,
            FhirResource.resource_id.in_(ids),
            FhirResource.is_current,
        )
    ).all()
    order = {rid: i for i, rid in enumerate(ids)}
    return sorted(rows, key=lambda row: order[row.resource_id])


def study_resources(session: Session, study_id: int) -> list[dict]:
    """The current resources of one study's report (what its bundle holds): every
    current row written for the study, plus the shared ones they reference
    (Patient, Device) which an earlier study may have written first."""
    rows = session.scalars(select(FhirResource).where(FhirResource.study_id == study_id, FhirResource.is_current)
                           .order_by(FhirResource.id)).all()
    bodies = {(r.resource_type, r.resource_id): json.loads(r.body) for r in rows}
    for body in list(bodies.values()):
        for reference in _references(body):
            rtype, _, rid = reference.partition("/")
            if (rtype, rid) not in bodies and rid and "/" not in rid:
                row = read_current(session, rtype, rid)
                if row is not None:
                    bodies[(rtype, rid)] = json.loads(row.body)
    return list(bodies.values())


def _references(value) -> list[str]:
    if isinstance(value, dict):
        found = [value["reference"]] if isinstance(value.get("reference"), str) else []
        return found + [r for v in value.values() for r in _references(v)]
    if isinstance(value, list):
        return [r for v in value for r in _references(v)]
    return []


# --- searching ---------------------------------------------------------------

@dataclass(frozen=True)
class Token:
    """A token search value: `system|value`, `value` (any system) or `|value` (no system)."""

    system: str | None
    value: str

    @classmethod
    def parse(cls, text: str) -> "Token":
        if "|" not in text:
            return cls(None, text)
        system, _, value = text.partition("|")
        return cls(system, value)


def _indexed(param: str, *conditions) -> ColumnElement[bool]:
    return exists().where(
        FhirSearchIndex.resource_row_id == FhirResource.id, FhirSearchIndex.param == param, *conditions
    )


def indexed_token_clause(param: str, tokens: list[Token]) -> ColumnElement[bool]:
    """OR over `tokens` against the index rows of `param` (system-aware)."""
    options = []
    for token in tokens:
        clause = FhirSearchIndex.value == token.value
        if token.system is not None:
            clause = and_(clause, FhirSearchIndex.system == token.system)
        options.append(clause)
    return _indexed(param, or_(*options)) if options else false()


def indexed_value_clause(param: str, values: list[str]) -> ColumnElement[bool]:
    """OR over exact values (references `Type/id`, status codes) of `param`."""
    return _indexed(param, FhirSearchIndex.value.in_(values)) if values else false()


def _range_comparison(lo, hi, prefix: str, start: float, end: float) -> ColumnElement[bool]:
    """FHIR date comparison of a stored range [lo, hi) with the parameter's [start, end)."""
    return {
        "eq": and_(lo >= start, hi <= end),
        "ne": or_(lo < start, hi > end),
        "gt": hi > end,
        "lt": lo < start,
        "ge": hi > start,
        "le": lo < end,
        "sa": lo >= end,
        "eb": hi <= start,
    }[prefix]


def indexed_date_clause(param: str, prefix: str, start: float, end: float) -> ColumnElement[bool]:
    lo, hi = FhirSearchIndex.low, FhirSearchIndex.high
    return _indexed(param, lo.is_not(None), _range_comparison(lo, hi, prefix, start, end))


# meta.lastUpdated is stored in milliseconds: it covers one millisecond.
_MILLI = 0.001


def last_updated_clause(prefix: str, start: float, end: float) -> ColumnElement[bool]:
    lo = FhirResource.last_updated
    return _range_comparison(lo, lo + _MILLI, prefix, start, end)


def history(session: Session, resource_type: str, resource_id: str) -> list[FhirResource]:
    """Every version of one resource, newest first (FHIR _history order)."""
    return list(session.scalars(
        select(FhirResource)
        .where(FhirResource.resource_type == resource_type, FhirResource.resource_id == resource_id)
        .order_by(FhirResource.version_id.desc())
    ).all())


def current_referencing(session: Session, resource_type: str, param: str, references: list[str]) -> list[FhirResource]:
    """Current resources of `resource_type` whose `param` references any of `references` (_revinclude)."""
    if not references:
        return []
    return list(session.scalars(
        select(FhirResource)
        .where(
            FhirResource.resource_type == resource_type,
            FhirResource.is_current,
            indexed_value_clause(param, references),
        )
        .order_by(FhirResource.resource_id)
    ).all())


def search(
    session: Session, resource_type: str, clauses: list[ColumnElement[bool]], *, offset: int, count: int
) -> tuple[int, list[FhirResource]]:
    """(total matches, one page of current rows), newest clinical date first."""
    where = and_(FhirResource.resource_type == resource_type, FhirResource.is_current, *clauses)
    total = session.scalar(select(func.count()).select_from(FhirResource).where(where)) or 0
    if count == 0:
        return total, []
    rows = session.scalars(
        select(FhirResource)
        .where(where)
        # NULL dates last on both SQLite and PostgreSQL; id makes pages stable.
        .order_by(FhirResource.effective_at.is_(None), FhirResource.effective_at.desc(), FhirResource.resource_id)
        .offset(offset)
        .limit(count)
    ).all()
    return total, list(rows)


# --- time --------------------------------------------------------------------

_FHIR_TIME = re.compile(
    r"^(?P<y>\d{4})(?:-(?P<m>\d{2})(?:-(?P<d>\d{2})"
    r"(?:T(?P<H>\d{2}):(?P<M>\d{2})(?::(?P<S>\d{2})(?:\.(?P<f>\d+))?)?(?P<tz>Z|[+-]\d{2}:\d{2})?)?)?)?$"
)


def time_range(text: str) -> tuple[float, float]:
    """[start, end) in epoch seconds of a FHIR date/dateTime/instant at its precision.

    Values without an offset are taken in the node's local time zone, the same
    zone the builders use for DICOM's offset-less times.
    """
    match = _FHIR_TIME.match(text.strip())
    if not match:
        raise ValueError(f"not a FHIR date/dateTime: {text!r}")
    g = match.groupdict()
    tz = _zone(g["tz"])
    year = int(g["y"])
    if g["m"] is None:
        start = dt.datetime(year, 1, 1, tzinfo=tz)
        end = dt.datetime(year + 1, 1, 1, tzinfo=tz)
    elif g["d"] is None:
        month = int(g["m"])
        start = dt.datetime(year, month, 1, tzinfo=tz)
        end = dt.datetime(year + month // 12, month % 12 + 1, 1, tzinfo=tz)
    elif g["H"] is None:
        start = dt.datetime(year, int(g["m"]), int(g["d"]), tzinfo=tz)
        end = start + dt.timedelta(days=1)
    else:
        fraction = g["f"] or ""
        micro = int((fraction + "000000")[:6]) if fraction else 0
        start = dt.datetime(year, int(g["m"]), int(g["d"]), int(g["H"]), int(g["M"]), int(g["S"] or 0), micro, tzinfo=tz)
        if fraction:
            step = dt.timedelta(microseconds=max(1, 10 ** (6 - min(len(fraction), 6))))
        elif g["S"] is not None:
            step = dt.timedelta(seconds=1)
        else:
            step = dt.timedelta(minutes=1)
        end = start + step
    return _epoch(start), _epoch(end)


def _zone(text: str | None) -> dt.tzinfo | None:
    if text is None:
        return None  # naive: local time, resolved by _epoch
    if text == "Z":
        return dt.timezone.utc
    sign = 1 if text[0] == "+" else -1
    hours, minutes = int(text[1:3]), int(text[4:6])
    return dt.timezone(sign * dt.timedelta(hours=hours, minutes=minutes))


def _epoch(value: dt.datetime) -> float:
    return value.timestamp()  # naive datetimes are interpreted as local time


def instant(epoch: float) -> str:
    """FHIR instant (UTC, milliseconds) for meta.lastUpdated."""
    stamp = dt.datetime.fromtimestamp(epoch, dt.timezone.utc)
    return stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z")
