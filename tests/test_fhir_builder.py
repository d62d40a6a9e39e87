"""node.outputs.fhir_report: R4 resources for one scored study."""
from __future__ import annotations

import copy
import datetime as dt
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydantic
import pytest
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.device import Device
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.imagingstudy import ImagingStudy
from fhir.resources.R4B.observation import Observation
from fhir.resources.R4B.patient import Patient
from fhir.resources.R4B.provenance import Provenance

from dicom_factory import make_dx
from inference.types import CHESTXRAY14, DEMO_WARNING, Finding, ModelInfo
from node.outputs import uids
from node.outputs.fhir_report import TRIAGE_PRIORITY_URL, build_report_resources, dicom_datetime, validate
from node.report import Triage, device_id, patient_id
from node.terminology import load_terminology
from scored_factory import scored_from_findings

PIXELS = np.full((32, 32), 128, dtype=np.uint8)  # the builder never looks at pixels
ISSUED = dt.datetime(2026, 11, 21, 10, 0, tzinfo=dt.timezone.utc)
PATIENT_SYSTEM = "urn:oid:1.2.826.0.1.3680043.10.1249.1"
DEMO = ModelInfo("densenet121-res224-all", "demo-seed0", demo=True)
REAL = ModelInfo("densenet121-res224-all", "2.0.0", demo=False, weights_sha256="ab" * 32)
R4B = {"DiagnosticReport": DiagnosticReport, "Observation": Observation, "Device": Device, "ImagingStudy": ImagingStudy,
       "Provenance": Provenance, "Patient": Patient}


def findings(probabilities: dict[str, float], threshold: float = 0.5) -> list[Finding]:
    out = []
    for label in CHESTXRAY14:
        p = probabilities.get(label, 0.05)
        out.append(Finding(label=label, probability=p, threshold=threshold, positive=p >= threshold))
    return out


def build(datasets, per_image, model=DEMO, *, study_version=1, **kw):
    study = scored_from_findings(datasets, per_image, model, version=study_version, issued=ISSUED, **kw)
    return study.facts, build_report_resources(study, patient_system=PATIENT_SYSTEM)


def by_type(resources, rtype):
    return [r for r in resources if r["resourceType"] == rtype]


@pytest.fixture
def pa_study():
    ds = make_dx(PIXELS, view_position="PA")
    return [ds], {ds.SOPInstanceUID: findings({"Effusion": 0.87, "Cardiomegaly": 0.62})}


def test_resources_are_valid_r4_with_fourteen_observations(pa_study):
    datasets, per_image = pa_study
    _, resources = build(datasets, per_image)
    counts = {t: len(by_type(resources, t)) for t in R4B}
    assert counts == {"DiagnosticReport": 1, "Observation": 14, "Device": 1, "ImagingStudy": 1, "Provenance": 1,
                      "Patient": 1}
    for resource in resources:
        model = R4B[resource["resourceType"]].model_validate(resource)
        # Round-trips without losing data: what we send is what the model understood.
        assert json.loads(model.model_dump_json(exclude_none=True))["id"] == resource["id"]
    observations = by_type(resources, "Observation")
    terms = load_terminology()
    assert [o["code"]["text"] for o in observations] == list(CHESTXRAY14)
    for obs in observations:
        assert obs["code"]["coding"][0] == terms.finding(obs["code"]["text"]).snomed.fhir()
        assert obs["valueQuantity"]["system"] == "http://unitsofmeasure.org" and obs["valueQuantity"]["code"] == "1"
        assert obs["component"][0]["valueQuantity"]["value"] == 0.5
        assert obs["device"]["reference"] == f"Device/{by_type(resources, 'Device')[0]['id']}"
    # The resources also travel together as a valid Bundle.
    Bundle.model_validate({"resourceType": "Bundle", "type": "collection", "entry": [{"resource": r} for r in resources]})


