"""Issue 11 acceptance: changed content and mixed-patient studies, against a
running node and Orthanc.

- The same bytes again under a known SOP Instance UID: acknowledged, and
  nothing else happens (no new file, no event, no new version).
- Different bytes under that SOP Instance UID: the new file is kept beside
  the old one, a `changed_content` event is recorded, the study becomes
  version 2 with amended outputs. The changed image's heatmaps get new UIDs,
  so the PACS never receives one UID with two contents.
- A study whose images disagree on PatientID, or on PatientBirthDate under
  one PatientID, is not scored: it fails with that reason (no PHI in it), an
  admin sees it, and nothing is delivered.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pytest
from dicom_factory import make_dx, small_chest_pixels, write
from peers import (
    carina_db_rows,
    http_json,
    node_with_pacs,
    orthanc_study_series,
    store_responses,
    storescu,
    study_state,
    wait_until,
)

from pydicom import dcmread

from node.report import report_id


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    work = tmp_path_factory.mktemp("content")
    with node_with_pacs(work, stable_seconds=0.5) as (node, pacs):
        node.admin = node.carina("token", "create", "--name", "admin", "--role", "admin").stdout.strip().splitlines()[-1]
        yield node, pacs, work


def delivered(node, uid: str, version: int) -> dict:
    def ready():
        view = study_state(node, uid)
        return (view and view["version"] == version and view["state"] == "done"
                and [(d["state"], d["study_version"]) for d in view["deliveries"]] == [("done", version)] and view)

    return wait_until(ready, 120, interval=0.3, what=f"{uid} v{version} delivered")


def sc_uids(view: dict, version: int) -> set[str]:
    return {o["sop_instance_uid"] for o in view["outputs"] if o["kind"] == "sc" and o["version"] == version}


def admin_events(node, kind: str) -> list[dict]:
    return http_json(f"{node.url}/api/v1/admin/events?kind={kind}", token=node.admin)["events"]


def test_same_bytes_are_acknowledged_and_ignored_changed_bytes_make_an_amended_version(rig):
    node, pacs, work = rig
    ds = make_dx(small_chest_pixels(600), patient_id="CHG-1", accession="CHG0001")
    uid, sop = str(ds.StudyInstanceUID), str(ds.SOPInstanceUID)
    original = write(ds, work / "original.dcm")
    assert store_responses(storescu(node.dicom_port, original)) == ["Success"]
    v1 = delivered(node, uid, 1)

    # The same bytes again (a modality retrying): acknowledged, nothing else.
    assert store_responses(storescu(node.dicom_port, original)) == ["Success"]
    files = carina_db_rows(node, "SELECT r.path, r.sha256 FROM instance_revisions r JOIN instances i "
                                 "ON i.id = r.instance_id WHERE i.sop_instance_uid = ?", (sop,))
    assert len(files) == 1
    study_dir = Path(files[0][0]).parent
    assert sorted(p.name for p in study_dir.iterdir()) == [f"{sop}.dcm"]
    assert study_state(node, uid)["version"] == 1 and study_state(node, uid)["state"] == "done"
    assert admin_events(node, "changed_content") == []

    # Different bytes under the same SOP Instance UID.
    changed = make_dx(small_chest_pixels(601), study_uid=uid, patient_id="CHG-1", accession="CHG0001")
    changed.SOPInstanceUID = changed.file_meta.MediaStorageSOPInstanceUID = sop
    changed.SeriesInstanceUID = ds.SeriesInstanceUID
    assert store_responses(storescu(node.dicom_port, write(changed, work / "changed.dcm"))) == ["Success"]
    v2 = delivered(node, uid, 2)

    revisions = carina_db_rows(node, "SELECT r.revision, r.path, r.sha256 FROM instance_revisions r JOIN instances i "
                                     "ON i.id = r.instance_id WHERE i.sop_instance_uid = ? ORDER BY r.revision", (sop,))
    assert [r[0] for r in revisions] == [1, 2] and revisions[0][2] != revisions[1][2]
    kept = {p.name for p in study_dir.iterdir()}
    assert kept == {f"{sop}.dcm", f"{sop}.{revisions[1][2]}.dcm"}, "the old file is kept beside the new one"
    assert dcmread(study_dir / f"{sop}.dcm").PixelData == ds.PixelData  # the first content, untouched
    assert dcmread(study_dir / f"{sop}.{revisions[1][2]}.dcm").PixelData == changed.PixelData
    (event,) = admin_events(node, "changed_content")
    assert event["sop_instance_uid"] == sop and event["study_instance_uid"] == uid

    # Amended outputs: a v2 SR, new heatmap UIDs for the changed image, the FHIR report amended.
    assert sc_uids(v1, 1) and sc_uids(v2, 2) and not sc_uids(v1, 1) & sc_uids(v2, 2)
    report = node.api(f"/fhir/DiagnosticReport/{report_id('MODALITY', uid)}")
    assert (report["status"], report["meta"]["versionId"]) == ("amended", "2")
    # In the PACS: both versions' objects, and never one UID with two contents.
    contents = defaultdict(set)
    for r in pacs.receptions():
        if r["study"] == uid:
            contents[r["sop"]].add(repr(sorted(r["tags"].items())))
    assert all(len(c) == 1 for c in contents.values()), "a UID received with two contents"
    assert sc_uids(v1, 1) | sc_uids(v2, 2) <= set(contents)
    in_pacs = sum(len(s["Instances"]) for s in orthanc_study_series(pacs, uid))
    assert in_pacs == len(contents)


def test_a_study_of_two_patients_is_not_scored(rig):
    node, pacs, work = rig
    cases = {}
    # Two PatientIDs under one StudyInstanceUID.
    a = make_dx(small_chest_pixels(610), patient_id="MIX-A-9071", accession="MIX0001")
    b = make_dx(small_chest_pixels(611), study_uid=a.StudyInstanceUID, patient_id="MIX-B-4410", accession="MIX0001")
    cases["PatientID"] = (a, b)
    # One PatientID, two birth dates.
    c = make_dx(small_chest_pixels(612), patient_id="MIX-C-1234", accession="MIX0002")
    d = make_dx(small_chest_pixels(613), study_uid=c.StudyInstanceUID, patient_id="MIX-C-1234", accession="MIX0002")
    d.PatientBirthDate = "19711231"
    cases["PatientBirthDate"] = (c, d)
    for key, (first, second) in cases.items():
        paths = [write(first, work / f"{key}-1.dcm"), write(second, work / f"{key}-2.dcm")]
        assert store_responses(storescu(node.dicom_port, *paths)) == ["Success", "Success"]
    for key, (first, _) in cases.items():
        uid = str(first.StudyInstanceUID)
        view = wait_until(lambda: (v := study_state(node, uid)) and v["state"] == "failed" and v,
                          120, interval=0.3, what=f"the {key} study failed")
        assert f"disagree on {key}" in view["reason"], view["reason"]
        assert view["images"] == [] and view["deliveries"] == [] and view["outputs"] == []
        assert orthanc_study_series(pacs, uid) == []
    phi = ("MIX-A-9071", "MIX-B-4410", "19711231", "19600101", "Test^Patient")
    failed = http_json(f"{node.url}/api/v1/admin/failed-studies", token=node.admin)["studies"]
    events = admin_events(node, "mixed_patient")
    for key, (first, _) in cases.items():
        (listed,) = [f for f in failed if f["study_instance_uid"] == first.StudyInstanceUID]
        assert f"disagree on {key}" in listed["reason"]
        assert any(e["study_instance_uid"] == first.StudyInstanceUID for e in events)
    text = repr(failed) + repr(events) + node.log_text()
    assert not [p for p in phi if p in text], "PHI in a reason, an event or the log"
