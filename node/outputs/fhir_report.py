"""FHIR R4 resources for one scored study: DiagnosticReport, 14 Observations,
the model's Device, the ImagingStudy they were derived from, the Provenance
of this AI run and (when the DICOM header names one) the Patient.

AI content follows the HL7 AI Transparency on FHIR IG: meta.security AIAST on
the report and observations, a Device whose type says AI, and a Provenance
whose author agent is that Device.

`presentedForm` is the printable report (node/outputs/pdf_report.py) as an
inline application/pdf attachment (`data`, with its size and SHA-1 hash), not
a `url`: an EHR files the attachment in the patient's chart, where it must
stay readable by every clinician who opens the chart, long after the node
has pruned the study and without a credential for the node's API. The PDF is
kept small for it (about 160 KB for two images, 220 KB in base64), well
within what FHIR servers accept in a transaction. `outputs.report_pdf.fhir`
switches it off.

Output is FHIR R4 (4.0.1) JSON. fhir.resources 8.x defaults to R5, and its
R4-compatible model package is `fhir.resources.R4B` (4.3.0): for every element
used here R4 and R4B are identical (notably `DiagnosticReport.imagingStudy`,
which R5 renamed to `study`), so each resource is validated with the R4B model
and a validation error fails the build loudly instead of reaching an EHR.

Ids are deterministic (UUID5), so a re-run updates the same resources; the
version lives in meta.versionId and is assigned by node.fhir_store.
"""
from __future__ import annotations

import base64
import datetime as dt
import hashlib

from fhir.resources.R4B.device import Device
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.imagingstudy import ImagingStudy
from fhir.resources.R4B.observation import Observation
from fhir.resources.R4B.patient import Patient
from fhir.resources.R4B.provenance import Provenance

from inference.types import DEMO_WARNING, Finding, ModelInfo
from node.outputs import uids
from node.outputs.equipment import device_uid
from node.outputs.names import FHIR_GENDER, PersonName, fhir_birth_date
from node.report import device_id, imaging_study_id, observation_id, patient_id, provenance_id
from node.scored_study import ScoredStudy
from node.study_facts import SourceImage
from node.terminology import load_terminology, procedure_coding

DICOM_UID_SYSTEM = "urn:dicom:uid"
URI_SYSTEM = "urn:ietf:rfc:3986"  # identifier system whose value is a URI (here urn:uuid:<id>)
DCM_SYSTEM = "http://dicom.nema.org/resources/ontology/DCM"
UCUM = "http://unitsofmeasure.org"
# Carina's own extension carrying the AI triage priority on a DiagnosticReport
# (R4 has no DiagnosticReport.priority). Defined in
# fhir/StructureDefinition-carina-triage-priority.json.
TRIAGE_PRIORITY_URL = "http://carina.local/fhir/StructureDefinition/ai-triage-priority"


def uuid_identifier(resource_id_: str) -> dict:
    """The stable business identifier every Carina resource carries: its id as a URN.

    Ids are deterministic per study (not per version), so this identifier is
    the key for conditional create/update when the resources are pushed."""
    return {"system": URI_SYSTEM, "value": f"urn:uuid:{resource_id_}"}


def pdf_attachment(pdf: bytes, study: ScoredStudy) -> dict:
    """The printable report as a FHIR Attachment (R4: hash is the base64 SHA-1)."""
    return {
        "contentType": "application/pdf",
        "language": "en",
        "data": base64.b64encode(pdf).decode("ascii"),
        "size": len(pdf),
        "hash": base64.b64encode(hashlib.sha1(pdf).digest()).decode("ascii"),
        "title": f"Carina AI chest X-ray report, version {study.version}",
        "creation": _instant(study.issued),
    }


def build_report_resources(study: ScoredStudy, *, patient_system: str,
                           presented_form: dict | None = None) -> list[dict]:
    """[DiagnosticReport, Observation x14, Device, ImagingStudy, Provenance,
    Patient (only with a PatientID)] as R4 JSON dicts.

    Each Observation is the study-level result for its label: the image with
    the highest probability (a finding seen on any view is a finding of the
    study). The triage priority becomes the report's priority extension and
    marks the critical findings AA. `presented_form` (`pdf_attachment`) is the
    report's rendered PDF, when there is one.
    """
    ctx = _Context(study, patient_system)
    observations = [
        _observation(ctx, label, finding, study.source(sop_uid)) for label, (sop_uid, finding) in study.strongest.items()
    ]
    sr_uid = uids.sr_instance_uid([img.sop_instance_uid for img in study.facts.images], study.model.ref, study.version,
                                  *study.output_uid_qualifiers())
    report = _diagnostic_report(ctx, observations, sr_uid, presented_form)
    resources = [
        report,
        *observations,
        _device(study.model),
        _imaging_study(ctx),
        _provenance(ctx, report, observations, study.version),
    ]
    patient = _patient(ctx)
    if patient is not None:
        resources.append(patient)
    for resource in resources:
        validate(resource)
    return resources


