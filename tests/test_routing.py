"""Routing rules (node/routing.py): which received images the model may score.

Unit tests for every rule with its defaults and its named reason, then one
node-level test: a lateral and a pediatric image end `ignored` with the rule
in /api/v1/studies/{uid}, while the frontal adult image beside them is scored.
"""
from __future__ import annotations

import pytest
from pydicom.dataset import Dataset

from dicom_factory import CR_IMAGE, DX_FOR_PROCESSING, make_dx, small_chest_pixels, write
from node.config import RoutingSettings
from node.routing import age_in_years, exclusion
from peers import CarinaNode, storescu, study_state, wait_until

# On SQLite and on PostgreSQL (tests/conftest.py both_backends).
pytestmark = pytest.mark.usefixtures("both_backends")

SC = "1.2.840.10008.5.1.4.1.1.7"
CT = "1.2.840.10008.5.1.4.1.1.2"
DEFAULTS = RoutingSettings()


def header(**tags) -> Dataset:
    """A routing-relevant header; defaults are an eligible adult PA chest DX."""
    ds = Dataset()
    values = {
        "SOPClassUID": "1.2.840.10008.5.1.4.1.1.1.1", "Modality": "DX", "BodyPartExamined": "CHEST",
        "ViewPosition": "PA", "PatientAge": "045Y", "StudyDate": "20261121", "PatientBirthDate": "19810101",
    }
    values.update(tags)
    for keyword, value in values.items():
        if value is not None:
            setattr(ds, keyword, value)
    return ds


def test_defaults_match_the_issue():
    assert DEFAULTS.modalities == ["CR", "DX"]
    assert DEFAULTS.sc_body_parts == ["CHEST"] and DEFAULTS.body_parts == ["CHEST"]
    assert DEFAULTS.view_positions == ["PA", "AP"]
    assert DEFAULTS.score_laterals is False
    assert DEFAULTS.min_age_years == 18 and DEFAULTS.missing_age_eligible is True


@pytest.mark.parametrize("tags", [
    {},
    {"SOPClassUID": CR_IMAGE, "Modality": "CR"},
    {"SOPClassUID": DX_FOR_PROCESSING},
    {"ViewPosition": "AP"},
    {"ViewPosition": "pa ", "BodyPartExamined": "chest"},  # case and padding do not matter
    {"SOPClassUID": SC, "Modality": "OT", "BodyPartExamined": "CHEST"},  # SC only with CHEST
    {"PatientAge": "018Y"},  # exactly the minimum
    {"PatientAge": "216M"},  # 18 years in months
    {"PatientAge": None, "PatientBirthDate": None},  # unknown age: eligible by default
    {"PatientAge": None, "PatientBirthDate": "19900101"},  # age from birth date
], ids=lambda t: ",".join(f"{k}={v}" for k, v in t.items()) or "adult-PA-DX")
def test_eligible_images_have_no_exclusion(tags):
    assert exclusion(header(**tags), DEFAULTS) is None


