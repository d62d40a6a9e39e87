"""FHIR destinations: POST each report version to `base_url` as a transaction Bundle.

Re-sending never duplicates, because every entry is conditional and keyed on
a business identifier (FHIR R4 http.html#cond-update, #ccreate):

| resource          | request                                                     |
|-------------------|-------------------------------------------------------------|
| DiagnosticReport  | PUT DiagnosticReport?identifier=urn:ietf:rfc:3986|urn:uuid:<id> |
| Observation (x14) | PUT Observation?identifier=urn:ietf:rfc:3986|urn:uuid:<id>      |
| Device            | POST, ifNoneExist identifier=urn:dicom:uid|urn:oid:<Device UID> |
| ImagingStudy      | POST, ifNoneExist identifier=urn:dicom:uid|urn:oid:<Study UID>  |
| Patient (opt-in)  | POST, ifNoneExist identifier=<patient system>|<PatientID>        |
| Provenance        | PUT Provenance/<id> (R4 Provenance has no identifier; the id is |
|                   | deterministic per AI run, so this is an idempotent upsert)     |

The report and observations are updated in place on a re-run (amended), the
device and imaging study are only created when the server has none: the PACS
or EHR may already hold a richer ImagingStudy, which Carina must not overwrite.
Entries reference each other by `urn:uuid:<Carina id>` fullUrls, which the
server rewrites to whatever ids it assigns or matches. The patient is a
logical reference (subject.identifier) unless `send_patient` is set.

Errors: 5xx, 408, 429, timeouts and connection failures retry with backoff;
any other 4xx (and a 2xx response whose entries did not all succeed) goes to
dead-letter. The job's `last_error` says which (HTTP status); the server's
OperationOutcome text, which may echo the patient, is kept in the job's error
detail for admins (node/jobs.py StageError). Secrets come from the
environment variables the configuration names, never from the file.
"""
from __future__ import annotations

import copy
import json
import logging
import os
from dataclasses import dataclass
from urllib.parse import quote

import httpx
from sqlalchemy.orm import Session

from node import results
from node.config import FhirDestination
from node.context import NodeContext
from node.db import Study
from node.jobs import PermanentError, RetryableError
from node.outputs.fhir_report import DICOM_UID_SYSTEM, URI_SYSTEM, build_report_resources, pdf_attachment
from node.scored_study import ScoredStudy
from node.storage import report_pdf_path

log = logging.getLogger(__name__)

RETRYABLE_STATUS = {408, 429}
FHIR_JSON = "application/fhir+json"


@dataclass(frozen=True)
class FhirDelivery:
    destination: FhirDestination
    scored: ScoredStudy
    pdf: bytes | None = None  # the printable report, attached as presentedForm


def load(ctx: NodeContext, session: Session, study: Study, destination: FhirDestination) -> FhirDelivery:
    scored = results.load(session, study.id, study.version)
    return FhirDelivery(destination, scored, report_pdf(ctx, scored))


def report_pdf(ctx: NodeContext, scored: ScoredStudy) -> bytes | None:
    """The version's PDF as encode wrote it, when FHIR is to carry it (outputs.report_pdf.fhir)."""
    if not ctx.settings.outputs.report_pdf.fhir:
        return None
    path = report_pdf_path(ctx.outputs_dir, scored.calling_ae, scored.study_uid, scored.version)
    return path.read_bytes() if path.exists() else None


# The Bundle lists the report, what it references, then who made it.
_BUNDLE_ORDER = ("DiagnosticReport", "Observation", "ImagingStudy", "Patient", "Device", "Provenance")


def send(ctx: NodeContext, work: FhirDelivery) -> None:
    destination, scored = work.destination, work.scored
    # The same builder as the FHIR API's stored resources: the same input gives the same JSON.
    presented = pdf_attachment(work.pdf, scored) if work.pdf is not None else None
    resources = build_report_resources(scored, patient_system=ctx.settings.api.patient_identifier_system,
                                       presented_form=presented)
    resources.sort(key=lambda r: _BUNDLE_ORDER.index(r["resourceType"]))
    bundle = transaction_bundle(resources, send_patient=destination.send_patient)
    headers = {"Content-Type": FHIR_JSON, "Accept": FHIR_JSON, **auth_headers(destination)}
    auth = basic_auth(destination)
    try:
        with httpx.Client(timeout=destination.timeout_seconds, verify=destination.verify_tls) as client:
            response = client.post(destination.base_url, content=json.dumps(bundle).encode(), headers=headers,
                                   auth=auth)
    except httpx.TimeoutException as exc:
        raise RetryableError(f"{destination.name}: timed out after {destination.timeout_seconds}s",
                             f"{destination.name}: timed out after {destination.timeout_seconds}s ({exc})") from exc
    except httpx.HTTPError as exc:
        raise RetryableError(f"{destination.name}: {type(exc).__name__}",
                             f"{destination.name}: {type(exc).__name__}: {exc}") from exc
    check_response(destination.name, response)
    log.info("FHIR transaction of %d entries accepted by %s (study %s v%d, report %s)",
             len(bundle["entry"]), destination.name, scored.study_uid, scored.version, scored.report_id)


def auth_headers(destination) -> dict:
    """Bearer credentials of an HTTP destination (FHIR, DICOMweb), read from the environment now."""
    if destination.auth is not None and destination.auth.type == "bearer":
        return {"Authorization": f"Bearer {_secret(destination, destination.auth.token_env)}"}
    return {}


