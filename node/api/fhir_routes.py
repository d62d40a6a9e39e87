"""FHIR R4 REST API: capabilities, read, vread, history and DiagnosticReport search.

Everything answers `application/fhir+json`; every error is an OperationOutcome.
The router's own route class converts errors (including the 401s raised by
`require_token`), so the API behaves the same in whatever app includes it.

What the API supports is declared once, in the tables below
(`READABLE_TYPES`, `INSTANCE_INTERACTIONS`, `REPORT_SEARCH_PARAMS`,
`REPORT_INCLUDES`, `REPORT_REVINCLUDES`, `RESULT_PARAMS`): the search parser
dispatches through them and `capability_statement()` is generated from them,
so the CapabilityStatement cannot list something the server does not do.
`fhir/CapabilityStatement.json` is that statement written to disk
(`python -m node.api.fhir_routes` rewrites it; a test checks it is current).
"""
from __future__ import annotations

import copy
import datetime as dt
import email.utils
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from fastapi.routing import APIRoute
from fhir.resources.R4B.diagnosticreport import DiagnosticReport as _DiagnosticReportModel

from node import fhir_store
from node.api.auth import require_token
from node.db import FhirResource
from node.fhir_store import Token
from node.terminology import load_terminology

log = logging.getLogger(__name__)

FHIR_JSON = "application/fhir+json"
CAPABILITY_PATH = Path(__file__).resolve().parents[2] / "fhir" / "CapabilityStatement.json"
DEFAULT_COUNT, MAX_COUNT = 50, 500


class FhirError(Exception):
    def __init__(self, status: int, code: str, diagnostics: str, headers: dict | None = None):
        super().__init__(diagnostics)
        self.status, self.code, self.diagnostics, self.headers = status, code, diagnostics, headers


# --- what is supported: the one table ------------------------------------------

# Every served type answers read, vread and instance history.
READABLE_TYPES = ("DiagnosticReport", "Observation", "Device", "ImagingStudy", "Patient", "Provenance")
INSTANCE_INTERACTIONS = ("read", "vread", "history-instance")
SEARCHABLE_TYPES = ("DiagnosticReport",)

_DATE_DOC = "Prefixes eq (default), ne, gt, lt, ge, le, sa, eb; repeat the parameter for a range (AND)."
_DATE_SYNTAX = "[prefix]YYYY[-MM[-DD[Thh:mm[:ss[.fff]][Z|+hh:mm]]]]"


@dataclass(frozen=True)
class SearchParam:
    name: str  # the SearchParameter code, as listed in the CapabilityStatement
    type: str  # FHIR search parameter type
    definition: str  # canonical URL of the base SearchParameter
    documentation: str
    forms: tuple[str, ...]  # query names accepted: the name and/or name:modifier
    build: Callable[[str, str], object]  # (query name, raw value) -> SQL clause


def _tokens(name: str, value: str) -> list[Token]:
    tokens = [Token.parse(v) for v in _values(name, value)]
    if any(not token.value for token in tokens):
        raise FhirError(400, "invalid", f"{name}={value}: a token needs a value after '|'")
    return tokens


def _values(name: str, value: str) -> list[str]:
    values = [v for v in value.split(",") if v]
    if not values:
        raise FhirError(400, "invalid", f"{name} needs a value")
    return values


def _references(name: str, value: str, default_type: str | None) -> list[str]:
    """`Type/id`, a bare id (typed as `default_type`) or an absolute URL ending in `Type/id`."""
    out = []
    for raw in _values(name, value):
        parts = raw.rstrip("/").split("/")
        if len(parts) >= 2 and parts[-2][:1].isupper():
            out.append(f"{parts[-2]}/{parts[-1]}")
        elif len(parts) == 1 and default_type:
            out.append(f"{default_type}/{raw}")
        else:
            raise FhirError(400, "invalid", f"{name}={raw}: expected [Type/]id")
    return out


def _date_range(name: str, value: str) -> tuple[str, float, float]:
    prefix, text = (value[:2], value[2:]) if value[:2] in fhir_store.DATE_PREFIXES else ("eq", value)
    try:
        start, end = fhir_store.time_range(text)
    except ValueError:
        raise FhirError(400, "invalid", f"{name}={value}: expected {_DATE_SYNTAX}") from None
    return prefix, start, end


