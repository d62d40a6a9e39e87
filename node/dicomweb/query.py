"""QIDO-RS matching and the DICOM JSON of Carina's outputs, for a web viewer.

What is searched and served is what Carina wrote (the `outputs` rows: SR,
SCs, SEG, GSPS, Encapsulated PDF of every version), never the instances the
senders stored: the node is not a PACS. The database narrows by the keys it
has columns for (StudyInstanceUID, PatientID, AccessionNumber,
SeriesInstanceUID, SOPInstanceUID); every key, those included, is then
matched on each output's own header (read once, cached by file identity, with
large values left on disk):

- UIDs: a list (`a,b` or `a\\b`), any of which matches (PS3.4 C.2.2.2.2);
- dates: `YYYYMMDD`, or a range `A-B`, `A-` or `-B` (C.2.2.2.5);
- anything else: the value, with `*` and `?` wildcards (C.2.2.2.4); person
  names case-insensitively; an empty value matches everything (and asks for
  the attribute in the answer);
- at the study level `Modality` and `ModalitiesInStudy` match any series.

An instance whose UID two senders' studies share (the same images sent by two
routes give the same output UIDs) is listed once.
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from pydicom import dcmread
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from sqlalchemy import select
from sqlalchemy.orm import Session

from node.db import Output, Study

STUDY, SERIES, INSTANCE = "study", "series", "instance"
BULK_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "UN"}
BULK_THRESHOLD = 1024  # bytes; larger binary values become BulkDataURIs in metadata
CONTROL_PARAMS = {"limit", "offset", "includefield", "fuzzymatching"}

STUDY_ATTRIBUTES = ("SpecificCharacterSet", "StudyDate", "StudyTime", "AccessionNumber", "ReferringPhysicianName",
                    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyID",
                    "StudyDescription")
SERIES_ATTRIBUTES = ("Modality", "SeriesInstanceUID", "SeriesNumber", "SeriesDescription")
INSTANCE_ATTRIBUTES = ("SOPClassUID", "SOPInstanceUID", "InstanceNumber")
_SQL_KEYS = {"StudyInstanceUID": Study.study_uid, "PatientID": Study.patient_id,
             "AccessionNumber": Study.accession_number, "SeriesInstanceUID": Output.series_uid,
             "SOPInstanceUID": Output.sop_instance_uid}


class QueryError(ValueError):
    """A QIDO-RS parameter that cannot be understood (400)."""


@dataclass(frozen=True)
class Entry:
    """One Carina output: its row's keys and its header."""

    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    patient_id: str
    path: Path
    header: Dataset


# --- the query --------------------------------------------------------------------------


@dataclass(frozen=True)
class Query:
    filters: dict[str, str]  # keyword -> value
    include: frozenset[str]  # keywords asked for with includefield (or {"all"})
    limit: int
    offset: int

    @classmethod
    def parse(cls, params: list[tuple[str, str]], *, max_limit: int = 1000) -> "Query":
        filters: dict[str, str] = {}
        include: set[str] = set()
        limit, offset = max_limit, 0
        for name, value in params:
            if name == "limit":
                limit = _count(name, value, 1, max_limit)
            elif name == "offset":
                offset = _count(name, value, 0, 2**31 - 1)
            elif name == "includefield":
                for field in filter(None, (v.strip() for v in value.split(","))):
                    include.add("all" if field == "all" else _keyword(field))
            elif name == "fuzzymatching":
                if value.lower() not in ("true", "false"):
                    raise QueryError("fuzzymatching is true or false")
            else:
                filters[_keyword(name)] = value
        return cls(filters, frozenset(include), limit, offset)

    def text(self) -> str:
        return "&".join(f"{k}={v}" for k, v in sorted(self.filters.items()))


def _count(name: str, value: str, low: int, high: int) -> int:
    if not value.isascii() or not value.isdigit() or not low <= int(value) <= high:
        raise QueryError(f"{name} must be an integer from {low} to {high}")
    return int(value)


