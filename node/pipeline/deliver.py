"""Stage 3: deliver a study version's results to one destination.

One `deliver` job runs per (study version, destination) once encode has
written the report, and one `deliver-sc` job per DICOM or DICOMweb
destination once capture has drawn the SCs; this stage only dispatches on
the destination's type to its sender in `node/destinations/`:

- `dicom`: C-STORE the DICOM outputs into the PACS;
- `dicomweb`: STOW-RS the same objects to a DICOMweb archive;
- `fhir`:  POST a transaction Bundle with conditional create/update;
- `hl7`:   send an ORU^R01 over MLLP and wait for the ACK.

Each sender has a typed work value (`load` reads it from the database) and a
`send` that raises `RetryableError` (backoff, then dead-letter) or
`PermanentError` (dead-letter now, with the peer's reason). Every attempt is
audited (110104 DICOM Instances Transferred or 110106 Export) with its outcome.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy.orm import Session

from node.audit import events
from node.audit.messages import MINOR_FAILURE, SERIOUS_FAILURE, SUCCESS
from node.context import NodeContext
from node.db import Job, Study
from node.destinations import OBJECT_DESTINATIONS, SENDERS
from node.jobs import PermanentError, StageError
from node.lease import check_lease
from node.states import Stage


@dataclass(frozen=True)
class DeliverWork:
    sender: ModuleType  # one of node.destinations.SENDERS
    work: Any  # that sender's typed work value (DicomDelivery, FhirDelivery, Hl7Delivery)
    destination: Any  # its configuration (node.config *Destination)
    study_uid: str = ""
    patient_id: str = ""  # for the audit record only


def load(ctx: NodeContext, session: Session, study: Study, job: Job) -> DeliverWork:
    destination = next((d for d in ctx.settings.destinations if d.name == job.destination), None)
    if destination is None:
        raise PermanentError(f"destination {job.destination!r} is not configured")
    sender = SENDERS.get(destination.type)
    if sender is None:
        raise PermanentError(f"destination {destination.name!r}: no sender for type {destination.type!r}")
    if job.stage == Stage.DELIVER_SC:
        if destination.type not in OBJECT_DESTINATIONS:
            raise PermanentError(f"destination {destination.name!r} ({destination.type}) takes no SCs")
        work = sender.load(ctx, session, study, destination, captures=True)
    else:
        work = sender.load(ctx, session, study, destination)
    return DeliverWork(sender, work, destination, study.study_uid, study.patient_id)


def run(ctx: NodeContext, work: DeliverWork) -> None:
    check_lease()  # a worker whose lease was lost must not send: the new owner will
    try:
        work.sender.send(ctx, work.work)
    except StageError as exc:
        _audit(ctx, work, SERIOUS_FAILURE if isinstance(exc, PermanentError) else MINOR_FAILURE, exc.code)
        raise
    except Exception as exc:
        _audit(ctx, work, MINOR_FAILURE, type(exc).__name__)
        raise
    _audit(ctx, work, SUCCESS)


def _audit(ctx: NodeContext, work: DeliverWork, outcome: int, why: str = "") -> None:
    d = work.destination
    if d.type == "dicom":
        peer_id, address = d.ae_title, d.host
    elif d.type in ("fhir", "dicomweb"):
        peer_id, address = d.base_url, urlsplit(d.base_url).hostname or ""
    else:
        peer_id, address = f"{d.host}:{d.port}", d.host
    events.delivery(ctx.audit, destination=d.name, kind=d.type, peer_id=peer_id, peer_address=address,
                    patient_id=work.patient_id, study_uid=work.study_uid, outcome=outcome, why=why)


def settle(ctx: NodeContext, session: Session, study: Study, outcome: None) -> None:
    """Nothing to record beyond the job itself: delivered is the job's DONE."""