def _reference_param(param: str, default_type: str | None):
    def build(name: str, value: str):
        if name.endswith(":identifier"):
            return fhir_store.indexed_token_clause(f"{param}:identifier", _tokens(name, value))
        return fhir_store.indexed_value_clause(param, _references(name, value, default_type))

    return build


def _token_param(param: str):
    return lambda name, value: fhir_store.indexed_token_clause(param, _tokens(name, value))


def _date_param(param: str):
    return lambda name, value: fhir_store.indexed_date_clause(param, *_date_range(name, value))


def _last_updated(name: str, value: str):
    return fhir_store.last_updated_clause(*_date_range(name, value))


def _status(name: str, value: str):
    return fhir_store.indexed_value_clause("status", _values(name, value))


REPORT_SEARCH_PARAMS: tuple[SearchParam, ...] = (
    SearchParam(
        "patient", "reference", "http://hl7.org/fhir/SearchParameter/clinical-patient",
        "The subject Patient: Patient/<id> or <id> (Carina's Patient view), or patient:identifier=system|value, "
        "value or |value (the DICOM PatientID; system = api.patient_identifier_system). Comma = OR.",
        ("patient", "patient:identifier"), _reference_param("subject", "Patient"),
    ),
    SearchParam(
        "subject", "reference", "http://hl7.org/fhir/SearchParameter/DiagnosticReport-subject",
        "As patient (every subject is a Patient): subject=Patient/<id> or subject:identifier=system|value.",
        ("subject", "subject:identifier"), _reference_param("subject", "Patient"),
    ),
    SearchParam(
        "identifier", "token", "http://hl7.org/fhir/SearchParameter/clinical-identifier",
        "urn:dicom:uid|urn:oid:<SOP Instance UID of the matching DICOM SR> (changes with each re-run), or "
        "urn:ietf:rfc:3986|urn:uuid:<report id> (stable across versions). Comma = OR.",
        ("identifier",), _token_param("identifier"),
    ),
    SearchParam(
        "based-on", "reference", "http://hl7.org/fhir/SearchParameter/DiagnosticReport-based-on",
        "Only as based-on:identifier=<accession number> (the ServiceRequest is referenced logically by its "
        "ACSN identifier, which has no system). Comma = OR.",
        ("based-on:identifier",), _reference_param("based-on", "ServiceRequest"),
    ),
    SearchParam(
        "category", "token", "http://hl7.org/fhir/SearchParameter/DiagnosticReport-category",
        "http://loinc.org|LP29684-5 (Radiology) or http://terminology.hl7.org/CodeSystem/v2-0074|RAD.",
        ("category",), _token_param("category"),
    ),
    SearchParam(
        "code", "token", "http://hl7.org/fhir/SearchParameter/clinical-code",
        "http://loinc.org|36554-4 (XR Chest Single view), |36643-5 (2 Views) or |18748-4 (Diagnostic imaging "
        "study: every Carina report).",
        ("code",), _token_param("code"),
    ),
    SearchParam(
        "date", "date", "http://hl7.org/fhir/SearchParameter/clinical-date",
        f"On effectiveDateTime (the study date/time; DICOM times carry no zone, the node's is used). {_DATE_DOC}",
        ("date",), _date_param("date"),
    ),
    SearchParam(
        "issued", "date", "http://hl7.org/fhir/SearchParameter/DiagnosticReport-issued",
        f"On issued (when this version of the AI report was produced). {_DATE_DOC}",
        ("issued",), _date_param("issued"),
    ),
    SearchParam(
        "status", "token", "http://hl7.org/fhir/SearchParameter/DiagnosticReport-status",
        "preliminary (first AI run) | amended (re-run) | final (radiologist-confirmed, later); comma = OR.",
        ("status",), _status,
    ),
    SearchParam(
        "_lastUpdated", "date", "http://hl7.org/fhir/SearchParameter/Resource-lastUpdated",
        f"On meta.lastUpdated (when Carina stored this version). {_DATE_DOC}",
        ("_lastUpdated",), _last_updated,
    ),
)
_PARAM_BY_FORM = {form: param for param in REPORT_SEARCH_PARAMS for form in param.forms}


@dataclass(frozen=True)
class Include:
    name: str  # as listed in the CapabilityStatement
    aliases: tuple[str, ...]  # other spellings accepted for the same include
    source: str  # reference path in the matched (or, for revinclude, the including) resource
    target_type: str