def test_report_content(pa_study):
    datasets, per_image = pa_study
    facts, resources = build(datasets, per_image)
    report = by_type(resources, "DiagnosticReport")[0]
    study = by_type(resources, "ImagingStudy")[0]
    observations = by_type(resources, "Observation")
    assert [c["code"] for c in report["code"]["coding"]] == ["36554-4", "18748-4"]  # procedure, then document
    assert report["imagingStudy"] == [{"reference": f"ImagingStudy/{study['id']}"}]
    assert "study" not in report  # the R5 name
    assert [r["reference"] for r in report["result"]] == [f"Observation/{o['id']}" for o in observations]
    assert report["subject"] == {
        "reference": f"Patient/{patient_id(PATIENT_SYSTEM, 'CARINA-TEST-001')}",
        "identifier": {"system": PATIENT_SYSTEM, "value": "CARINA-TEST-001"},
    }
    assert report["effectiveDateTime"].startswith("2026-11-21T09:30:00")
    assert report["issued"].startswith("2026-11-21T10:00:00")
    assert report["status"] == "preliminary"
    categories = {(c["system"], c["code"]) for c in report["category"][0]["coding"]}
    assert categories == {("http://loinc.org", "LP29684-5"), ("http://terminology.hl7.org/CodeSystem/v2-0074", "RAD")}
    assert report["basedOn"][0]["identifier"]["value"] == "ACC0001"
    assert report["basedOn"][0]["type"] == "ServiceRequest"
    sr_uid = uids.sr_instance_uid([facts.images[0].sop_instance_uid], DEMO.ref, 1)
    assert report["identifier"] == [
        {"system": "urn:dicom:uid", "value": f"urn:oid:{sr_uid}"},
        {"system": "urn:ietf:rfc:3986", "value": f"urn:uuid:{report['id']}"},  # stable across versions
    ]
    for obs in observations:
        assert obs["identifier"] == [{"system": "urn:ietf:rfc:3986", "value": f"urn:uuid:{obs['id']}"}]
    assert "presentedForm" not in report  # no PDF is rendered, so none is claimed
    assert [c["coding"][0]["code"] for c in report["conclusionCode"]] == ["60046008", "8186001"]
    assert "Pleural effusion (87%)" in report["conclusion"] and "Cardiomegaly (62%)" in report["conclusion"]
    positives = {o["code"]["text"] for o in observations if o["interpretation"][0]["coding"][0]["code"] == "POS"}
    assert positives == {"Effusion", "Cardiomegaly"}
    assert study["identifier"][0] == {"system": "urn:dicom:uid", "value": f"urn:oid:{facts.study_uid}"}
    instance = study["series"][0]["instance"][0]
    assert instance["sopClass"] == {"system": "urn:ietf:rfc:3986", "code": "urn:oid:1.2.840.10008.5.1.4.1.1.1.1"}
    assert study["series"][0]["modality"]["code"] == "DX"


