"""Issue 3: study completion and late arrivals, against a running node and Orthanc.

- An instance that arrives after its study was processed reopens it as version
  2: a new SR in the PACS that names the v1 SR in its Predecessor Documents
  Sequence, and the same FHIR DiagnosticReport moved to `amended` (versionId 2).
- The same StudyInstanceUID from two calling AEs is two studies.
"""
from __future__ import annotations

from pathlib import Path

import pytest
from dicom_factory import make_dx, small_chest_pixels, write
from peers import (
    CarinaNode,
    Orthanc,
    carina_outputs_in_orthanc,
    dciodvfy_errors,
    expected_outputs,
    node_with_pacs,
    orthanc_study_series,
    storescu,
    study_state,
    wait_until,
)
from pydicom import dcmread

from node.report import report_id


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    work = tmp_path_factory.mktemp("late")
    with node_with_pacs(work, stable_seconds=1.0) as (node, pacs):
        yield node, pacs, work


def delivered(node: CarinaNode, study_uid: str, version: int, calling_ae: str | None = None) -> dict:
    def ready():
        view = study_state(node, study_uid, calling_ae)
        return (
            view and view["version"] == version and view["state"] == "done"
            and [(d["state"], d["study_version"]) for d in view["deliveries"]] == [("done", version)]
            and view
        )

    return wait_until(ready, 90, interval=0.3, what=f"study {study_uid} v{version} done and delivered")


def orthanc_srs(pacs: Orthanc, study_uid: str, work) -> list:
    out = []
    for series in orthanc_study_series(pacs, study_uid):
        if series["MainDicomTags"].get("Modality") == "SR":
            out += [dcmread(pacs.download(i, work / f"{i}.dcm")) for i in series["Instances"]]
    return out


def test_late_instance_makes_version_2_with_predecessor_and_amended_report(rig):
    node, pacs, work = rig
    first = make_dx(small_chest_pixels(200), patient_id="LATE-1", accession="LATE0001")
    study_uid = first.StudyInstanceUID
    assert storescu(node.dicom_port, write(first, work / "first.dcm")).returncode == 0
    v1 = delivered(node, study_uid, 1)
    (sr_v1,) = orthanc_srs(pacs, study_uid, work)
    rid = report_id("MODALITY", study_uid)
    report = node.api(f"/fhir/DiagnosticReport/{rid}")
    assert (report["status"], report["meta"]["versionId"]) == ("preliminary", "1")

    # A second image of the same study, after the first was processed and delivered.
    second = make_dx(small_chest_pixels(201), study_uid=study_uid, patient_id="LATE-1", accession="LATE0001", view_position="AP")
    second.SeriesInstanceUID, second.InstanceNumber = first.SeriesInstanceUID, 2
    assert storescu(node.dicom_port, write(second, work / "second.dcm")).returncode == 0
    v2 = delivered(node, study_uid, 2)
    assert {i["sop_instance_uid"]: i["state"] for i in v2["instances"]} == {
        first.SOPInstanceUID: "scored", second.SOPInstanceUID: "scored"}
    assert {img["sop_instance_uid"] for img in v2["images"]} == {first.SOPInstanceUID, second.SOPInstanceUID}

    srs = orthanc_srs(pacs, study_uid, work)
    assert len(srs) == 2, [s.SOPInstanceUID for s in srs]
    (sr_v2,) = [s for s in srs if s.SOPInstanceUID != sr_v1.SOPInstanceUID]
    predecessors = [
        sop.ReferencedSOPInstanceUID
        for study in sr_v2.PredecessorDocumentsSequence
        for series in study.ReferencedSeriesSequence
        for sop in series.ReferencedSOPSequence
    ]
    assert predecessors == [sr_v1.SOPInstanceUID]
    assert sr_v2.PredecessorDocumentsSequence[0].StudyInstanceUID == study_uid
    assert sr_v2.SeriesInstanceUID == sr_v1.SeriesInstanceUID  # same "Carina AI findings" series
    # The file exactly as the PACS returned it (dcmread keeps its path), not a re-save.
    assert dciodvfy_errors(Path(sr_v2.filename)) == []

    # Every version is a whole set: v2 re-issues the first image's SCs, SEG and
    # GSPS (with v2's issue time and instance numbers) under new UIDs, so no UID
    # ever names two contents; the PACS keeps v1's set beside it, as it keeps the v1 SR.
    assert len(v1["images"]) == 1
    both = {kind: expected_outputs(v1)[kind] + expected_outputs(v2)[kind] for kind in ("sc", "seg", "gsps")}
    assert carina_outputs_in_orthanc(pacs, study_uid) == expected_outputs(v2, versions=2) | both
    issued = {n: {o["sop_instance_uid"] for o in v2["outputs"] if o["version"] == n} for n in (1, 2)}
    assert issued[1] and issued[2] and not issued[1] & issued[2]

    report = node.api(f"/fhir/DiagnosticReport/{rid}")
    assert report["id"] == rid
    assert (report["status"], report["meta"]["versionId"]) == ("amended", "2")
    assert f"urn:oid:{sr_v2.SOPInstanceUID}" in [i["value"] for i in report["identifier"]]
    first_version = node.api(f"/fhir/DiagnosticReport/{rid}/_history/1")
    assert first_version["status"] == "preliminary"


def test_same_study_uid_from_two_calling_aes_is_two_studies(rig):
    node, pacs, work = rig
    ds = make_dx(small_chest_pixels(210), patient_id="ROUTES-1", accession="RT0001")
    path = write(ds, work / "routes.dcm")
    for route in ("ROUTE_A", "ROUTE_B"):
        assert storescu(node.dicom_port, path, calling_ae=route).returncode == 0
    views = {route: delivered(node, ds.StudyInstanceUID, 1, calling_ae=route) for route in ("ROUTE_A", "ROUTE_B")}
    for route, view in views.items():
        assert view["calling_ae"] == route and view["version"] == 1
        assert [i["sop_instance_uid"] for i in view["instances"]] == [ds.SOPInstanceUID]
    # Without a calling AE the API shows the latest route and names the other.
    unfiltered = study_state(node, ds.StudyInstanceUID)
    assert sorted([unfiltered["calling_ae"], *unfiltered["other_routes"]]) == ["ROUTE_A", "ROUTE_B"]
    # Each route has its own report: deterministic ids that include the caller.
    ids = {route: report_id(route, ds.StudyInstanceUID) for route in views}
    assert ids["ROUTE_A"] != ids["ROUTE_B"]
    for route, rid in ids.items():
        report = node.api(f"/fhir/DiagnosticReport/{rid}")
        assert (report["status"], report["meta"]["versionId"]) == ("preliminary", "1")
    listing = node.api("/api/v1/studies?limit=500")["studies"]
    assert sorted(s["calling_ae"] for s in listing if s["study_instance_uid"] == ds.StudyInstanceUID) == ["ROUTE_A", "ROUTE_B"]