REPORT_INCLUDES = (
    Include("DiagnosticReport:result", ("DiagnosticReport:result:Observation",), "result", "Observation"),
    Include("DiagnosticReport:subject", ("DiagnosticReport:subject:Patient", "DiagnosticReport:patient"),
            "subject", "Patient"),
)
REPORT_REVINCLUDES = (
    Include("Provenance:target", ("Provenance:target:DiagnosticReport",), "target", "Provenance"),
)
_INCLUDE_BY_FORM = {form: inc for inc in REPORT_INCLUDES for form in (inc.name, *inc.aliases)}
_REVINCLUDE_BY_FORM = {form: inc for inc in REPORT_REVINCLUDES for form in (inc.name, *inc.aliases)}

# Result parameters (not SearchParameters; documented in the statement).
SUMMARY_VALUES = ("count", "false")
RESULT_PARAMS = {
    "_count": f"page size, default {DEFAULT_COUNT}, max {MAX_COUNT}; 0 returns only the total",
    "_offset": "page start (stateless paging; the next/previous links carry it)",
    "_summary": "count (only the total) or false (full resources); other values are not supported",
    "_elements": "comma-separated DiagnosticReport elements; matches are returned with only those (plus id, "
                 "meta, status and code) and tagged SUBSETTED; included resources are returned whole",
    "_include": "see searchInclude",
    "_revinclude": "see searchRevInclude",
    "_format": "json / application/fhir+json only",
    "_pretty": "accepted, ignored",
    "_total": "accepted, ignored: the total is always exact",
}


def capability_statement(base_url: str = "(set by the server to its base URL)") -> dict:
    """The CapabilityStatement, generated from the tables above."""
    documentation = (
        "JSON only. Search results are searchset Bundles with total, absolute fullUrl and self/next/previous links. "
        "Result parameters: " + "; ".join(f"{k}: {v}" for k, v in RESULT_PARAMS.items()) + ". "
        "Unknown or unsupported search parameters (and _include/_revinclude values) are rejected with 400 "
        "OperationOutcome unless the request carries 'Prefer: handling=lenient', which ignores them and leaves "
        "them out of the self link. Reads return ETag W/\"<versionId>\" and Last-Modified; If-None-Match is "
        "honoured. GET [type]/[id]/_history returns every version, newest first."
    )
    resources = []
    for rtype in READABLE_TYPES:
        interactions = [{"code": code} for code in INSTANCE_INTERACTIONS]
        entry = {
            "type": rtype,
            "interaction": interactions,
            "versioning": "versioned",
            "readHistory": True,
            "updateCreate": False,
        }
        if rtype in SEARCHABLE_TYPES:
            interactions.append({"code": "search-type"})
            entry["searchInclude"] = [inc.name for inc in REPORT_INCLUDES]
            entry["searchRevInclude"] = [inc.name for inc in REPORT_REVINCLUDES]
            entry["searchParam"] = [
                {"name": p.name, "definition": p.definition, "type": p.type, "documentation": p.documentation}
                for p in REPORT_SEARCH_PARAMS
            ]
        if rtype == "Patient":
            entry["documentation"] = (
                "Carina's view of the patient as the DICOM header names it (identifier = PatientID, name, gender, "
                "birthDate); the EHR remains the master. It exists so that _include=DiagnosticReport:subject works."
            )
        if rtype == "Provenance":
            entry["documentation"] = "One per AI run (study version), AI Transparency IG style: author = the AI Device."
        resources.append(entry)
    return {
        "resourceType": "CapabilityStatement",
        "id": "carina",
        "name": "CarinaFhirResultsApi",
        "title": "Carina chest X-ray AI node - FHIR R4 results API",
        "status": "active",
        "experimental": False,
        "date": "2026-11-21",
        "publisher": "Carina",
        "description": (
            "Read-only FHIR R4 API over the AI results Carina produced: one DiagnosticReport per study (the FHIR face "
            "of the TID 1500 SR sent to PACS), one Observation per ChestX-ray14 finding, the Device (model), the "
            "ImagingStudy scored, a Provenance per AI run and the Patient as the DICOM header describes it. Every "
            "report and observation is AI asserted (meta.security v3-ObservationValue#AIAST)."
        ),
        "kind": "instance",
        "software": {"name": "Carina", "version": "0.1.0"},
        "implementation": {"description": "Carina FHIR results API", "url": base_url},
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json", "json"],
        "rest": [
            {
                "mode": "server",
                "documentation": documentation,
                "security": {
                    "cors": False,
                    "service": [{"text": "Static bearer tokens issued by 'carina token create'"}],
                    "description": (
                        "Every interaction except GET /metadata requires 'Authorization: Bearer <token>'; otherwise "
                        "401 with an OperationOutcome. The CapabilityStatement is public so clients can discover the "
                        "API before they authenticate; it contains no patient data."
                    ),
                },
                "resource": resources,
            }
        ],
    }


