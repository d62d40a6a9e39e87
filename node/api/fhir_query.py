"""FHIR search requests -> what to select: DiagnosticReport search parameters,
_include/_revinclude, _summary, _elements and paging, dispatched through the
tables in node/api/fhir_capability.py. Unknown parameters are a 400
OperationOutcome unless the client sent `Prefer: handling=lenient`.
"""
from __future__ import annotations

import copy
from urllib.parse import urlencode

from fastapi import Request
from fhir.resources.R4B.diagnosticreport import DiagnosticReport as _DiagnosticReportModel

from node.api.fhir_capability import (
    _INCLUDE_BY_FORM,
    _PARAM_BY_FORM,
    _REVINCLUDE_BY_FORM,
    DEFAULT_COUNT,
    MAX_COUNT,
    REPORT_INCLUDES,
    REPORT_REVINCLUDES,
    SUMMARY_VALUES,
    FhirError,
    Include,
    _values,
)
from node.terminology import load_terminology


def lenient(request: Request) -> bool:
    return "handling=lenient" in request.headers.get("prefer", "").replace(" ", "").lower()


class ReportQuery:
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


def parse_report_query(request: Request) -> ReportQuery:
    is_lenient = lenient(request)
    query = ReportQuery()

    def unsupported(message: str) -> None:
        if not is_lenient:
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
    # ASCII digits only ("²".isdigit() is true), and within a database integer.
    if not (value.isascii() and value.isdigit()) or len(value) > 18:
        raise FhirError(400, "invalid", f"{name}={value}: expected a non-negative integer below 10^18")
    return int(value)


def subset(resource: dict, elements: list[str]) -> dict:
    keep = set(elements) | set(_ALWAYS_ELEMENTS)
    out = {k: copy.deepcopy(v) for k, v in resource.items() if k in keep}
    meta = out.setdefault("meta", {})
    meta["tag"] = [*meta.get("tag", []), load_terminology().fhir["subsetted"].fhir()]
    return out


def page_links(base: str, query: ReportQuery, total: int) -> list[dict]:
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