def _keyword(name: str) -> str:
    """A DICOM keyword, or a tag as 8 hex digits, as the keyword (QueryError otherwise)."""
    if re.fullmatch(r"[0-9A-Fa-f]{8}", name):
        keyword = keyword_for_tag(Tag(int(name, 16)))
    else:
        keyword = name if tag_for_keyword(name) is not None else ""
    if not keyword and name not in ("ModalitiesInStudy",):
        raise QueryError(f"unknown attribute {name!r}: use a DICOM keyword or an 8-digit tag")
    return keyword or name


# --- the candidates -----------------------------------------------------------------------


def entries(session: Session, query: Query, *, study_uid: str | None = None, series_uid: str | None = None,
            sop_uid: str | None = None) -> list[Entry]:
    """The outputs that the path (study/series/instance) and the database keys allow, oldest first."""
    stmt = (select(Study.study_uid, Output.series_uid, Output.sop_instance_uid, Output.sop_class_uid,
                   Study.patient_id, Output.path)
            .join(Study, Study.id == Output.study_id).order_by(Output.id))
    fixed = {"StudyInstanceUID": study_uid, "SeriesInstanceUID": series_uid, "SOPInstanceUID": sop_uid}
    for keyword, column in _SQL_KEYS.items():
        if fixed.get(keyword):
            stmt = stmt.where(column == fixed[keyword])
        value = query.filters.get(keyword, "")
        if value and not any(c in value for c in "*?"):
            values = _uid_list(value) if keyword.endswith("UID") else [value]
            stmt = stmt.where(column.in_(values))
    seen: dict[str, Entry] = {}
    for study, series, sop, sop_class, patient, path in session.execute(stmt).all():
        file = Path(path)
        if not file.exists():
            continue
        seen[sop] = Entry(study, series, sop, sop_class, patient, file, header(file))  # the newest row wins
    return list(seen.values())


def header(path: Path) -> Dataset:
    stat = path.stat()
    return _header(str(path), stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=512)
def _header(path: str, mtime_ns: int, size: int) -> Dataset:
    # Values over 4 KB stay on disk (read when WADO serves them): the cache holds headers, not documents.
    return dcmread(path, stop_before_pixels=True, defer_size=4096)


# --- matching ---------------------------------------------------------------------------


def _uid_list(value: str) -> list[str]:
    return [v.strip() for v in re.split(r"[,\\]", value) if v.strip()]


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value).strip()


def _matches_value(keyword: str, wanted: str, actual: str) -> bool:
    if wanted == "":
        return True
    vr = dictionary_VR(keyword) if keyword != "ModalitiesInStudy" else "CS"
    if vr == "UI":
        return actual in _uid_list(wanted)
    if vr == "DA" and "-" in wanted:
        low, _, high = wanted.partition("-")
        return bool(actual) and (not low or actual >= low) and (not high or actual <= high)
    if vr == "PN":
        wanted, actual = wanted.lower(), actual.lower()
    if "*" in wanted or "?" in wanted:
        return fnmatch.fnmatchcase(actual, wanted)
    return actual == wanted


def matches(entry: Entry, query: Query, level: str, modalities: set[str] | None = None) -> bool:
    for keyword, wanted in query.filters.items():
        if level == STUDY and keyword in ("Modality", "ModalitiesInStudy"):
            if wanted and not any(_matches_value("Modality", wanted, m) for m in (modalities or ())):
                return False
            continue
        if not _matches_value(keyword, wanted, _text(entry.header, keyword)):
            return False
    return True


# --- the answers ------------------------------------------------------------------------


def _element_json(ds: Dataset, tag, base_uri: str | None) -> dict | None:
    raw = ds.get_item(tag)
    if raw is None:
        return None
    vr = raw.VR or dictionary_VR(tag)
    if isinstance(raw, RawDataElement):  # not converted yet; a deferred one has no value in memory
        size = raw.length if raw.value is None else len(raw.value)
    else:
        size = len(raw.value) if isinstance(raw.value, (bytes, bytearray)) else 0
    if vr in BULK_VRS and size > BULK_THRESHOLD:
        if base_uri is None:
            return None  # QIDO answers carry no bulk data
        return {"vr": vr, "BulkDataURI": f"{base_uri}/bulkdata/{int(Tag(tag)):08X}"}
    element: DataElement = ds[tag]
    return element.to_json_dict(bulk_data_element_handler=None, bulk_data_threshold=BULK_THRESHOLD)


