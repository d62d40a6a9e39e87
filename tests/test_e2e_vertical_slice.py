"""The whole loop against real software:

dcmtk storescu (modality) -> Carina -> Orthanc (PACS) gets the SR, heatmap SCs,
a SEG and a GSPS in the same study; dciodvfy validates each, as Orthanc returns
it; dsrdump parses the SR; OHIF's SR code draws the SR's regions and
Cornerstone3D's SEG adapter loads the SEG; an EHR pulls the DiagnosticReport
with the fhirpy client library.
"""
from __future__ import annotations

import pytest
from dicom_factory import SIIM_MONO1, make_dx, write
from fhirpy import SyncFHIRClient
from ohif_js import run as run_js
from peers import (
    Orthanc,
    node_with_pacs,
    storescu,
    wait_until,
)
from pydicom import dcmread
from test_outputs_sr import assert_valid_dicom, dsrdump_checked

from inference.types import CHESTXRAY14, DEMO_WARNING
from node.outputs.text import plain
from node.terminology import load_terminology

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
GSPS_CLASS = "1.2.840.10008.5.1.4.1.1.11.1"
PDF_CLASS = "1.2.840.10008.5.1.4.1.1.104.1"  # Encapsulated PDF: the printable report


@pytest.fixture(scope="module")
def loop(tmp_path_factory, module_backend):
    """One node for the module, on SQLite and then on PostgreSQL (tests/conftest.py module_backend)."""
    work = tmp_path_factory.mktemp("e2e")
    env = {"CARINA_DATABASE__URL": module_backend} if module_backend else None
    with node_with_pacs(work, env=env) as (node, pacs):
        dx = make_dx(patient_id="E2E-DX-16", accession="E2E0001")
        dx_path = write(dx, work / "dx16.dcm")
        cr = dcmread(SIIM_MONO1)
        sent = storescu(node.dicom_port, SIIM_MONO1, extra=("-xy",))  # propose JPEG baseline, as the file is
        assert sent.returncode == 0, sent.stdout + sent.stderr
        sent = storescu(node.dicom_port, dx_path)
        assert sent.returncode == 0, sent.stdout + sent.stderr
        yield node, pacs, {"cr": cr, "dx": dx}, work


def _sop_class(pacs: Orthanc, instance: dict) -> str:
    import urllib.request

    with urllib.request.urlopen(f"{pacs.url}/instances/{instance['ID']}/metadata/SopClassUid", timeout=10) as rsp:
        return rsp.read().decode().strip()


