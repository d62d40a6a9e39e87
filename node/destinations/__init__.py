"""Per-type senders used by the deliver stage (node/pipeline/deliver.py).

Each sender is `send(ctx, job, destination) -> None` and raises
node.jobs.RetryableError or PermanentError; a normal return means delivered.
"""
from __future__ import annotations

from node.destinations import dicom, fhir, hl7

SENDERS = {
    "dicom": dicom.send,
    "fhir": fhir.send,
    "hl7": hl7.send,
}
