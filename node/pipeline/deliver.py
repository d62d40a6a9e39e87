"""Stage 3: deliver a study version's results to one destination.

One `deliver` job runs per (study version, destination); this stage only
dispatches on the destination's type to its sender in `node/destinations/`:

- `dicom`: C-STORE the SR and heatmap SCs into the PACS;
- `fhir`:  POST a transaction Bundle with conditional create/update;
- `hl7`:   send an ORU^R01 over MLLP and wait for the ACK.

Each sender has a typed work value (`load` reads it from the database) and a
`send` that raises `RetryableError` (backoff, then dead-letter) or
`PermanentError` (dead-letter now, with the peer's reason).
"""
from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any

from sqlalchemy.orm import Session

from node.context import NodeContext
from node.db import Job, Study
from node.destinations import SENDERS
from node.jobs import PermanentError
from node.lease import check_lease


@dataclass(frozen=True)
class DeliverWork:
    sender: ModuleType  # one of node.destinations.SENDERS
    work: Any  # that sender's typed work value (DicomDelivery, FhirDelivery, Hl7Delivery)


def load(ctx: NodeContext, session: Session, study: Study, job: Job) -> DeliverWork:
    destination = next((d for d in ctx.settings.destinations if d.name == job.destination), None)
    if destination is None:
        raise PermanentError(f"destination {job.destination!r} is not configured")
    sender = SENDERS.get(destination.type)
    if sender is None:
        raise PermanentError(f"destination {destination.name!r}: no sender for type {destination.type!r}")
    return DeliverWork(sender, sender.load(ctx, session, study, destination))


def run(ctx: NodeContext, work: DeliverWork) -> None:
    check_lease()  # a worker whose lease was lost must not send: the new owner will
    work.sender.send(ctx, work.work)


def settle(ctx: NodeContext, session: Session, study: Study, outcome: None) -> None:
    """Nothing to record beyond the job itself: delivered is the job's DONE."""