@pytest.mark.parametrize("tags, rule, detail", [
    ({"SOPClassUID": CT, "Modality": "CT"}, "not a chest radiograph", ""),
    ({"SOPClassUID": SC, "Modality": "OT", "BodyPartExamined": None}, "rule sc_body_parts", "missing"),
    ({"SOPClassUID": SC, "Modality": "OT", "BodyPartExamined": "HAND"}, "rule sc_body_parts", "HAND"),
    ({"Modality": "MG"}, "rule modalities", "MG"),
    ({"Modality": None}, "rule modalities", "missing"),
    ({"BodyPartExamined": "ABDOMEN"}, "rule body_parts", "ABDOMEN"),
    ({"BodyPartExamined": None}, "rule missing_body_part_eligible", "missing"),
    ({"ViewPosition": "LL"}, "rule score_laterals", "LL"),
    ({"ViewPosition": "RL"}, "rule score_laterals", "RL"),
    ({"ViewPosition": "LATERAL"}, "rule score_laterals", "LATERAL"),
    ({"ViewPosition": "OBL"}, "rule view_positions", "OBL"),
    ({"ViewPosition": None}, "rule missing_view_position_eligible", "missing"),
    ({"PatientAge": "017Y"}, "rule min_age_years", "17.0 < 18"),
    ({"PatientAge": "006M"}, "rule min_age_years", "0.5 < 18"),
    ({"PatientAge": "010D"}, "rule min_age_years", "< 18"),
    ({"PatientAge": None, "PatientBirthDate": "20200101"}, "rule min_age_years", "< 18"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_each_rule_excludes_with_its_name(tags, rule, detail):
    reason = exclusion(header(**tags), DEFAULTS)
    assert reason is not None and reason.startswith("ignored: "), reason
    assert rule in reason and detail in reason, reason


def test_laterals_are_scored_only_when_configured():
    lateral = header(ViewPosition="LL")
    assert "score_laterals" in exclusion(lateral, DEFAULTS)
    assert exclusion(lateral, RoutingSettings(score_laterals=True)) is None


def test_configurable_rules():
    unknown_age = header(PatientAge=None, PatientBirthDate=None)
    assert "missing_age_eligible" in exclusion(unknown_age, RoutingSettings(missing_age_eligible=False))
    child = header(PatientAge="007Y")
    assert exclusion(child, RoutingSettings(min_age_years=None)) is None  # null disables the age rule
    assert exclusion(child, RoutingSettings(min_age_years=5)) is None
    assert exclusion(header(BodyPartExamined=None), RoutingSettings(missing_body_part_eligible=True)) is None
    assert exclusion(header(ViewPosition=None), RoutingSettings(missing_view_position_eligible=True)) is None
    assert exclusion(header(Modality="RF"), RoutingSettings(modalities=["CR", "DX", "RF"])) is None
    assert "sc_body_parts" in exclusion(header(SOPClassUID=SC, BodyPartExamined="THORAX"), DEFAULTS)
    assert exclusion(header(SOPClassUID=SC, BodyPartExamined="THORAX"), RoutingSettings(sc_body_parts=["CHEST", "THORAX"])) is None


@pytest.mark.parametrize("tags, years", [
    ({"PatientAge": "062Y"}, 62), ({"PatientAge": "62"}, 62), ({"PatientAge": "024M"}, 2),
    ({"PatientAge": "052W"}, 52 / 52.18), ({"PatientAge": "", "PatientBirthDate": "20081121"}, 18.0),
    ({"PatientAge": "", "PatientBirthDate": "garbage"}, None), ({"PatientAge": "abc", "PatientBirthDate": ""}, None),
])
def test_age_in_years(tags, years):
    age = age_in_years(header(**tags))
    assert (age is None) if years is None else age == pytest.approx(years, abs=0.01)


# --- node level -------------------------------------------------------------------


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    work = tmp_path_factory.mktemp("routing")
    carina = CarinaNode(work / "carina", stable_seconds=1.0)
    carina.create_token()
    carina.start()
    try:
        yield carina, work
    finally:
        carina.stop()


def settled(node: CarinaNode, study_uid: str) -> dict:
    return wait_until(
        lambda: (v := study_state(node, study_uid)) and v["state"] in ("done", "ignored", "failed") and v,
        90, interval=0.3, what=f"study {study_uid} settled",
    )


def test_lateral_and_pediatric_images_end_ignored_with_their_rule(node):
    carina, work = node
    # A two-view adult chest: the PA is scored, the lateral ignored.
    pa = make_dx(small_chest_pixels(300), patient_id="ROUTE-ADULT", view_position="PA")
    lateral = make_dx(small_chest_pixels(301), study_uid=pa.StudyInstanceUID, patient_id="ROUTE-ADULT", view_position="LL")
    # A child's chest, alone in its study.
    child = make_dx(small_chest_pixels(302), patient_id="ROUTE-CHILD")
    child.PatientBirthDate, child.PatientAge = "20190601", "007Y"
    files = [write(pa, work / "pa.dcm"), write(lateral, work / "lat.dcm"), write(child, work / "child.dcm")]
    proc = storescu(carina.dicom_port, *files)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    adult = settled(carina, pa.StudyInstanceUID)
    assert adult["state"] == "done"
    by_sop = {i["sop_instance_uid"]: i for i in adult["instances"]}
    assert by_sop[pa.SOPInstanceUID]["state"] == "scored"
    assert by_sop[lateral.SOPInstanceUID]["state"] == "ignored"
    assert "rule score_laterals (ViewPosition LL)" in by_sop[lateral.SOPInstanceUID]["reason"]
    assert [img["sop_instance_uid"] for img in adult["images"]] == [pa.SOPInstanceUID]

    kid = settled(carina, child.StudyInstanceUID)
    assert kid["state"] == "ignored" and kid["images"] == [] and kid["outputs"] == []
    (instance,) = kid["instances"]
    assert instance["state"] == "ignored" and "rule min_age_years (patient age 7.0 < 18)" in instance["reason"]
    assert "min_age_years" in kid["reason"]