_MODELS = {
    "DiagnosticReport": DiagnosticReport,
    "Observation": Observation,
    "Device": Device,
    "ImagingStudy": ImagingStudy,
    "Provenance": Provenance,
    "Patient": Patient,
}


def validate(resource: dict) -> None:
    """Raise pydantic.ValidationError unless `resource` is valid R4(B) JSON."""
    _MODELS[resource["resourceType"]].model_validate(resource)


class _Context:
    """What every resource of one study shares."""

    def __init__(self, study: ScoredStudy, patient_system: str):
        self.study = study
        self.facts, self.model, self.status = study.facts, study.model, str(study.status)
        self.issued = _instant(study.issued)
        self.terms = load_terminology()
        self.effective = dicom_datetime(self.facts.study_date, self.facts.study_time)
        self.patient_system = patient_system
        self.subject = patient_reference(patient_system, self.facts.patient_id)
        self.study_ref = {"reference": f"ImagingStudy/{imaging_study_id(study.calling_ae, self.facts.study_uid)}"}
        self.device_ref = {"reference": f"Device/{device_id(study.model)}"}
        self.calling_ae = study.calling_ae
        self.triage = study.triage
        self.ai_asserted = self.terms.fhir["ai_asserted"].fhir()


def _diagnostic_report(ctx: _Context, observations: list[dict], sr_uid: str, presented_form: dict | None) -> dict:
    positives = ctx.study.positives
    based_on = [{"type": "ServiceRequest", "identifier": _accession(ctx)}] if ctx.facts.accession_number else None
    codes = [
        {"coding": [ctx.terms.finding(f.label).snomed.fhir()], "text": ctx.terms.finding(f.label).display}
        for f in positives
    ]
    rid = ctx.study.report_id
    return _present({
        "resourceType": "DiagnosticReport",
        "id": rid,
        "meta": {"security": [ctx.ai_asserted]},
        "extension": [_triage_extension(ctx)],
        # The report is the FHIR face of the TID 1500 SR Carina sends to PACS
        # (IHE AIR), so its first business identifier is that SR's SOP
        # Instance UID: an EHR can fetch the matching DICOM object. The study
        # UID would collide with the radiologist's own report of the same
        # study. The SR UID changes with each re-run, so a second identifier,
        # stable across versions, keys conditional updates on push.
        "identifier": [{"system": DICOM_UID_SYSTEM, "value": f"urn:oid:{sr_uid}"}, uuid_identifier(rid)],
        "basedOn": based_on,
        "status": ctx.status,
        "category": [{"coding": [ctx.terms.report["category"].fhir(), ctx.terms.fhir["radiology_section"].fhir()]}],
        # The procedure's LOINC code, then the LOINC document code for a
        # diagnostic imaging report (18748-4, the SR document title): the same
        # report at two granularities, so an EHR filing by either finds it.
        "code": {"coding": [_procedure_code(ctx).fhir(), ctx.terms.report["sr_title"].fhir()]},
        "subject": ctx.subject,
        "effectiveDateTime": ctx.effective,
        "issued": ctx.issued,
        "result": [{"reference": f"Observation/{o['id']}"} for o in observations],
        "imagingStudy": [ctx.study_ref],
        "conclusion": ctx.study.conclusion,
        "conclusionCode": codes or None,
        "presentedForm": [presented_form] if presented_form else None,
    })


def _triage_extension(ctx: _Context) -> dict:
    triage = ctx.triage
    return {
        "url": TRIAGE_PRIORITY_URL,
        "valueCodeableConcept": {
            "coding": [ctx.terms.priority[triage.priority]["fhir"].fhir()],
            "text": triage.reason or triage.priority,
        },
    }


def _present(resource: dict) -> dict:
    """Drop absent elements (FHIR forbids nulls) and keep the rest in R4 order."""
    return {key: value for key, value in resource.items() if value is not None}


def _procedure_code(ctx: _Context):
    return procedure_coding(ctx.terms, [img.view_position or img.sop_instance_uid for img in ctx.facts.images])


