"""Stage 3: deliver a study version's results to one destination.

One `deliver` job runs per (study version, destination); this stage only
dispatches on the destination's type to its sender in `node/destinations/`:

- `dicom`: C-STORE the SR and heatmap SCs into the PACS;
- `fhir`:  POST a transaction Bundle with conditional create/update;
- `hl7`:   send an ORU^R01 over MLLP and wait for the ACK.

Every sender raises `RetryableError` (backoff, then dead-letter) or
`PermanentError` (dead-letter now, with the peer's reason) on failure.
"""
from __future__ import annotations

from node.context import NodeContext
from node.db import Job
from node.destinations import SENDERS
from node.jobs import PermanentError


def run(ctx: NodeContext, job: Job) -> None:
    destination = next((d for d in ctx.settings.destinations if d.name == job.destination), None)
    if destination is None:
        raise PermanentError(f"destination {job.destination!r} is not configured")
    sender = SENDERS.get(destination.type)
    if sender is None:
        raise PermanentError(f"destination {destination.name!r}: no sender for type {destination.type!r}")
    sender(ctx, job, destination)
