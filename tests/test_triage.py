"""AI triage: critical findings make a study STAT, in FHIR and HL7, and never go back down."""
from __future__ import annotations

import json

import hl7
import pytest

from inference.types import CHESTXRAY14, Finding
from node import results
from node.config import ConfigError, Hl7Destination, Settings, TriageSettings, load_settings
from node.db import Study, StudyTriage
from node.destinations import hl7 as hl7_sender
from node.fhir_store import read_current
from node.outputs.fhir_report import TRIAGE_PRIORITY_URL
from node.outputs.hl7_oru import encode
from node.report import Triage, assess_triage, never_lower, report_id, strongest_findings
from node.worker import current_study
from pipeline_rig import PipelineRig

# On SQLite and on PostgreSQL (tests/conftest.py both_backends).
pytestmark = pytest.mark.usefixtures("both_backends")


def findings(**probabilities: float) -> list[Finding]:
    return [Finding(label, probabilities.get(label, 0.1), 0.5, probabilities.get(label, 0.1) >= 0.5)
            for label in CHESTXRAY14]


def assess(settings, *images: list[Finding]) -> Triage:
    """The rule on the study-level findings of one or more images."""
    return assess_triage(settings, strongest_findings({f"1.2.{n}": image for n, image in enumerate(images)}))


def test_assess_uses_the_operating_point_unless_a_threshold_is_set():
    default = TriageSettings()
    assert default.critical_findings == ["Pneumothorax"] and default.threshold is None
    assert assess(default, findings(Pneumothorax=0.5)).priority == "stat"  # at the operating point
    assert assess(default, findings(Pneumothorax=0.49)).priority == "routine"
    # Other positive findings do not raise priority.
    assert assess(default, findings(Effusion=0.99, Mass=0.9)).priority == "routine"
    strict = TriageSettings(threshold=0.8)
    assert assess(strict, findings(Pneumothorax=0.79)).priority == "routine"
    hit = assess(strict, findings(Pneumothorax=0.8))
    assert hit.stat and hit.critical == ("Pneumothorax",) and "Pneumothorax p=0.80 >= 0.80" in hit.reason
    several = assess(TriageSettings(critical_findings=["Pneumothorax", "Mass"]), findings(Mass=0.7))
    assert several.stat and several.critical == ("Mass",)
    assert assess(TriageSettings(enabled=False), findings(Pneumothorax=0.99)).priority == "routine"


def test_study_level_probability_is_the_highest_over_images():
    # PA negative, lateral positive
    assert assess(TriageSettings(), findings(Pneumothorax=0.2), findings(Pneumothorax=0.7)).stat


def test_never_lower():
    stat = Triage("stat", ("Pneumothorax",), "AI critical finding: Pneumothorax")
    routine = Triage("routine", (), "no critical AI finding")
    kept = never_lower(stat, routine)
    assert kept.priority == "stat" and kept.critical == () and "kept from an earlier version" in kept.reason
    assert never_lower(routine, stat) == stat
    assert never_lower(None, routine) == routine


def test_configuration_rejects_unknown_findings(tmp_path):
    config = tmp_path / "carina.yaml"
    config.write_text("triage:\n  critical_findings: [Pneumothorax, Pneumo]\n")
    with pytest.raises(ConfigError) as err:
        load_settings(config)
    assert "triage.critical_findings" in str(err.value) and "Pneumo" in str(err.value)
    with pytest.raises(Exception):
        Settings(triage={"threshold": 1.5})


@pytest.fixture
def rig(tmp_path):
    rig = PipelineRig(tmp_path)
    yield rig
    rig.close()


def _stored(rig, study_id):
    with rig.db.session() as s:
        study = s.get(Study, study_id)
        row = read_current(s, "DiagnosticReport", report_id(study.calling_ae, study.study_uid))
        triage_row = s.get(StudyTriage, study_id)
        return json.loads(row.body), (triage_row.priority, triage_row.reason)


RIS = Hl7Destination(name="ris", type="hl7", host="127.0.0.1", port=2575)


def _oru(rig, study_id):
    """The ORU the HL7 sender would send for the study's current version."""
    with rig.db.session() as s:
        work = hl7_sender.load(rig.ctx, s, s.get(Study, study_id), RIS)
    return hl7.parse(encode(hl7_sender.message_for(rig.ctx, work)))


def _priority_extension(report):
    return next(e for e in report["extension"] if e["url"] == TRIAGE_PRIORITY_URL)["valueCodeableConcept"]


def test_critical_study_is_stat_in_fhir_and_hl7(rig):
    study_id, _ = rig.add_study({"Pneumothorax": 0.93, "Effusion": 0.7})
    rig.encode(study_id)
    report, (priority, reason) = _stored(rig, study_id)
    assert priority == "stat" and "Pneumothorax" in reason
    assert _priority_extension(report)["coding"][0]["code"] == "stat"
    oru = _oru(rig, study_id)
    assert str(oru.segment("TQ1")(9)(1)(1)) == "S"
    assert str(oru.segment("OBR")(27)(1)(6)) == "S"
    flags = {str(seg(3)(1)(2)): str(seg(8)) for seg in oru.segments("OBX")}
    assert flags["Pneumothorax"] == "AA"  # very abnormal: the critical finding
    assert flags["Pleural effusion"] == "A"  # positive, not critical
    assert flags["Cardiomegaly"] == "N"
    assert any("STAT" in str(seg(3)) for seg in oru.segments("NTE"))


def test_normal_study_is_routine(rig):
    study_id, _ = rig.add_study({"Effusion": 0.9})  # positive, but not a critical finding
    rig.encode(study_id)
    report, (priority, _) = _stored(rig, study_id)
    assert priority == "routine"
    assert _priority_extension(report)["coding"][0]["code"] == "routine"
    oru = _oru(rig, study_id)
    assert str(oru.segment("TQ1")(9)(1)(1)) == "R" and str(oru.segment("OBR")(27)(1)(6)) == "R"
    assert "AA" not in {str(seg(8)) for seg in oru.segments("OBX")}


def test_priority_is_never_lowered_by_a_rerun(rig):
    study_id, ds = rig.add_study({"Pneumothorax": 0.93})
    rig.encode(study_id)
    assert _stored(rig, study_id)[1][0] == "stat"
    version = rig.rescore(study_id, ds, {})  # the re-run no longer sees a pneumothorax
    rig.encode(study_id)
    report, (priority, reason) = _stored(rig, study_id)
    assert version == 2 and report["status"] == "amended"
    assert priority == "stat" and "Pneumothorax" in reason  # the stored reason stays the one that raised it
    concept = _priority_extension(report)
    assert concept["coding"][0]["code"] == "stat" and "kept from an earlier version" in concept["text"]
    with rig.db.session() as s:
        scored = results.load(s, study_id, version)
    assert scored.triage.priority == "stat" and scored.triage.critical == ()
    oru = _oru(rig, study_id)
    assert str(oru.segment("OBR")(25)) == "C"  # a correction of the earlier result
    assert str(oru.segment("TQ1")(9)(1)(1)) == "S"
    assert "AA" not in {str(seg(8)) for seg in oru.segments("OBX")}  # no finding is critical now


def test_superseded_version_is_not_delivered(rig):
    study_id, ds = rig.add_study({})
    rig.encode(study_id)
    rig.rescore(study_id, ds, {"Pneumothorax": 0.9})
    stale = type("Job", (), {"study_id": study_id, "study_version": 1})()
    current = type("Job", (), {"study_id": study_id, "study_version": 2})()
    with rig.db.session() as s:
        assert current_study(s, stale) is None
        assert current_study(s, current).version == 2