def _observation(ctx: _Context, label: str, finding: Finding, image: SourceImage) -> dict:
    codes = ctx.terms.finding(label)
    coding = [codes.snomed.fhir()] + ([codes.radlex.fhir()] if codes.radlex else [])
    view = f", {image.view_position}" if image.view_position else ""
    notes = [f"Study-level result: highest probability of the scored images, on SOP Instance {image.sop_instance_uid}{view}."]
    if ctx.model.demo:
        notes.insert(0, f"{DEMO_WARNING}.")
    oid = observation_id(ctx.calling_ae, ctx.facts.study_uid, label)
    verdict = ctx.terms.interpretation["positive" if finding.positive else "negative"]["fhir"].fhir()
    interpretation = [{"coding": [verdict]}]
    if label in ctx.triage.critical:
        interpretation.append({"coding": [ctx.terms.interpretation["critical"]["fhir"].fhir()]})
    return _present({
        "resourceType": "Observation",
        "id": oid,
        "meta": {"security": [ctx.ai_asserted]},
        "identifier": [uuid_identifier(oid)],
        "status": ctx.status,
        "category": [{"coding": [ctx.terms.fhir["imaging_category"].fhir()]}],
        "code": {"coding": coding, "text": label},
        "subject": ctx.subject,
        "effectiveDateTime": ctx.effective,
        "issued": ctx.issued,
        # UCUM "1" (dimensionless): the value is the model's sigmoid output as
        # is, 0..1, the same number the SR carries - no rescaling to percent.
        "valueQuantity": _probability(finding.probability),
        "interpretation": interpretation,
        "note": [{"text": text} for text in notes],
        "bodySite": {"coding": [ctx.terms.sr["body_site"].fhir()]},
        "device": ctx.device_ref,
        "derivedFrom": [ctx.study_ref],
        # The threshold is the model's operating point (DICOM CAD Operating
        # Point), not a normal range, so it goes in a component.
        "component": [
            {
                "code": {"coding": [ctx.terms.fhir["operating_point"].fhir()]},
                "valueQuantity": _probability(finding.threshold),
            }
        ],
    })


def _probability(value: float) -> dict:
    return {"value": round(float(value), 4), "unit": "probability", "system": UCUM, "code": "1"}


def _device(model: ModelInfo) -> dict:
    terms = load_terminology()
    versions = [{"type": {"text": "model version"}, "value": model.version}]
    if model.weights_sha256:
        versions.append({"type": {"text": "weights SHA-256"}, "value": model.weights_sha256})
    device = {
        "resourceType": "Device",
        "id": device_id(model),
        # IHE AIR: one Device UID per model (changes whenever the model does),
        # the same UID the SR's Contributing Equipment Sequence carries.
        "identifier": [{"system": DICOM_UID_SYSTEM, "value": f"urn:oid:{device_uid(model)}"}],
        "status": "active",
        "deviceName": [{"name": model.name, "type": "model-name"}],
        # AI Transparency IG AIDevice type first, then DICOM's concept for AI.
        "type": {
            "coding": [terms.fhir["ai_device_type"].fhir(), terms.fhir["device_type"].fhir()],
            "text": "AI software: chest X-ray finding classifier",
        },
        "version": versions,
    }
    for member in model.members:  # an ensemble names every member (single models: none)
        device["deviceName"].append({"name": f"ensemble member {member.ref}", "type": "other"})
        versions.append({"type": {"text": f"ensemble member {member.name}"}, "value": member.version})
        if member.weights_sha256:
            versions.append({"type": {"text": f"ensemble member {member.ref} weights SHA-256"},
                             "value": member.weights_sha256})
    if model.demo:
        device["note"] = [{"text": f"{DEMO_WARNING}: demonstration weights, not a validated model."}]
    return device


def _imaging_study(ctx: _Context) -> dict:
    facts = ctx.facts
    series: dict[str, list[SourceImage]] = {}
    for img in facts.images:
        series.setdefault(img.series_uid, []).append(img)
    modalities = sorted({img.modality for img in facts.images if img.modality})
    identifiers = [{"system": DICOM_UID_SYSTEM, "value": f"urn:oid:{facts.study_uid}"}]
    if facts.accession_number:
        identifiers.append(_accession(ctx))
    return _present({
        "resourceType": "ImagingStudy",
        "id": imaging_study_id(ctx.calling_ae, facts.study_uid),
        "identifier": identifiers,
        "status": "available",
        "modality": [{"system": DCM_SYSTEM, "code": m} for m in modalities] or None,
        # R4 makes subject mandatory; without a PatientID only a display is honest.
        "subject": ctx.subject or {"display": "unknown patient (no DICOM PatientID)"},
        "started": ctx.effective,
        "numberOfSeries": len(series),
        "numberOfInstances": len(facts.images),
        "description": facts.study_description or None,
        "series": [_series(uid, imgs) for uid, imgs in series.items()],
    })


