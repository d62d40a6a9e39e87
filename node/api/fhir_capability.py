"""What Carina's FHIR R4 API supports, declared once.

The tables here (`READABLE_TYPES`, `INSTANCE_INTERACTIONS`,
`REPORT_SEARCH_PARAMS` with the SQL each parameter builds, `REPORT_INCLUDES`,
`REPORT_REVINCLUDES`, `RESULT_PARAMS`) are what the query parser
(node/api/fhir_query.py) dispatches on and what `capability_statement()` is
generated from, so the CapabilityStatement cannot list something the server
does not do. `fhir/CapabilityStatement.json` is that statement written to disk
(`python -m node.api.fhir_capability` rewrites it; a test checks it is current).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from node import fhir_store
from node.fhir_store import Token

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


if __name__ == "__main__":
    write_capability_statement()
    print(f"wrote {CAPABILITY_PATH}")
