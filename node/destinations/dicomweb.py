"""DICOMweb destinations: STOW-RS a study version's outputs to a PACS or cloud archive.

The same objects as a DICOM destination (node/destinations/dicom.py `load`:
the report's objects, the SR first, in a `deliver` job; the SCs in a
`deliver-sc` job), POSTed in one
multipart/related; type="application/dicom" request to
`<base_url>/studies/<StudyInstanceUID>`, streamed from the files. The
credentials come from the environment variables the configuration names, as
for FHIR destinations.

The answer decides, with the DIMSE rules:
- HTTP 200: delivered;
- 202 or 409 with a FailedSOPSequence: each FailureReason is a DICOM status;
  when every one is permanent (0xA9xx, 0xCxxx, 0x0122: the archive will not
  change its mind) the job goes to dead-letter now, else it retries;
- 5xx, 408, 429, timeouts, refused connections: retry with backoff;
- any other 4xx: dead-letter (the archive refuses the request itself).
As everywhere, `last_error` is a class and a code; the per-object statuses
and the server's text go to the admin-only error detail.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import httpx
from sqlalchemy.orm import Session

from node.config import DicomWebDestination
from node.context import NodeContext
from node.db import Study
from node.destinations import dicom as dimse
from node.destinations.fhir import RETRYABLE_STATUS, auth_headers, basic_auth
from node.dicomweb.multipart import new_boundary, parts_length, stream_parts
from node.jobs import PermanentError, RetryableError

log = logging.getLogger(__name__)

DICOM = "application/dicom"


@dataclass(frozen=True)
class DicomWebDelivery:
    destination: DicomWebDestination
    study_uid: str
    version: int
    paths: tuple[Path, ...]


def load(ctx: NodeContext, session: Session, study: Study, destination: DicomWebDestination,
         captures: bool = False) -> DicomWebDelivery:
    objects = dimse.load(ctx, session, study, destination, captures)  # the same objects, in the same order
    return DicomWebDelivery(destination, study.study_uid, study.version, objects.paths)


def send(ctx: NodeContext, work: DicomWebDelivery) -> None:
    destination = work.destination
    url = f"{destination.base_url}/studies/{work.study_uid}"
    boundary = new_boundary()
    parts = [(path, DICOM) for path in work.paths]
    headers = {"Content-Type": f'multipart/related; type="{DICOM}"; boundary={boundary}',
               "Content-Length": str(parts_length(parts, boundary)),
               "Accept": "application/dicom+json", **auth_headers(destination)}
    body = stream_parts(parts, boundary)
    try:
        with httpx.Client(timeout=destination.timeout_seconds, verify=destination.verify_tls) as client:
            response = client.post(url, content=body, headers=headers, auth=basic_auth(destination))
    except httpx.TimeoutException as exc:
        raise RetryableError(f"{destination.name}: timed out after {destination.timeout_seconds}s",
                             f"{destination.name}: timed out ({exc})") from exc
    except httpx.HTTPError as exc:
        raise RetryableError(f"{destination.name}: {type(exc).__name__}",
                             f"{destination.name}: {type(exc).__name__}: {exc}") from exc
    check_response(destination.name, response, len(work.paths))
    log.info("STOW-RS of %d objects accepted by %s (study %s v%d)", len(work.paths), destination.name,
             work.study_uid, work.version)


def failures(response: httpx.Response) -> dict[str, int]:
    """SOP Instance UID -> FailureReason of a Store Instances Response (empty when none or unreadable)."""
    try:
        body = response.json()
    except ValueError:
        return {}
    if isinstance(body, list) and body:  # some servers wrap the response dataset in an array
        body = body[0]
    if not isinstance(body, dict):
        return {}
    out = {}
    for item in (body.get("00081198") or {}).get("Value") or []:
        uid = ((item.get("00081155") or {}).get("Value") or ["?"])[0]
        reason = ((item.get("00081197") or {}).get("Value") or [0xFFFF])[0]
        out[str(uid)] = int(reason)
    return out


def check_response(name: str, response: httpx.Response, sent: int) -> None:
    status = response.status_code
    if status == 200:
        return
    failed = failures(response) if status in (202, 409) else {}
    if failed:
        detail = ", ".join(f"{uid}=0x{reason:04X}" for uid, reason in sorted(failed.items()))
        reasons = ", ".join(sorted({f"0x{reason:04X}" for reason in failed.values()}))
        summary = f"{len(failed)} of {sent} objects, DICOM status {reasons}"
        if all(dimse.is_permanent(reason) for reason in failed.values()):
            raise PermanentError(f"{name} refused: {summary}", f"{name} refused: {detail}")
        raise RetryableError(f"{name} did not store: {summary}", f"{name} did not store: {detail}")
    if status == 202:
        return  # stored, with warnings only
    code = f"{name} answered HTTP {status}"
    text = f"{code}: {response.text[:500]}"
    if status >= 500 or status in RETRYABLE_STATUS:
        raise RetryableError(code, text)
    raise PermanentError(code, text)