def _series(series_uid: str, images: list[SourceImage]) -> dict:
    first = images[0]
    return _present({
        "uid": series_uid,
        "number": first.series_number,
        "modality": {"system": DCM_SYSTEM, "code": first.modality or "OT"},
        "description": first.series_description or None,
        "numberOfInstances": len(images),
        "instance": [
            _present({
                "uid": img.sop_instance_uid,
                "sopClass": {"system": "urn:ietf:rfc:3986", "code": f"urn:oid:{img.sop_class_uid}"},
                "number": img.instance_number,
            })
            for img in images
        ],
    })


def _accession(ctx: _Context) -> dict:
    # No issuer of the accession number is known to the node, so no system.
    return {"type": {"coding": [ctx.terms.fhir["accession_type"].fhir()]}, "value": ctx.facts.accession_number}


def patient_reference(patient_system: str, patient_value: str) -> dict | None:
    """Literal reference to Carina's Patient view plus the logical identifier.

    The identifier is what a receiving EHR resolves (it owns its patients);
    the literal reference serves `_include=DiagnosticReport:subject` here and
    is dropped when the report is pushed (node/destinations/fhir.py)."""
    if not patient_value:
        return None
    return {
        "reference": f"Patient/{patient_id(patient_system, patient_value)}",
        "identifier": {"system": patient_system, "value": patient_value},
    }


def _patient(ctx: _Context) -> dict | None:
    """The patient as the DICOM header describes it; the EHR stays the master."""
    facts = ctx.facts
    if not facts.patient_id:
        return None
    name = PersonName.from_dicom(facts.patient_name).fhir()
    return _present({
        "resourceType": "Patient",
        "id": patient_id(ctx.patient_system, facts.patient_id),
        "identifier": [{"system": ctx.patient_system, "value": facts.patient_id}],
        "name": [name] if name else None,
        "gender": FHIR_GENDER.get(facts.patient_sex.upper()) if facts.patient_sex else None,
        "birthDate": fhir_birth_date(facts.patient_birth_date),
    })


def _provenance(ctx: _Context, report: dict, observations: list[dict], study_version: int) -> dict:
    """AI Transparency IG AIProvenance: who (the AI Device) made what (report +
    observations) from what (the ImagingStudy), when and why (AIAST)."""
    terms = ctx.terms
    activity = terms.fhir["data_create" if study_version <= 1 else "data_update"]
    return {
        "resourceType": "Provenance",
        "id": provenance_id(ctx.calling_ae, ctx.facts.study_uid, study_version),
        "target": [{"reference": f"DiagnosticReport/{report['id']}"}]
        + [{"reference": f"Observation/{o['id']}"} for o in observations],
        "recorded": ctx.issued,
        "reason": [{"coding": [ctx.ai_asserted]}],
        "activity": {"coding": [activity.fhir()], "text": f"AI inference run {study_version}"},
        "agent": [
            {
                "type": {"coding": [terms.fhir["provenance_author"].fhir()]},
                "role": [{"coding": [terms.fhir["ai_device_type"].fhir()]}],
                "who": dict(ctx.device_ref),
            }
        ],
        "entity": [{"role": terms.fhir["provenance_source"].code, "what": dict(ctx.study_ref)}],
    }


def dicom_datetime(date: str, time: str) -> str | None:
    """DICOM DA/TM -> FHIR dateTime. DICOM times are site-local and carry no
    offset; FHIR requires one with a time, so the node's local offset is used."""
    date = (date or "").strip()
    if len(date) != 8 or not date.isdigit():
        return None
    day = dt.date(int(date[:4]), int(date[4:6]), int(date[6:]))
    clock = (time or "").replace(":", "").strip()
    whole, _, fraction = clock.partition(".")
    if not whole.isdigit() or len(whole) not in (2, 4, 6):
        return day.isoformat()
    hh, mm, ss = int(whole[0:2]), int(whole[2:4] or 0), int(whole[4:6] or 0)
    micro = int((fraction + "000000")[:6]) if fraction.isdigit() else 0
    local = dt.datetime(day.year, day.month, day.day, hh, mm, min(ss, 59), micro).astimezone()
    return local.isoformat(timespec="milliseconds" if micro else "seconds")


def _instant(value: dt.datetime) -> str:
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.timezone.utc)  # naive instants are taken as UTC
    return value.isoformat(timespec="milliseconds")
