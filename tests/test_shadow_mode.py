"""Shadow mode and radiologist feedback (issue #13) on a real `carina serve`.

The node runs the demo model with `inference.shadow` naming a second,
different model, and delivers to a real Orthanc and a FHIR server. Three
studies go in with storescu. The candidate's answers must be stored and
summarised (`/api/v1/shadow`, JSON and CSV), with feedback-based
sensitivity/specificity where feedback exists, and nothing from the
candidate may reach Orthanc or FHIR.
"""
from __future__ import annotations

import csv
import io
import json

import httpx
import numpy as np
import pytest

from dicom_factory import NIH_PNGS, SIIM_MONO1, make_dx, png_pixels, small_chest_pixels, write
from fhir_peer import FhirTestServer
from inference.types import CHESTXRAY14
from model_factory import write_xrv_pickle
from node.db import Database, Study
from node.feedback import NotAuthor, save, update
from node.governance.labels import read_labels
from peers import CarinaNode, Orthanc, carina_db_rows, carina_outputs_in_orthanc, expected_outputs, storescu, wait_until

CANDIDATE = "cand@7"


@pytest.fixture(scope="module")
def shadowed(tmp_path_factory, demo_model):
    work = tmp_path_factory.mktemp("shadow")
    fhir = FhirTestServer().start()
    pacs = Orthanc(work / "orthanc").start()
    node = CarinaNode(work / "carina", destinations=[
        {"name": "pacs", "type": "dicom", "ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.dicom_port},
        {"name": "ehr", "type": "fhir", "base_url": fhir.base_url},
    ], extra={"inference": {"device": "cpu", "shadow": CANDIDATE}})
    try:
        pickle, digest = write_xrv_pickle(work / "cand.pt", demo_model.module.state_dict(), seed=7)
        node.carina("model", "import", str(pickle), "--name", "cand", "--version", "7", "--sha256", digest)
        node.create_token(role="admin")
        node.start()
        sources = [make_dx(png_pixels(NIH_PNGS[0]), patient_id="SHADOW-1", accession="SHD0001"),
                   make_dx(small_chest_pixels(5), patient_id="SHADOW-2", accession="SHD0002")]
        for i, ds in enumerate(sources):
            assert storescu(node.dicom_port, write(ds, work / f"s{i}.dcm")).returncode == 0
        assert storescu(node.dicom_port, SIIM_MONO1, extra=("-xy",)).returncode == 0
        from pydicom import dcmread

        uids = [str(ds.StudyInstanceUID) for ds in sources] + [str(dcmread(SIIM_MONO1).StudyInstanceUID)]
        for uid in uids:
            wait_until(lambda: (v := node.api(f"/api/v1/studies/{uid}"))["state"] == "done"
                       and v["deliveries"] and all(d["state"] == "done" for d in v["deliveries"]), 300,
                       what=f"study {uid} done and delivered")
        yield {"node": node, "pacs": pacs, "fhir": fhir, "uids": uids, "work": work}
    finally:
        node.stop()
        pacs.stop()
        fhir.stop()


def rows(node) -> list[dict]:
    out = carina_db_rows(node, "SELECT study_id, sop_instance_uid, active_model, shadow_model, active_probabilities, "
                               "active_thresholds, shadow_probabilities, shadow_thresholds FROM shadow_results ORDER BY id")
    keys = ("study_id", "sop", "active", "shadow", "ap", "at", "sp", "st")
    return [dict(zip(keys, r)) for r in out]


def test_the_candidate_is_scored_beside_the_active_model_and_stored(shadowed):
    node = shadowed["node"]
    assert node.api("/healthz")["model"]["shadow"] == CANDIDATE
    stored = rows(node)
    assert len(stored) == 3 and {r["active"] for r in stored} == {"densenet121-res224-all@demo-seed0"}
    assert {r["shadow"] for r in stored} == {CANDIDATE}
    # A different model: its probabilities differ from the active one's on every image.
    for r in stored:
        assert np.abs(np.array(json.loads(r["ap"])) - np.array(json.loads(r["sp"]))).max() > 1e-3
        assert json.loads(r["at"]) != json.loads(r["st"])  # and so do its operating points (xrv's, not 0.5)


def test_nothing_from_the_candidate_reaches_orthanc_or_fhir(shadowed):
    node, pacs, fhir = shadowed["node"], shadowed["pacs"], shadowed["fhir"]
    receptions = [r for r in pacs.receptions() if r["calling_ae"] == "CARINA"]
    assert receptions and all("cand" not in json.dumps(r["tags"]) for r in receptions)
    for uid in shadowed["uids"]:
        view = node.api(f"/api/v1/studies/{uid}")
        assert carina_outputs_in_orthanc(pacs, uid) == expected_outputs(view)  # the active model's, nothing more
    assert fhir.bundles and "cand" not in json.dumps(fhir.bundles)
    assert [d["deviceName"][0]["name"] for d in fhir.of_type("Device")] == ["densenet121-res224-all"]
    # What the node's own FHIR API serves: every stored resource version.
    stored = carina_db_rows(node, "SELECT resource_type, resource_id, body FROM fhir_resources")
    assert stored and all("cand" not in body for _, _, body in stored)
    assert len({rid for rtype, rid, _ in stored if rtype == "Device"}) == 1


def test_agreement_and_feedback_figures(shadowed):
    node = shadowed["node"]
    db = Database(f"sqlite:///{node.workdir / 'var' / 'carina.db'}")
    stored = rows(node)
    first, second, third = stored
    with db.session() as s:
        version = {r["study_id"]: s.get(Study, r["study_id"]).version for r in stored}
        save(s, study_id=first["study_id"], study_version=version[first["study_id"]], sop_instance_uid=first["sop"],
             label="Effusion", verdict="agree", user="dr.a")
        mine = save(s, study_id=first["study_id"], study_version=version[first["study_id"]], sop_instance_uid=first["sop"],
                    label="Cardiomegaly", verdict="agree", user="dr.a")
        # Two radiologists who disagree with each other: that finding stays unlabelled.
        for user, verdict in (("dr.a", "disagree"), ("dr.b", "agree")):
            save(s, study_id=second["study_id"], study_version=version[second["study_id"]], sop_instance_uid=second["sop"],
                 label="Cardiomegaly", verdict=verdict, user=user)
        save(s, study_id=third["study_id"], study_version=version[third["study_id"]], sop_instance_uid=third["sop"],
             label="Cardiomegaly", verdict="uncertain", user="dr.b", comment="rotated film")
        save(s, study_id=third["study_id"], study_version=version[third["study_id"]], sop_instance_uid=third["sop"],
             label="Effusion", verdict="disagree", user="dr.b")
    with db.session() as s:
        with pytest.raises(NotAuthor):
            update(s, mine.id, user="dr.b", verdict="disagree")
        assert update(s, mine.id, user="dr.a", verdict="disagree", comment="on review").verdict == "disagree"
    db.dispose()

    view = node.api("/api/v1/shadow")
    assert view["shadow_model"] == CANDIDATE and view["images"] == 3 and view["studies"] == 3
    ap = np.array([json.loads(r["ap"]) for r in stored]) >= np.array([json.loads(r["at"]) for r in stored])
    sp = np.array([json.loads(r["sp"]) for r in stored]) >= np.array([json.loads(r["st"]) for r in stored])
    for i, label in enumerate(CHESTXRAY14):
        a, b = ap[:, i], sp[:, i]
        row = view["pathologies"][label]["agreement"]
        assert (row["both_positive"], row["both_negative"]) == (int((a & b).sum()), int((~a & ~b).sum()))
        pos = 2 * (a & b).sum() + (a ^ b).sum()
        assert row["positive_agreement"] == (None if 2 * (a & b).sum() + (a ^ b).sum() == 0 else pytest.approx(2 * (a & b).sum() / pos))
        pe = a.mean() * b.mean() + (1 - a.mean()) * (1 - b.mean())
        expected_kappa = None if pe == 1 else ((a == b).mean() - pe) / (1 - pe)
        assert row["kappa"] == (None if expected_kappa is None else pytest.approx(expected_kappa, abs=1e-12))

    # Feedback truth: agree -> the active model's verdict; disagree -> its opposite; uncertain/conflict -> none.
    truth = {"Cardiomegaly": {0: 1 - ap[0, 10]},  # dr.a changed "agree" to "disagree"
             "Effusion": {0: ap[0, 7], 2: 1 - ap[2, 7]}}
    for label, labelled in truth.items():
        fb = view["pathologies"][label]["feedback"]
        assert fb["images"] == len(labelled)
        i = CHESTXRAY14.index(label)
        for who, verdicts in (("active", ap[:, i]), ("shadow", sp[:, i])):
            y = np.array([labelled[j] for j in labelled], dtype=bool)
            v = np.array([verdicts[j] for j in labelled], dtype=bool)
            sens = fb[who]["sensitivity"]
            assert sens["n"] == int(y.sum()) and sens["value"] == (None if not y.any() else pytest.approx((v & y).sum() / y.sum()))
            spec = fb[who]["specificity"]
            assert spec["n"] == int((~y).sum()) and spec["value"] == (None if y.all() else pytest.approx((~v & ~y).sum() / (~y).sum()))
    assert view["pathologies"]["Atelectasis"]["feedback"] == {"images": 0}

    # The same table as CSV.
    rsp = httpx.get(f"{node.url}/api/v1/shadow.csv", headers={"Authorization": f"Bearer {node.token}"})
    assert rsp.status_code == 200 and rsp.headers["content-type"].startswith("text/csv")
    table = list(csv.DictReader(io.StringIO(rsp.text.split("\n", 1)[1])))
    assert [r["pathology"] for r in table] == list(CHESTXRAY14)
    for r in table:
        kappa = view["pathologies"][r["pathology"]]["agreement"]["kappa"]
        assert (r["kappa"] == "") if kappa is None else float(r["kappa"]) == pytest.approx(kappa, abs=1e-6)
    assert httpx.get(f"{node.url}/ui/shadow.html").status_code == 200  # the admin page


def test_feedback_exports_as_a_labelled_set(shadowed):
    node = shadowed["node"]
    out = node.workdir / "feedback.csv"
    proc = node.carina("feedback", "export", "--out", str(out))
    assert "wrote 2 labelled image(s)" in proc.stdout  # images 1 and 3; image 2's only finding is in conflict
    labelled = read_labels(out)
    assert labelled.format == "columns" and labelled.pathologies == ("Effusion", "Cardiomegaly")
    assert set(labelled.ignored_columns) == {"study_instance_uid", "sop_instance_uid"}
    instances = node.workdir / "var" / "instances"
    for image in labelled.images:
        assert (instances / image.name).is_file()  # --images <data_dir>/instances finds every image
    counts = sorted(len(image.labels) for image in labelled.images)
    assert counts == [1, 2]  # image 3: Effusion only (its Cardiomegaly was "uncertain")


def test_admin_page_shows_the_comparison_and_exports_csv(shadowed, tmp_path):
    """/ui/shadow.html in Debian's Chromium (Playwright drives it; no browser download)."""
    from playwright.sync_api import expect, sync_playwright

    from peers import require_tool

    node = shadowed["node"]
    chromium = require_tool("chromium")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium,
                                    args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        try:
            page = browser.new_page(accept_downloads=True)
            page.goto(f"{node.url}/ui/shadow.html")
            expect(page.locator("#login")).to_be_visible()  # no token yet: the API answered 401
            page.fill("#token", node.token)
            page.click("#save-token")
            expect(page.locator("#model")).to_have_text(f"candidate {CANDIDATE}")
            expect(page.locator("#shadow tbody tr")).to_have_count(len(CHESTXRAY14))
            expect(page.locator("#summary")).to_contain_text("3 images in 3 studies")
            with page.expect_download() as download:
                page.click("#csv")
            text = open(download.value.path()).read()
            assert text.splitlines()[1].startswith("pathology,images,both_positive")
            page.screenshot(path=str(tmp_path / "shadow.png"), full_page=True)
        finally:
            browser.close()
