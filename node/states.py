"""The states of studies, instances and jobs, and the names of stages and outputs.

`StrEnum`s: a member *is* its string, so the database keeps plain text
columns (portable between SQLite and PostgreSQL, readable by an operator's
SQL) while the code can only name states that exist.
"""
from __future__ import annotations

from enum import StrEnum


class StudyState(StrEnum):
    RECEIVED = "received"  # instances still arriving (or a late one reopened it)
    PROCESSING = "processing"  # complete; the pipeline runs its current version
    DONE = "done"  # results encoded; deliveries run per destination
    IGNORED = "ignored"  # nothing the model may score
    FAILED = "failed"  # scoring or encoding gave up; `reason` says why


class InstanceState(StrEnum):
    STORED = "stored"  # durably received, not yet assessed
    SCORED = "scored"  # the model scored it
    IGNORED = "ignored"  # a routing rule excluded it; `reason` names the rule
    FAILED = "failed"  # unreadable or undecodable; `reason` says why


# Instances the infer stage (re)assesses when a study version runs.
SCOREABLE_INSTANCE_STATES = (InstanceState.STORED, InstanceState.SCORED)


class JobState(StrEnum):
    PENDING = "pending"  # waiting for `run_after`
    RUNNING = "running"  # claimed under a lease
    DONE = "done"
    DEAD = "dead"  # dead-letter: retries exhausted or a permanent error


class Stage(StrEnum):
    INFER = "infer"
    ENCODE = "encode"  # the report: SR, GSPS, SEG, PDF, FHIR (node/pipeline/encode.py)
    CAPTURE = "capture"  # the heatmap SCs, drawn while the report is delivered (node/pipeline/capture.py)
    DELIVER = "deliver"  # the report's objects (or FHIR, HL7) to one destination
    DELIVER_SC = "deliver-sc"  # the SCs to one DICOM or DICOMweb destination


# The stages that send to a destination (Job.destination is set): one
# "delivery" per destination in every view that shows deliveries.
DELIVERY_STAGES = (Stage.DELIVER, Stage.DELIVER_SC)


class OutputKind(StrEnum):
    SR = "sr"  # TID 1500 Comprehensive 3D SR
    SC = "sc"  # heatmap Secondary Capture
    SEG = "seg"  # DICOM Segmentation, one segment per drawn finding
    GSPS = "gsps"  # Grayscale Softcopy Presentation State, one graphic layer per drawn finding
    PDF = "pdf"  # Encapsulated PDF: the printable report (node/outputs/pdf_report.py)


class Priority(StrEnum):
    """A study's AI triage priority, lowest first: it only ever moves up (node/triage.py)."""

    ROUTINE = "routine"
    STAT = "stat"

    @property
    def rank(self) -> int:
        return list(Priority).index(self)


class FeedbackVerdict(StrEnum):
    """A radiologist's verdict on one AI finding (node/feedback.py)."""

    AGREE = "agree"  # the model's verdict (positive or negative) is right
    DISAGREE = "disagree"  # it is wrong: the truth is the opposite
    UNCERTAIN = "uncertain"  # cannot tell: excluded from every labelled set