def test_ai_asserted_and_demo_caveat_everywhere(pa_study):
    datasets, per_image = pa_study
    _, resources = build(datasets, per_image)
    aiast = {"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "AIAST"}
    for resource in by_type(resources, "DiagnosticReport") + by_type(resources, "Observation"):
        labels = [{k: s[k] for k in ("system", "code")} for s in resource["meta"]["security"]]
        assert aiast in labels, resource["id"]
    report = by_type(resources, "DiagnosticReport")[0]
    assert report["conclusion"].startswith("DEMO WEIGHTS — NOT FOR CLINICAL USE.")
    for obs in by_type(resources, "Observation"):
        assert any(DEMO_WARNING in n["text"] for n in obs["note"])
    device = by_type(resources, "Device")[0]
    assert any(DEMO_WARNING in n["text"] for n in device["note"])


def test_real_weights_carry_no_demo_caveat(pa_study):
    datasets, per_image = pa_study
    _, resources = build(datasets, per_image, model=REAL)
    assert DEMO_WARNING not in json.dumps(resources, ensure_ascii=False)
    device = by_type(resources, "Device")[0]
    assert device["identifier"][0]["value"] == f"urn:oid:{uids.device_uid(REAL.name, REAL.version, REAL.weights_sha256)}"
    assert {v["value"] for v in device["version"]} == {"2.0.0", "ab" * 32}
    # AI Transparency IG AIDevice type, and DICOM's concept for AI.
    assert [(c["system"], c["code"]) for c in device["type"]["coding"]] == [
        ("http://hl7.org/fhir/uv/aitransparency/CodeSystem/AIdeviceTypeCS", "Artificial-Intelligence"),
        ("http://dicom.nema.org/resources/ontology/DCM", "123110"),
    ]


def test_ids_are_deterministic_and_keyed_by_route(pa_study):
    datasets, per_image = pa_study
    _, first = build(datasets, per_image)
    _, again = build(datasets, per_image)
    assert first == again
    _, amended = build(datasets, per_image, study_version=2, status="amended")
    same = [r["id"] for r in amended if r["resourceType"] != "Provenance"]
    assert same == [r["id"] for r in first if r["resourceType"] != "Provenance"]  # same resources, new versions
    assert all(r.get("status") in ("amended", "active", "available", None) for r in amended)
    # One Provenance per AI run: the re-run gets its own, recorded as an update.
    prov1, prov2 = by_type(first, "Provenance")[0], by_type(amended, "Provenance")[0]
    assert prov1["id"] != prov2["id"]
    assert prov1["activity"]["coding"][0]["code"] == "CREATE" and prov2["activity"]["coding"][0]["code"] == "UPDATE"
    _, other_route = build(datasets, per_image, calling_ae="OTHER_AE")
    # The model's Device and the patient are the same whichever route sent the study.
    shared = ("Device", "Patient")
    same_route_ids = {r["id"] for r in first if r["resourceType"] not in shared}
    assert same_route_ids.isdisjoint(r["id"] for r in other_route if r["resourceType"] not in shared)
    assert by_type(other_route, "Patient") == by_type(first, "Patient")
    _, new_model = build(datasets, per_image, model=REAL)
    assert by_type(new_model, "Device")[0]["id"] != by_type(first, "Device")[0]["id"]


def test_two_views_take_the_maximum_per_finding():
    study_uid = "1.2.826.0.1.3680043.10.1249.99.1"
    pa = make_dx(PIXELS, view_position="PA", study_uid=study_uid)
    lateral = make_dx(PIXELS, view_position="LL", study_uid=study_uid)
    per_image = {
        pa.SOPInstanceUID: findings({"Effusion": 0.3, "Nodule": 0.7}),
        lateral.SOPInstanceUID: findings({"Effusion": 0.8, "Nodule": 0.2}),
    }
    _, resources = build([pa, lateral], per_image)
    report = by_type(resources, "DiagnosticReport")[0]
    assert report["code"]["coding"][0] == {"system": "http://loinc.org", "code": "36643-5", "display": "XR Chest 2 Views"}
    obs = {o["code"]["text"]: o for o in by_type(resources, "Observation")}
    assert obs["Effusion"]["valueQuantity"]["value"] == 0.8
    assert lateral.SOPInstanceUID in obs["Effusion"]["note"][-1]["text"]
    assert obs["Nodule"]["valueQuantity"]["value"] == 0.7
    assert pa.SOPInstanceUID in obs["Nodule"]["note"][-1]["text"]
    study = by_type(resources, "ImagingStudy")[0]
    assert study["numberOfInstances"] == 2 and study["numberOfSeries"] == 2


def test_no_positive_findings_and_no_accession():
    ds = make_dx(PIXELS, accession="")
    _, resources = build([ds], {ds.SOPInstanceUID: findings({})}, model=REAL)
    report = by_type(resources, "DiagnosticReport")[0]
    assert "conclusionCode" not in report and "basedOn" not in report
    assert report["conclusion"].startswith("No AI finding above the operating threshold")


def test_invalid_input_fails_loudly(pa_study):
    datasets, per_image = pa_study
    with pytest.raises(ValueError):
        build(datasets, {k: v[:13] for k, v in per_image.items()})  # a label missing
    with pytest.raises(ValueError):
        build(datasets, {"1.2.3.4": next(iter(per_image.values()))})  # image not in the study
    with pytest.raises(ValueError):
        build(datasets, per_image, status="done")
    _, resources = build(datasets, per_image)
    broken = copy.deepcopy(by_type(resources, "DiagnosticReport")[0])
    broken["study"] = broken.pop("imagingStudy")  # R5 spelling is not R4
    with pytest.raises(pydantic.ValidationError):
        validate(broken)


def test_dicom_datetime_conversion():
    assert dicom_datetime("20261121", "") == "2026-11-21"
    assert dicom_datetime("", "093000") is None
    with_time = dicom_datetime("20261121", "0930")
    assert with_time.startswith("2026-11-21T09:30:00") and with_time[-6] in "+-"
    assert dicom_datetime("20261121", "093000.25").startswith("2026-11-21T09:30:00.250")


def test_provenance_names_the_ai_device_as_author(pa_study):
    datasets, per_image = pa_study
    _, resources = build(datasets, per_image)
    provenance = by_type(resources, "Provenance")[0]
    report, device, study = (by_type(resources, t)[0] for t in ("DiagnosticReport", "Device", "ImagingStudy"))
    targets = [t["reference"] for t in provenance["target"]]
    assert targets[0] == f"DiagnosticReport/{report['id']}"
    assert targets[1:] == [f"Observation/{o['id']}" for o in by_type(resources, "Observation")]
    agent = provenance["agent"][0]
    assert agent["who"] == {"reference": f"Device/{device['id']}"} and device["id"] == device_id(DEMO)
    assert agent["type"]["coding"][0]["code"] == "author"
    assert agent["role"][0]["coding"][0]["code"] == "Artificial-Intelligence"
    assert provenance["reason"][0]["coding"][0]["code"] == "AIAST"
    assert provenance["entity"] == [{"role": "source", "what": {"reference": f"ImagingStudy/{study['id']}"}}]
    assert provenance["recorded"] == report["issued"]


def test_patient_comes_from_the_dicom_header():
    ds = make_dx(PIXELS, patient_name="Doe^Jane^Q^Dr^III", patient_id="PID-9")
    _, resources = build([ds], {ds.SOPInstanceUID: findings({})})
    patient = by_type(resources, "Patient")[0]
    assert patient["id"] == patient_id(PATIENT_SYSTEM, "PID-9")
    assert patient["identifier"] == [{"system": PATIENT_SYSTEM, "value": "PID-9"}]
    assert patient["name"] == [{"use": "official", "family": "Doe", "given": ["Jane", "Q"], "prefix": ["Dr"],
                                "suffix": ["III"]}]
    assert patient["gender"] == "female" and patient["birthDate"] == "1960-01-01"
    # Without a PatientID there is no Patient and no subject to point at it.
    anonymous = make_dx(PIXELS, patient_id="")
    _, resources = build([anonymous], {anonymous.SOPInstanceUID: findings({})})
    assert by_type(resources, "Patient") == []
    assert "subject" not in by_type(resources, "DiagnosticReport")[0]


def test_triage_priority_extension_and_critical_interpretation(pa_study):
    datasets, per_image = pa_study
    stat = Triage("stat", ("Effusion",), "AI critical finding: Effusion p=0.87 >= 0.50")
    _, resources = build(datasets, per_image, triage=stat)
    report = by_type(resources, "DiagnosticReport")[0]
    extension = next(e for e in report["extension"] if e["url"] == TRIAGE_PRIORITY_URL)
    assert extension["valueCodeableConcept"]["coding"] == [
        {"system": "http://hl7.org/fhir/request-priority", "code": "stat", "display": "STAT"}
    ]
    obs = {o["code"]["text"]: o for o in by_type(resources, "Observation")}
    codes = {label: [i["coding"][0]["code"] for i in o["interpretation"]] for label, o in obs.items()}
    assert codes["Effusion"] == ["POS", "AA"]  # critical: Critical abnormal on top of Positive
    assert codes["Cardiomegaly"] == ["POS"] and codes["Nodule"] == ["NEG"]
    routine = Triage("routine", (), "no critical AI finding")
    _, resources = build(datasets, per_image, triage=routine)
    report = by_type(resources, "DiagnosticReport")[0]
    assert report["extension"][0]["valueCodeableConcept"]["coding"][0]["code"] == "routine"
    assert all("AA" not in json.dumps(o["interpretation"]) for o in by_type(resources, "Observation"))
    # By default the configured rule decides: Effusion is not critical, so routine.
    _, default = build(datasets, per_image)
    assert by_type(default, "DiagnosticReport")[0]["extension"][0]["valueCodeableConcept"]["coding"][0]["code"] \
        == "routine"


def test_triage_extension_definition_is_a_valid_structure_definition():
    from fhir.resources.R4B.structuredefinition import StructureDefinition

    path = Path(__file__).resolve().parent.parent / "fhir" / "StructureDefinition-carina-triage-priority.json"
    definition = json.loads(path.read_text())
    StructureDefinition.model_validate(definition)
    assert definition["url"] == TRIAGE_PRIORITY_URL
    assert definition["context"] == [{"type": "element", "expression": "DiagnosticReport"}]


def test_the_shipped_example_bundle_is_what_the_builder_makes(tmp_path):
    """fhir/examples/ must not drift from the code (it once kept a stale SR UID)."""
    repo = Path(__file__).resolve().parent.parent
    fresh = tmp_path / "bundle.json"
    subprocess.run([sys.executable, str(repo / "fhir" / "examples" / "generate_example.py"), str(fresh)],
                   check=True, capture_output=True, timeout=120)
    shipped = repo / "fhir" / "examples" / "chest-xray-two-views-bundle.json"
    assert fresh.read_text() == shipped.read_text(), "run fhir/examples/generate_example.py"
