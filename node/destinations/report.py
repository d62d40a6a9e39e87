"""What the FHIR and HL7 senders deliver, read back from what encode stored.

The stored FHIR resources are the single record of a report version (status,
issued, triage priority, critical findings); the HL7 message additionally
needs the patient demographics from the DICOM headers and the per-image
findings, which are re-read from the instance files and the Result row, so
nothing PHI-bearing is duplicated into new tables.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
from dataclasses import dataclass

from pydicom import dcmread
from sqlalchemy import select

from inference.types import Finding, ModelInfo
from node import fhir_store
from node.context import NodeContext
from node.db import InboundOrder, InboundPatient, Instance, Job, Result, Study
from node.jobs import PermanentError
from node.outputs import fhir_report
from node.outputs.study_facts import StudyFacts
from node.triage import Triage

log = logging.getLogger(__name__)


@dataclass
class StoredReport:
    study_id: int
    study_version: int
    calling_ae: str
    study_uid: str
    accession_number: str
    resources: list[dict]  # DiagnosticReport first, then what it references, then Provenance

    @property
    def report(self) -> dict:
        return self.resources[0]


def current_study(ctx: NodeContext, job: Job) -> Study | None:
    """The job's study if the job is for its current version, else None (superseded)."""
    with ctx.db.session() as s:
        study = s.get(Study, job.study_id)
        if study is None or study.version != job.study_version:
            return None
        s.expunge(study)
        return study


def report_to_send(ctx: NodeContext, job: Job, destination: str) -> tuple[Study, StoredReport] | None:
    """The study and its stored report for a deliver job; None when superseded.

    A newer study version has its own deliver job, so sending this one would
    only put an outdated report in front of the EHR."""
    study = current_study(ctx, job)
    if study is None:
        log.info("delivery to %s skipped: study id %d v%d was superseded", destination, job.study_id, job.study_version)
        return None
    stored = load_report(ctx, study)
    if stored is None:
        raise PermanentError(f"{destination}: no report stored for study id {job.study_id}")
    return study, stored


def load_report(ctx: NodeContext, study: Study) -> StoredReport | None:
    """The current DiagnosticReport and every resource it needs, or None if none is stored."""
    rid = fhir_report.report_id(study.calling_ae, study.study_uid)
    with ctx.db.session() as s:
        row = fhir_store.read_current(s, "DiagnosticReport", rid)
        if row is None:
            return None
        report = json.loads(row.body)
        wanted: list[tuple[str, str]] = []
        for ref in [*report.get("result", []), *report.get("imagingStudy", []), report.get("subject") or {}]:
            reference = ref.get("reference", "")
            if "/" in reference:
                wanted.append(tuple(reference.split("/", 1)))
        found = []
        for rtype, rid_ in wanted:
            current = fhir_store.read_current(s, rtype, rid_)
            if current is not None:
                found.append(json.loads(current.body))
        devices = {
            o["device"]["reference"].split("/", 1)[1]
            for o in found
            if o["resourceType"] == "Observation" and "device" in o
        }
        for device in sorted(devices):
            current = fhir_store.read_current(s, "Device", device)
            if current is not None:
                found.append(json.loads(current.body))
        provenance = fhir_store.read_current(
            s, "Provenance", fhir_report.provenance_id(study.calling_ae, study.study_uid, study.version)
        )
        if provenance is not None:
            found.append(json.loads(provenance.body))
    return StoredReport(study.id, study.version, study.calling_ae, study.study_uid, study.accession_number,
                        [report, *found])


@dataclass
class Hl7Inputs:
    facts: StudyFacts
    findings_by_image: dict[str, list[Finding]]
    model: ModelInfo
    status: str
    issued: dt.datetime
    triage: Triage
    order: InboundOrder | None
    patient_class: str = ""  # PV1-2 from an inbound ADT, when one was received


def hl7_inputs(ctx: NodeContext, study: Study, stored: StoredReport) -> Hl7Inputs:
    with ctx.db.session() as s:
        result = s.scalar(select(Result).where(Result.study_id == study.id, Result.version == study.version))
        if result is None:
            raise LookupError(f"no result for study id {study.id} v{study.version}")
        payload = json.loads(result.findings_json)
        paths = dict(s.execute(
            select(Instance.sop_instance_uid, Instance.path).where(
                Instance.study_id == study.id, Instance.sop_instance_uid.in_(list(payload))
            )
        ).all())
        order = None
        if study.accession_number:
            order = s.scalar(select(InboundOrder).where(InboundOrder.accession_number == study.accession_number))
            if order is not None:
                s.expunge(order)
    headers = [dcmread(paths[sop_uid], stop_before_pixels=True) for sop_uid in payload]
    facts = StudyFacts.from_datasets(headers)
    with ctx.db.session() as s:
        known = s.get(InboundPatient, facts.patient_id) if facts.patient_id else None
        if known is not None:
            s.expunge(known)
    if known is not None:
        # DICOM stays authoritative; the RIS only fills what the header left empty.
        facts = dataclasses.replace(
            facts,
            patient_name=facts.patient_name or known.name,
            patient_birth_date=facts.patient_birth_date or known.birth_date,
            patient_sex=facts.patient_sex or known.sex,
        )
    findings = {
        sop_uid: [Finding(f["label"], float(f["probability"]), float(f["threshold"]), bool(f["positive"]))
                  for f in item["findings"]]
        for sop_uid, item in payload.items()
    }
    stored_model = next(iter(payload.values()))["model"]
    model = ModelInfo(**{k: v for k, v in stored_model.items() if k in ModelInfo.__dataclass_fields__})
    report = stored.report
    return Hl7Inputs(
        facts=facts,
        findings_by_image=findings,
        model=model,
        status=report["status"],
        issued=dt.datetime.fromisoformat(report["issued"].replace("Z", "+00:00")),
        triage=stored_triage(stored),
        order=order,
        patient_class=known.patient_class if known is not None else "",
    )


def stored_triage(stored: StoredReport) -> Triage:
    """Priority and critical findings exactly as the stored FHIR report says."""
    priority, reason = "routine", ""
    for extension in stored.report.get("extension", []):
        if extension.get("url") == fhir_report.TRIAGE_PRIORITY_URL:
            concept = extension.get("valueCodeableConcept", {})
            priority = concept.get("coding", [{}])[0].get("code", "routine")
            reason = concept.get("text", "")
    critical = tuple(
        o["code"]["text"]
        for o in stored.resources
        if o["resourceType"] == "Observation"
        and any(c.get("code") == "AA" for i in o.get("interpretation", []) for c in i.get("coding", []))
    )
    return Triage(priority, critical, reason)