def basic_auth(destination) -> httpx.BasicAuth | None:
    """HTTP Basic credentials of an HTTP destination, the password read from the environment now."""
    if destination.auth is not None and destination.auth.type == "basic":
        return httpx.BasicAuth(destination.auth.username, _secret(destination, destination.auth.password_env))
    return None


def _secret(destination, variable: str) -> str:
    value = os.environ.get(variable, "")
    if not value:
        # Retrying cannot help until an operator sets it; `carina jobs retry` then resends.
        raise PermanentError(f"{destination.name}: environment variable {variable} (the credential) is not set")
    return value


def check_response(name: str, response: httpx.Response) -> None:
    status = response.status_code
    if 200 <= status < 300:
        failed = _failed_entries(response)
        if failed:
            raise PermanentError(f"{name} accepted the transaction but not every entry",
                                 f"{name} accepted the transaction but not every entry: {failed}")
        return
    # The server's text may echo the patient (name, birth date): detail only.
    code = f"{name} answered HTTP {status}"
    text = f"{code}: {outcome_text(response)}"
    if status >= 500 or status in RETRYABLE_STATUS:
        raise RetryableError(code, text)
    raise PermanentError(code, text)


def _failed_entries(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return ""  # some servers answer a transaction with an empty 200; nothing to check
    if not isinstance(body, dict) or body.get("resourceType") != "Bundle":
        return ""
    bad = []
    for entry in body.get("entry", []):
        status = str((entry.get("response") or {}).get("status", ""))
        if status and not status.startswith("2"):
            bad.append(f"{status}: {_outcome_diagnostics((entry.get('response') or {}).get('outcome'))}")
    return "; ".join(bad)


def outcome_text(response: httpx.Response) -> str:
    """The OperationOutcome's diagnostics/details, else the start of the body."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:500] or response.reason_phrase
    text = _outcome_diagnostics(body) if isinstance(body, dict) else ""
    return text or json.dumps(body)[:500]


def _outcome_diagnostics(outcome) -> str:
    if not isinstance(outcome, dict) or outcome.get("resourceType") != "OperationOutcome":
        return ""
    parts = []
    for issue in outcome.get("issue", []):
        detail = issue.get("diagnostics") or (issue.get("details") or {}).get("text") or ""
        parts.append(f"{issue.get('severity', '?')}/{issue.get('code', '?')}: {detail}".rstrip(": "))
    return "; ".join(parts)


# --- the Bundle -------------------------------------------------------------------------

def _query(system: str, value: str) -> str:
    # FHIR token syntax system|value; the '|' and ':' stay readable, the rest is escaped.
    return "identifier=" + quote(f"{system}|{value}", safe=":|/")


def _identifier(resource: dict, system: str) -> str | None:
    for identifier in resource.get("identifier") or []:
        if identifier.get("system") == system and identifier.get("value"):
            return identifier["value"]
    return None


def _rewrite_references(node, local: dict[str, str]):
    """Replace `Type/id` references to resources in the Bundle with their urn:uuid fullUrls."""
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key == "reference" and isinstance(value, str) and value in local:
                out[key] = local[value]
            else:
                out[key] = _rewrite_references(value, local)
        return out
    if isinstance(node, list):
        return [_rewrite_references(v, local) for v in node]
    return node


def transaction_bundle(resources: list[dict], *, send_patient: bool = False) -> dict:
    """The transaction Bundle for one report (see the module docstring for the requests)."""
    included = [r for r in resources if r["resourceType"] != "Patient" or send_patient]
    local = {f"{r['resourceType']}/{r['id']}": f"urn:uuid:{r['id']}" for r in included}
    entries = []
    for resource in included:
        rtype, rid = resource["resourceType"], resource["id"]
        body = copy.deepcopy(resource)
        # Security labels (AIAST) and tags travel; versionId/lastUpdated are the server's.
        meta = {k: v for k, v in (body.pop("meta", None) or {}).items() if k in ("security", "tag", "profile")}
        if meta:
            body["meta"] = meta
        if not send_patient:
            _drop_patient_reference(body)
        body = _rewrite_references(body, local)
        if rtype in ("DiagnosticReport", "Observation"):
            key = _identifier(resource, URI_SYSTEM)
            body.pop("id", None)  # conditional update: the server's match decides the id
            request = {"method": "PUT", "url": f"{rtype}?{_query(URI_SYSTEM, key)}"}
        elif rtype in ("Device", "ImagingStudy"):
            key = _identifier(resource, DICOM_UID_SYSTEM)
            body.pop("id", None)
            request = {"method": "POST", "url": rtype, "ifNoneExist": _query(DICOM_UID_SYSTEM, key)}
        elif rtype == "Patient":
            ident = resource["identifier"][0]
            body.pop("id", None)
            request = {"method": "POST", "url": "Patient", "ifNoneExist": _query(ident["system"], ident["value"])}
        elif rtype == "Provenance":
            request = {"method": "PUT", "url": f"Provenance/{rid}"}
        else:
            raise ValueError(f"no push rule for {rtype}")
        entries.append({"fullUrl": f"urn:uuid:{rid}", "resource": body, "request": request})
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


def _drop_patient_reference(body: dict) -> None:
    """Keep only the logical identifier: the EHR resolves its own patient."""
    for key in ("subject", "patient"):
        ref = body.get(key)
        if isinstance(ref, dict) and ref.get("reference", "").startswith("Patient/") and ref.get("identifier"):
            ref.pop("reference")
