"""FHIR R4 REST API: capabilities, read, vread and DiagnosticReport search.

Everything answers `application/fhir+json`; every error is an OperationOutcome.
The router's own route class converts errors (including the 401s raised by
`require_token`), so the API behaves the same in whatever app includes it.
"""
from __future__ import annotations

import datetime as dt
import email.utils
import json
import logging
from pathlib import Path
from typing import Callable
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from fastapi.routing import APIRoute

from node.api.auth import require_token
from node.db import FhirResource
from node import fhir_store
from node.fhir_store import Token

log = logging.getLogger(__name__)

FHIR_JSON = "application/fhir+json"
CAPABILITY_PATH = Path(__file__).resolve().parents[2] / "fhir" / "CapabilityStatement.json"
READABLE_TYPES = ("DiagnosticReport", "Observation", "Device", "ImagingStudy")
DEFAULT_COUNT, MAX_COUNT = 50, 500
REPORT_INCLUDES = {"DiagnosticReport:result", "DiagnosticReport:result:Observation"}
# Result parameters accepted and ignored: they do not change what JSON we send.
_HARMLESS = {"_pretty", "_total"}


class FhirError(Exception):
    def __init__(self, status: int, code: str, diagnostics: str, headers: dict | None = None):
        super().__init__(diagnostics)
        self.status, self.code, self.diagnostics, self.headers = status, code, diagnostics, headers


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


# --- capabilities --------------------------------------------------------------

@router.get("/metadata")
def capability_statement(request: Request) -> Response:
    # Public on purpose: clients discover the API (and that it wants a bearer
    # token) before authenticating; the statement holds no patient data.
    statement = json.loads(CAPABILITY_PATH.read_text())
    statement["implementation"]["url"] = base_url(request)
    return Response(json.dumps(statement), media_type=FHIR_JSON)


# --- search ------------------------------------------------------------------

@router.get("/DiagnosticReport", dependencies=[Depends(require_token)])
def search_diagnostic_reports(request: Request) -> Response:
    query = _parse_report_query(request)
    base = base_url(request)
    with _db(request).session() as session:
        total, rows = fhir_store.search(
            session, "DiagnosticReport", query.clauses, offset=query.offset, count=query.count
        )
        matches = [json.loads(row.body) for row in rows]
        included = []
        if query.include_results:
            ids = [
                ref["reference"].split("/", 1)[1]
                for report in matches
                for ref in report.get("result", [])
                if ref.get("reference", "").startswith("Observation/")
            ]
            included = [json.loads(row.body) for row in fhir_store.read_current_many(session, "Observation", ids)]

    bundle = {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": total,
        "link": _page_links(base, query, total),
        "entry": [_entry(base, r, "match") for r in matches] + [_entry(base, r, "include") for r in included],
    }
    return Response(json.dumps(bundle, ensure_ascii=False), media_type=FHIR_JSON)


class _ReportQuery:
    def __init__(self) -> None:
        self.clauses: list = []
        self.echo: list[tuple[str, str]] = []  # the parameters applied, for the self/next links
        self.include_results = False
        self.count = DEFAULT_COUNT
        self.offset = 0


def _parse_report_query(request: Request) -> _ReportQuery:
    lenient = "handling=lenient" in request.headers.get("prefer", "").replace(" ", "").lower()
    query = _ReportQuery()
    for name, value in request.query_params.multi_items():
        if name in ("patient:identifier", "subject:identifier"):
            query.clauses.append(fhir_store.patient_clause(_tokens(name, value)))
        elif name == "identifier":
            query.clauses.append(fhir_store.identifier_clause(_tokens(name, value)))
        elif name == "status":
            query.clauses.append(fhir_store.status_clause(_values(name, value)))
        elif name == "date":
            query.clauses.append(_date_clause(value))
        elif name == "_include":
            if value not in REPORT_INCLUDES:
                if lenient:
                    continue
                raise FhirError(400, "not-supported", f"_include={value} is not supported; use DiagnosticReport:result")
            query.include_results = True
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
        elif name in _HARMLESS:
            continue
        elif lenient:
            continue  # Prefer: handling=lenient - ignore and leave it out of the self link
        else:
            raise FhirError(400, "not-supported", f"unknown or unsupported search parameter {name!r} for DiagnosticReport")
        query.echo.append((name, value))
    return query


def _values(name: str, value: str) -> list[str]:
    values = [v for v in value.split(",") if v]
    if not values:
        raise FhirError(400, "invalid", f"{name} needs a value")
    return values


def _tokens(name: str, value: str) -> list[Token]:
    tokens = [Token.parse(v) for v in _values(name, value)]
    if any(not token.value for token in tokens):
        raise FhirError(400, "invalid", f"{name}={value}: a token needs a value after '|'")
    return tokens


def _date_clause(value: str):
    prefix, text = (value[:2], value[2:]) if value[:2] in fhir_store.DATE_PREFIXES else ("eq", value)
    try:
        start, end = fhir_store.time_range(text)
    except ValueError:
        raise FhirError(400, "invalid", f"date={value}: expected [prefix]YYYY[-MM[-DD[Thh:mm[:ss][zone]]]]") from None
    return fhir_store.date_clause(prefix, start, end)


def _non_negative(name: str, value: str) -> int:
    if not value.isdigit():
        raise FhirError(400, "invalid", f"{name}={value}: expected a non-negative integer")
    return int(value)


def _page_links(base: str, query: _ReportQuery, total: int) -> list[dict]:
    def url(offset: int) -> str:
        params = [*query.echo, ("_count", str(query.count)), ("_offset", str(offset))]
        return f"{base}/DiagnosticReport?{urlencode(params)}"

    links = [{"relation": "self", "url": url(query.offset)}]
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


# --- read / vread ----------------------------------------------------------------

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