def write_capability_statement(path: Path = CAPABILITY_PATH) -> None:
    path.write_text(json.dumps(capability_statement(), indent=2, ensure_ascii=False) + "\n")


# --- plumbing ------------------------------------------------------------------------

def outcome(status: int, code: str, diagnostics: str, headers: dict | None = None) -> Response:
    body = {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": code, "diagnostics": diagnostics}],
    }
    return Response(json.dumps(body), status_code=status, media_type=FHIR_JSON, headers=headers)


class FhirRoute(APIRoute):
    """Turns every failure of a FHIR route into an OperationOutcome response."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def fhir_handler(request: Request) -> Response:
            try:
                return await handler(request)
            except FhirError as exc:
                return outcome(exc.status, exc.code, exc.diagnostics, exc.headers)
            except HTTPException as exc:
                code = {401: "login", 403: "forbidden", 404: "not-found"}.get(exc.status_code, "processing")
                return outcome(exc.status_code, code, str(exc.detail), exc.headers)
            except RequestValidationError as exc:
                return outcome(400, "invalid", str(exc.errors()))
            except Exception:  # an EHR gets an OperationOutcome, the log gets the trace
                log.exception("FHIR %s %s failed", request.method, request.url.path)
                return outcome(500, "exception", "internal error; see the node log")

        return fhir_handler


router = APIRouter(prefix="/fhir", route_class=FhirRoute, tags=["fhir"])


def base_url(request: Request) -> str:
    """Absolute FHIR base for fullUrl and links: the configured public URL, else the request's."""
    public = request.app.state.node.settings.api.public_base_url.rstrip("/")
    if public:
        return public if public.endswith("/fhir") else f"{public}/fhir"
    return str(request.base_url).rstrip("/") + "/fhir"


def _db(request: Request):
    return request.app.state.node.db


def _lenient(request: Request) -> bool:
    return "handling=lenient" in request.headers.get("prefer", "").replace(" ", "").lower()


def _json(body: dict) -> Response:
    return Response(json.dumps(body, ensure_ascii=False), media_type=FHIR_JSON)


# --- capabilities --------------------------------------------------------------

@router.get("/metadata")
def metadata(request: Request) -> Response:
    # Public on purpose: clients discover the API (and that it wants a bearer
    # token) before authenticating; the statement holds no patient data.
    return _json(capability_statement(base_url(request)))


# --- search ------------------------------------------------------------------

class _ReportQuery:
    def __init__(self) -> None:
        self.clauses: list = []
        self.echo: list[tuple[str, str]] = []  # the parameters applied, for the self/next links
        self.includes: list[Include] = []
        self.revincludes: list[Include] = []
        self.elements: list[str] | None = None
        self.summary_count = False
        self.count = DEFAULT_COUNT
        self.offset = 0


_REPORT_ELEMENTS = _DiagnosticReportModel.elements_sequence()
_ALWAYS_ELEMENTS = ("resourceType", "id", "meta", "status", "code")


def _element_keys(name: str) -> list[str]:
    """JSON keys for an element name; a choice element (effective) covers effectiveDateTime etc."""
    if name in _REPORT_ELEMENTS:
        return [name]
    return [e for e in _REPORT_ELEMENTS if e.startswith(name) and e[len(name):][:1].isupper()]


