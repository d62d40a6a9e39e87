"""FHIR R4 REST handlers: capabilities, read, vread, history and DiagnosticReport search.

Everything answers `application/fhir+json`; every error is an OperationOutcome.
The router's own route class converts errors (including the 401/403 raised by
the access policy, node/api/policy.py), so the API behaves the same in
whatever app includes it. Every read and search is audited with the patients
it returned (node/audit/events.py).
What is supported is declared in node/api/fhir_capability.py; requests are
parsed by node/api/fhir_query.py.
"""
from __future__ import annotations

import datetime as dt
import email.utils
import json
import logging
import traceback
from typing import Callable

from fastapi import APIRouter, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from fastapi.routing import APIRoute

from node import fhir_store
from node.api.auth import actor
from node.api.policy import Permission, public, require
from node.audit import events
from node.api.fhir_capability import READABLE_TYPES, FhirError, capability_statement
from node.api.fhir_query import ReportQuery, lenient, page_links, parse_report_query, subset
from node.db import FhirResource

log = logging.getLogger(__name__)

FHIR_JSON = "application/fhir+json"


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
            except Exception as exc:  # an EHR gets an OperationOutcome, the log gets the frames
                # Class and frames only: an exception's message may quote patient data.
                log.error("FHIR %s failed: %s\n%s", request.method, type(exc).__name__,
                          "".join(traceback.format_tb(exc.__traceback__)))
                return outcome(500, "exception", "internal error; see the node log")

        return fhir_handler


router = APIRouter(prefix="/fhir", route_class=FhirRoute, tags=["fhir"])
READ = require(Permission.READ_FHIR)


def base_url(request: Request) -> str:
    """Absolute FHIR base for fullUrl and links: the configured public URL, else the request's."""
    public = request.app.state.node.settings.api.public_base_url.rstrip("/")
    if public:
        return public if public.endswith("/fhir") else f"{public}/fhir"
    return str(request.base_url).rstrip("/") + "/fhir"


def _db(request: Request):
    return request.app.state.node.db


def _json(body: dict) -> Response:
    return Response(json.dumps(body, ensure_ascii=False), media_type=FHIR_JSON)


# --- capabilities --------------------------------------------------------------

@router.get("/metadata", dependencies=[public("FHIR capability discovery; no patient data")])
def metadata(request: Request) -> Response:
    # Public on purpose: clients discover the API (and that it wants a bearer
    # token) before authenticating; the statement holds no patient data.
    return _json(capability_statement(base_url(request)))


@router.get("/DiagnosticReport", dependencies=[READ])
def search_diagnostic_reports(request: Request) -> Response:
    query = parse_report_query(request)
    base = base_url(request)
    count = 0 if query.summary_count else query.count
    with _db(request).session() as session:
        total, rows = fhir_store.search(session, "DiagnosticReport", query.clauses, offset=query.offset, count=count)
        matches = [json.loads(row.body) for row in rows]
        included = _included(session, matches, query)
    events.query(request.app.state.node.audit, actor(request), f"DiagnosticReport?{request.url.query}",
                 _patients(request, matches + included))

    bundle = {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": total,
        "link": page_links(base, query, total),
    }
    if not query.summary_count:
        shown = [subset(r, query.elements) for r in matches] if query.elements else matches
        bundle["entry"] = [_entry(base, r, "match") for r in shown] + [_entry(base, r, "include") for r in included]
    return _json(bundle)


def _included(session, matches: list[dict], query: ReportQuery) -> list[dict]:
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


def _patients(request: Request, resources: list[dict]) -> list[tuple[str, str]]:
    """(patient ID, "") for each resource that names a patient, for the audit trail."""
    system = request.app.state.node.settings.api.patient_identifier_system
    found = []
    for resource in resources:
        subject = ((resource.get("subject") or {}).get("identifier") or {}).get("value")
        if subject:
            found.append((subject, ""))
        elif resource.get("resourceType") == "Patient":
            found += [(i["value"], "") for i in resource.get("identifier") or []
                      if i.get("system") == system and i.get("value")]
    return found


def _audit_read(request: Request, bodies: list[str]) -> None:
    resources = [json.loads(body) for body in bodies]
    events.record_read(request.app.state.node.audit, actor(request), request.url.path, _patients(request, resources))


def _entry(base: str, resource: dict, mode: str) -> dict:
    return {
        "fullUrl": f"{base}/{resource['resourceType']}/{resource['id']}",
        "resource": resource,
        "search": {"mode": mode},
    }


# --- read / vread / history ----------------------------------------------------------

@router.get("/{resource_type}", dependencies=[READ])
def search_unsupported(resource_type: str) -> Response:
    _check_type(resource_type)
    raise FhirError(405, "not-supported", f"search is not supported on {resource_type}; see /fhir/metadata")


@router.get("/{resource_type}/{resource_id}", dependencies=[READ])
def read(resource_type: str, resource_id: str, request: Request) -> Response:
    _check_type(resource_type)
    with _db(request).session() as session:
        row = fhir_store.read_current(session, resource_type, resource_id)
    if row is None:
        raise FhirError(404, "not-found", f"{resource_type}/{resource_id} is not known")
    _audit_read(request, [row.body])
    return _resource_response(request, row)


@router.get("/{resource_type}/{resource_id}/_history", dependencies=[READ])
def history_instance(resource_type: str, resource_id: str, request: Request) -> Response:
    _check_type(resource_type)
    for name, _ in request.query_params.multi_items():
        if name not in ("_format", "_pretty") and not lenient(request):
            raise FhirError(400, "not-supported", f"{name} is not supported on _history; every version is returned")
    with _db(request).session() as session:
        rows = fhir_store.history(session, resource_type, resource_id)
    if not rows:
        raise FhirError(404, "not-found", f"{resource_type}/{resource_id} is not known")
    _audit_read(request, [row.body for row in rows])
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


@router.get("/{resource_type}/{resource_id}/_history/{version_id}", dependencies=[READ])
def vread(resource_type: str, resource_id: str, version_id: str, request: Request) -> Response:
    _check_type(resource_type)
    row = None
    if version_id.isascii() and version_id.isdigit() and len(version_id) <= 18:
        with _db(request).session() as session:
            row = fhir_store.read_version(session, resource_type, resource_id, int(version_id))
    if row is None:
        raise FhirError(404, "not-found", f"{resource_type}/{resource_id}/_history/{version_id} is not known")
    _audit_read(request, [row.body])
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
    "/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"], dependencies=[READ], include_in_schema=False
)
def not_served(path: str, request: Request) -> Response:
    """Anything else under /fhir still answers in FHIR: the API is read-only."""
    if request.method != "GET":
        raise FhirError(405, "not-supported", f"{request.method} is not supported: this FHIR API is read-only")
    raise FhirError(404, "not-found", f"/fhir/{path} is not served; see /fhir/metadata")