def attributes_json(ds: Dataset, keywords) -> dict:
    out = {}
    for keyword in keywords:
        tag = tag_for_keyword(keyword)
        if tag is None or tag not in ds:
            continue
        value = _element_json(ds, tag, None)
        if value is not None:
            out[f"{int(Tag(tag)):08X}"] = value
    return out


def metadata_json(ds: Dataset, instance_uri: str) -> dict:
    """The whole header as DICOM JSON; large binary values as BulkDataURIs under `instance_uri`."""
    out = {}
    for tag in sorted(ds.keys()):
        if Tag(tag).group == 0x0002 or Tag(tag).element == 0:
            continue
        value = _element_json(ds, tag, instance_uri)
        if value is not None:
            out[f"{int(Tag(tag)):08X}"] = value
    return out


def bulk_value(ds_path: Path, tag: int) -> bytes | None:
    ds = dcmread(ds_path, stop_before_pixels=False, specific_tags=[Tag(tag)])
    element = ds.get(Tag(tag))
    return None if element is None else bytes(element.value)


def search(entries_: list[Entry], query: Query, level: str, base_url: str) -> tuple[list[dict], list[tuple[str, str]]]:
    """The QIDO-RS answer at `level`, paged, and the (patient, study) pairs it names."""
    by_study: dict[str, list[Entry]] = {}
    for entry in entries_:
        by_study.setdefault(entry.study_uid, []).append(entry)
    extra = set() if "all" in query.include else set(query.include)
    requested = {k for k, v in query.filters.items() if k != "ModalitiesInStudy"}
    rows: list[tuple[dict, Entry]] = []
    if level == STUDY:
        for study_uid, members in by_study.items():
            modalities = {_text(e.header, "Modality") for e in members} - {""}
            matching = [e for e in members if matches(e, query, STUDY, modalities)]
            if not matching:
                continue
            first = matching[0]
            keys = list(STUDY_ATTRIBUTES) + sorted(extra | requested - {"Modality"})
            if "all" in query.include:
                keys += [k for k in SERIES_ATTRIBUTES if k != "Modality"]
            item = attributes_json(first.header, keys)
            item["00080061"] = {"vr": "CS", "Value": sorted(modalities)}
            item["00201206"] = {"vr": "IS", "Value": [len({e.series_uid for e in members})]}
            item["00201208"] = {"vr": "IS", "Value": [len(members)]}
            item["00081190"] = {"vr": "UR", "Value": [f"{base_url}/studies/{study_uid}"]}
            rows.append((item, first))
    elif level == SERIES:
        for study_uid, members in by_study.items():
            by_series: dict[str, list[Entry]] = {}
            for entry in members:
                if matches(entry, query, SERIES):
                    by_series.setdefault(entry.series_uid, []).append(entry)
            for series_uid, series_members in by_series.items():
                first = series_members[0]
                keys = list(STUDY_ATTRIBUTES) + list(SERIES_ATTRIBUTES) + sorted(extra | requested)
                item = attributes_json(first.header, keys)
                item["00201209"] = {"vr": "IS", "Value": [len(series_members)]}
                item["00081190"] = {"vr": "UR", "Value": [f"{base_url}/studies/{study_uid}/series/{series_uid}"]}
                rows.append((item, first))
    else:
        for entry in entries_:
            if not matches(entry, query, INSTANCE):
                continue
            keys = list(STUDY_ATTRIBUTES) + list(SERIES_ATTRIBUTES) + list(INSTANCE_ATTRIBUTES) + sorted(extra | requested)
            if "all" in query.include:
                keys = [keyword_for_tag(t) for t in entry.header.keys() if keyword_for_tag(t)]
            item = attributes_json(entry.header, keys)
            item["00081190"] = {"vr": "UR", "Value": [
                f"{base_url}/studies/{entry.study_uid}/series/{entry.series_uid}/instances/{entry.sop_uid}"]}
            rows.append((item, entry))
    page = rows[query.offset: query.offset + query.limit]
    return [item for item, _ in page], [(e.patient_id, e.study_uid) for _, e in page]
