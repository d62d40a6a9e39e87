"""Per-type senders used by the deliver stage (node/pipeline/deliver.py).

Each sender module has `load(ctx, session, study, destination) -> Work`,
reading what it sends from the database (the study's `ScoredStudy` or its
output files; the DICOM and DICOMweb senders take `captures=True` for a
`deliver-sc` job, which sends the SCs), and `send(ctx, work) -> None`, which raises
node.jobs.RetryableError or PermanentError; a normal return means delivered.
"""
from __future__ import annotations

from node.destinations import dicom, dicomweb, fhir, hl7

# Destination types that take DICOM objects, and so the SCs (deliver-sc);
# the others (FHIR, HL7) carry the report only.
OBJECT_DESTINATIONS = ("dicom", "dicomweb")

SENDERS = {
    "dicom": dicom,
    "dicomweb": dicomweb,
    "fhir": fhir,
    "hl7": hl7,
}