@pytest.mark.parametrize("which", ["cr", "dx"])
def test_pacs_receives_valid_sr_and_heatmaps_in_the_source_study(loop, which):
    node, pacs, studies, work = loop
    source = studies[which]
    study_uid = source.StudyInstanceUID

    state = wait_until(lambda: (v := node.api(f"/api/v1/studies/{study_uid}"))["state"] in ("done", "failed") and v, 240,
                       what=f"{which} study processed")
    assert state["state"] == "done", state
    wait_until(lambda: all(d["state"] == "done" for d in node.api(f"/api/v1/studies/{study_uid}")["deliveries"]), 120,
               what="delivery to Orthanc")

    # The PACS only holds what Carina sent it (the source went to Carina only).
    instances = [i for i in pacs.study_instances(study_uid) if i["MainDicomTags"]["SOPInstanceUID"] != source.SOPInstanceUID]
    by_class: dict[str, list[dict]] = {}
    for inst in instances:
        by_class.setdefault(_sop_class(pacs, inst), []).append(inst)
    assert len(by_class.get(SR_CLASS, [])) == 1, by_class.keys()
    [image] = state["images"]
    positives = {f["label"] for f in image["findings"] if f["positive"]}
    drawn = [f["label"] for f in image["findings"] if f["positive"] and f["regions"]]
    assert drawn, "the demo model outlines no positive finding here: SEG and GSPS would go untested"
    # One SC per positive finding plus one summary; one SEG and one GSPS for
    # the image's outlined findings.
    assert len(by_class.get(SC_CLASS, [])) == len(positives) + 1
    assert len(by_class[SEG_CLASS]) == len(by_class[GSPS_CLASS]) == len(by_class[PDF_CLASS]) == 1
    assert set(by_class) == {SR_CLASS, SC_CLASS, SEG_CLASS, GSPS_CLASS, PDF_CLASS}

    displays = [load_terminology().finding(label).display for label in drawn]
    source_path = work / f"{which}-source.dcm"
    source.save_as(source_path, enforce_file_format=True)
    returned = {}
    for inst in instances:
        # Validate exactly the bytes the PACS hands back (/instances/{id}/file), never a local re-save.
        path = pacs.download(inst["ID"], work / f"{inst['ID']}.dcm")
        assert_valid_dicom(path)  # no dciodvfy error, non-zero exit or unexplained warning
        ds = dcmread(path)
        returned.setdefault(str(ds.SOPClassUID), []).append((path, ds))
        assert ds.SOPInstanceUID == inst["MainDicomTags"]["SOPInstanceUID"]
        assert ds.StudyInstanceUID == study_uid and ds.PatientID == source.PatientID
        assert ds.SeriesInstanceUID != source.SeriesInstanceUID
        assert ds.SeriesDescription
    [(sr_path, sr)] = returned[SR_CLASS]
    [(seg_path, seg)] = returned[SEG_CLASS]
    [(_, gsps)] = returned[GSPS_CLASS]

    dump = dsrdump_checked(sr_path)  # exit 0 and nothing on stderr but dcmtk's known UTF-8 note
    assert "Imaging Measurement Report" in dump or "18748-4" in dump
    assert plain(DEMO_WARNING) in dump
    assert sr.VerificationFlag == "UNVERIFIED"
    for label in ("Pneumothorax", "Cardiomegaly"):
        assert label.lower() in dump.lower()
    # the SR names the GSPS as the source image's presentation state
    assert "(GSPS,)" in dump
    evidence = {item.ReferencedSOPInstanceUID for series in sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
                for item in series.ReferencedSOPSequence}
    assert {source.SOPInstanceUID, gsps.SOPInstanceUID} <= evidence

    assert [s.SegmentLabel for s in seg.SegmentSequence] == displays
    assert [layer.GraphicLayerDescription for layer in gsps.GraphicLayerSequence] == [f"Carina AI: {d}" for d in displays]
    assert gsps.ReferencedSeriesSequence[0].ReferencedImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID

    # The PACS copies open in OHIF: its SR code draws every outlined finding,
    # Cornerstone3D's SEG adapter reads every segment.
    ohif = run_js("ohif_sr_check.mjs", sr_path, source_path)
    assert ohif["ohif"]["loadThrew"] is False and ohif["cornerstone3d"]["threw"] is False
    assert sorted(a["textLines"][0].removesuffix(": ") for a in ohif["ohif"]["drawn"]) == sorted(displays)
    assert len(ohif["cornerstone3d"]["toolStates"]) == len(drawn)
    loaded = run_js("seg_check.mjs", seg_path, source_path)
    assert loaded["threw"] is False, loaded["error"]
    assert [s["label"] for s in loaded["segments"]] == displays
    counted = {k for labelmap in loaded["labelmaps"] for k, n in labelmap["pixelsPerSegment"].items() if n > 0}
    assert counted == {str(n) for n in range(1, len(drawn) + 1)}


def test_ehr_pulls_diagnostic_report_with_14_observations(loop):
    node, pacs, studies, _ = loop
    dx = studies["dx"]
    wait_until(lambda: node.api(f"/api/v1/studies/{dx.StudyInstanceUID}")["state"] == "done", 240, what="dx study done")
    client = SyncFHIRClient(f"{node.url}/fhir", authorization=f"Bearer {node.token}")
    bundle = (
        client.resources("DiagnosticReport")
        .search(**{"patient:identifier": dx.PatientID})
        .include("DiagnosticReport", "result")
        .fetch_raw()
    )
    reports = [e.resource for e in bundle.entry if e.resource.resourceType == "DiagnosticReport"]
    observations = [e.resource for e in bundle.entry if e.resource.resourceType == "Observation"]
    assert len(reports) == 1
    report = reports[0]
    assert len(report.result) == len(CHESTXRAY14) == 14
    assert len(observations) == 14
    assert report.status == "preliminary"
    assert DEMO_WARNING in report.conclusion
    assert report.imagingStudy