def _parse_report_query(request: Request) -> _ReportQuery:
    lenient = _lenient(request)
    query = _ReportQuery()

    def unsupported(message: str) -> None:
        if not lenient:
            raise FhirError(400, "not-supported", message)

    for name, value in request.query_params.multi_items():
        param = _PARAM_BY_FORM.get(name)
        if param is not None:
            query.clauses.append(param.build(name, value))
        elif name == "_include":
            include = _INCLUDE_BY_FORM.get(value)
            if include is None:
                unsupported(f"_include={value} is not supported; use one of {[i.name for i in REPORT_INCLUDES]}")
                continue
            query.includes.append(include)
        elif name == "_revinclude":
            include = _REVINCLUDE_BY_FORM.get(value)
            if include is None:
                unsupported(f"_revinclude={value} is not supported; use {[i.name for i in REPORT_REVINCLUDES]}")
                continue
            query.revincludes.append(include)
        elif name == "_summary":
            if value not in SUMMARY_VALUES:
                unsupported(f"_summary={value} is not supported; use count or false")
                continue
            query.summary_count = value == "count"
        elif name == "_elements":
            names = _values(name, value)
            unknown = [n for n in names if not _element_keys(n)]
            if unknown:
                raise FhirError(400, "invalid", f"_elements: {unknown} are not DiagnosticReport elements")
            query.elements = [key for n in names for key in _element_keys(n)]
        elif name == "_count":
            query.count = min(_non_negative(name, value), MAX_COUNT)
            continue  # echoed by _page_links
        elif name == "_offset":
            query.offset = _non_negative(name, value)
            continue
        elif name == "_format":
            if "json" not in value:
                raise FhirError(400, "not-supported", f"_format={value}: this server only speaks JSON")
            continue
        elif name in ("_pretty", "_total"):
            continue
        else:
            # Prefer: handling=lenient - ignore it and leave it out of the self link.
            unsupported(f"unknown or unsupported search parameter {name!r} for DiagnosticReport; see /fhir/metadata")
            continue
        query.echo.append((name, value))
    return query


def _non_negative(name: str, value: str) -> int:
    if not value.isdigit():
        raise FhirError(400, "invalid", f"{name}={value}: expected a non-negative integer")
    return int(value)


@router.get("/DiagnosticReport", dependencies=[Depends(require_token)])
def search_diagnostic_reports(request: Request) -> Response:
    query = _parse_report_query(request)
    base = base_url(request)
    count = 0 if query.summary_count else query.count
    with _db(request).session() as session:
        total, rows = fhir_store.search(session, "DiagnosticReport", query.clauses, offset=query.offset, count=count)
        matches = [json.loads(row.body) for row in rows]
        included = _included(session, matches, query)

    bundle = {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": total,
        "link": _page_links(base, query, total),
    }
    if not query.summary_count:
        shown = [_subset(r, query.elements) for r in matches] if query.elements else matches
        bundle["entry"] = [_entry(base, r, "match") for r in shown] + [_entry(base, r, "include") for r in included]
    return _json(bundle)


def _included(session, matches: list[dict], query: _ReportQuery) -> list[dict]:
    found: dict[tuple[str, str], dict] = {}
    for include in query.includes:
        ids = []
        for report in matches:
            refs = report.get(include.source) or []
            for ref in refs if isinstance(refs, list) else [refs]:
                reference = (ref or {}).get("reference", "")
                if reference.startswith(f"{include.target_type}/"):
                    ids.append(reference.split("/", 1)[1])
        for row in fhir_store.read_current_many(session, include.target_type, ids):
            found.setdefault((row.resource_type, row.resource_id), json.loads(row.body))
    for include in query.revincludes:
        refs = [f"DiagnosticReport/{report['id']}" for report in matches]
        for row in fhir_store.current_referencing(session, include.target_type, include.source, refs):
            found.setdefault((row.resource_type, row.resource_id), json.loads(row.body))
    return list(found.values())


def _subset(resource: dict, elements: list[str]) -> dict:
    keep = set(elements) | set(_ALWAYS_ELEMENTS)
    out = {k: copy.deepcopy(v) for k, v in resource.items() if k in keep}
    meta = out.setdefault("meta", {})
    meta["tag"] = [*meta.get("tag", []), load_terminology().fhir["subsetted"].fhir()]
    return out


def _page_links(base: str, query: _ReportQuery, total: int) -> list[dict]:
    def url(offset: int) -> str:
        params = [*query.echo, ("_count", str(query.count)), ("_offset", str(offset))]
        if query.summary_count:
            params = [*query.echo, ("_summary", "count")]
        return f"{base}/DiagnosticReport?{urlencode(params)}"

    links = [{"relation": "self", "url": url(query.offset)}]
    if query.summary_count:
        return links
    if query.count and query.offset + query.count < total:
        links.append({"relation": "next", "url": url(query.offset + query.count)})
    if query.count and query.offset > 0:
        links.append({"relation": "previous", "url": url(max(0, query.offset - query.count))})
    return links