def test_api_requires_a_token_and_shows_study_state(loop):
    import urllib.error

    from peers import http_json

    node, _, studies, _ = loop
    with pytest.raises(urllib.error.HTTPError) as err:
        http_json(f"{node.url}/api/v1/studies/{studies['dx'].StudyInstanceUID}")
    assert err.value.code == 401
    view = node.api(f"/api/v1/studies/{studies['dx'].StudyInstanceUID}")
    assert view["model"]["demo"] is True and view["model"]["caveat"] == DEMO_WARNING
    assert len(view["images"][0]["findings"]) == 14


def test_web_ui_shows_demo_caveat_and_study_findings(loop, tmp_path):
    """The reading app in Debian's Chromium (Playwright drives it; no browser download):
    log in as a viewer, open the study from the worklist and see its findings under the
    CSP, log out; then an admin's audit page shows that viewer's read of the patient's
    study. The reading app's own acceptance test is tests/test_reading_app_ui.py."""
    from peers import require_tool
    from playwright.sync_api import expect, sync_playwright

    node, _, studies, _ = loop
    dx_uid = studies["dx"].StudyInstanceUID
    wait_until(lambda: node.api(f"/api/v1/studies/{dx_uid}")["state"] == "done", 240, what="dx study done")
    chromium = require_tool("chromium")
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=chromium,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        try:
            page = browser.new_page()
            violations = []  # the CSP forbids inline scripts and styles; the UI must need none
            page.on("console", lambda msg: violations.append(msg.text) if "Content Security Policy" in msg.text else None)
            node.create_user("reader", "viewer", "a long enough passphrase")
            page.goto(node.url)
            page.wait_for_url("**/login?next=%2F")  # no session yet: the server sends the browser to log in
            page.fill("#username", "reader")
            page.fill("#password", "a long enough passphrase")
            page.click("#login-button")
            page.wait_for_url(node.url + "/")
            expect(page.locator("#demo-banner")).to_have_text(DEMO_WARNING)
            expect(page.locator("#who")).to_have_text("reader (viewer)")
            expect(page.locator("#audit-link")).to_have_count(0)  # admins only
            row = page.locator(f"tr.study[data-uid='{dx_uid}']")
            expect(row).to_contain_text("done")
            row.locator("a.open").click()
            page.wait_for_url("**/studies/*")
            expect(page.locator("#patient-id")).to_have_text(studies["dx"].PatientID)
            expect(page.locator("#demo-banner")).to_have_text(DEMO_WARNING)
            expect(page.locator("tr.finding")).to_have_count(14)
            expect(page.locator("#deliveries")).to_contain_text("pacs: done")
            report = page.locator("#report-pdf")  # the printable report, with the session's cookie
            expect(report).to_be_visible()
            pdf = page.request.get(node.url + report.get_attribute("href"))
            assert pdf.status == 200 and pdf.headers["content-type"] == "application/pdf"
            assert pdf.body().startswith(b"%PDF-")
            page.screenshot(path=str(tmp_path / "ui.png"), full_page=True)
            cookie = next(c for c in page.context.cookies() if c["name"] == "carina_session")
            assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
            page.click("#logout")  # a DELETE with the CSRF token; the session ends
            page.wait_for_url("**/login")

            # An admin asks the audit page who saw this patient: the viewer above, just now.
            node.create_user("officer", "admin", "another long passphrase")
            page.fill("#username", "officer")
            page.fill("#password", "another long passphrase")
            page.click("#login-button")
            page.wait_for_url(node.url + "/")
            page.click("#audit-link")
            page.wait_for_url("**/audit")
            page.fill("#patient", studies["dx"].PatientID)
            page.click("#search")
            viewed = page.locator("tr.audit-record", has_text="110110 Patient Record").filter(has_text="reader")
            expect(viewed.first).to_be_visible()
            expect(page.locator("#chain")).to_contain_text("Hash chain intact")
            page.screenshot(path=str(tmp_path / "audit.png"), full_page=True)
            assert violations == []
        finally:
            browser.close()