def _entry(base: str, resource: dict, mode: str) -> dict:
    return {
        "fullUrl": f"{base}/{resource['resourceType']}/{resource['id']}",
        "resource": resource,
        "search": {"mode": mode},
    }


# --- read / vread / history ----------------------------------------------------------

@router.get("/{resource_type}", dependencies=[Depends(require_token)])
def search_unsupported(resource_type: str) -> Response:
    _check_type(resource_type)
    raise FhirError(405, "not-supported", f"search is not supported on {resource_type}; see /fhir/metadata")


@router.get("/{resource_type}/{resource_id}", dependencies=[Depends(require_token)])
def read(resource_type: str, resource_id: str, request: Request) -> Response:
    _check_type(resource_type)
    with _db(request).session() as session:
        row = fhir_store.read_current(session, resource_type, resource_id)
    if row is None:
        raise FhirError(404, "not-found", f"{resource_type}/{resource_id} is not known")
    return _resource_response(request, row)


@router.get("/{resource_type}/{resource_id}/_history", dependencies=[Depends(require_token)])
def history_instance(resource_type: str, resource_id: str, request: Request) -> Response:
    _check_type(resource_type)
    for name, _ in request.query_params.multi_items():
        if name not in ("_format", "_pretty") and not _lenient(request):
            raise FhirError(400, "not-supported", f"{name} is not supported on _history; every version is returned")
    with _db(request).session() as session:
        rows = fhir_store.history(session, resource_type, resource_id)
    if not rows:
        raise FhirError(404, "not-found", f"{resource_type}/{resource_id} is not known")
    base = base_url(request)
    entries = []
    for row in rows:
        resource = json.loads(row.body)
        first = row.version_id == 1
        entries.append({
            "fullUrl": f"{base}/{resource_type}/{resource_id}",
            "resource": resource,
            "request": {
                "method": "POST" if first else "PUT",
                "url": resource_type if first else f"{resource_type}/{resource_id}",
            },
            "response": {
                "status": "201 Created" if first else "200 OK",
                "etag": f'W/"{row.version_id}"',
                "lastModified": resource["meta"]["lastUpdated"],
            },
        })
    bundle = {
        "resourceType": "Bundle",
        "type": "history",
        "total": len(entries),
        "link": [{"relation": "self", "url": f"{base}/{resource_type}/{resource_id}/_history"}],
        "entry": entries,
    }
    return _json(bundle)


@router.get("/{resource_type}/{resource_id}/_history/{version_id}", dependencies=[Depends(require_token)])
def vread(resource_type: str, resource_id: str, version_id: str, request: Request) -> Response:
    _check_type(resource_type)
    row = None
    if version_id.isdigit():
        with _db(request).session() as session:
            row = fhir_store.read_version(session, resource_type, resource_id, int(version_id))
    if row is None:
        raise FhirError(404, "not-found", f"{resource_type}/{resource_id}/_history/{version_id} is not known")
    return _resource_response(request, row)


def _check_type(resource_type: str) -> None:
    if resource_type not in READABLE_TYPES:
        raise FhirError(404, "not-supported", f"resource type {resource_type!r} is not served here; see /fhir/metadata")


def _resource_response(request: Request, row: FhirResource) -> Response:
    etag = f'W/"{row.version_id}"'
    headers = {
        "ETag": etag,
        "Last-Modified": email.utils.format_datetime(
            dt.datetime.fromtimestamp(row.last_updated, dt.timezone.utc), usegmt=True
        ),
        "Content-Location": f"{base_url(request)}/{row.resource_type}/{row.resource_id}/_history/{row.version_id}",
    }
    if etag in [tag.strip() for tag in request.headers.get("if-none-match", "").split(",")]:
        return Response(status_code=304, headers=headers)
    return Response(row.body, media_type=FHIR_JSON, headers=headers)


@router.api_route(
    "/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"], dependencies=[Depends(require_token)]
)
def not_served(path: str, request: Request) -> Response:
    """Anything else under /fhir still answers in FHIR: the API is read-only."""
    if request.method != "GET":
        raise FhirError(405, "not-supported", f"{request.method} is not supported: this FHIR API is read-only")
    raise FhirError(404, "not-found", f"/fhir/{path} is not served; see /fhir/metadata")


if __name__ == "__main__":  # python -m node.api.fhir_routes
    write_capability_statement()
    print(f"wrote {CAPABILITY_PATH}")
