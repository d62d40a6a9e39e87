"""The reading web app's server side on a real `create_app` (uvicorn on loopback,
tests/security_rig.py) with studies scored by the demo model: the worklist's
order, filters and ETag polling; the pages' login redirect and 403; the
viewer's images (the pipeline's rendering, MONOCHROME1 included), heatmap
overlays, downloads and FHIR bundle; feedback (author-only edits, the CSV
labelled set); the upload (one image, a zip, hostile zips); the admin pages'
model activation through the guard, rollback, and destination probes against
real peers (Orthanc, python-hl7, Carina's own FHIR API). Every PHI access is
checked in the audit trail. The browser side is tests/test_reading_app_ui.py."""
from __future__ import annotations

import hashlib
import io
import json
import re
import time
import zipfile
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import func, select

import dicom_factory as f
import security_rig
from inference.types import CHESTXRAY14
from node import results
from node.db import AuditRecord, Instance, InstanceRevision, Output, Study, StudyTriage
from node.fhir_store import save_resources
from node.outputs.fhir_report import build_report_resources
from node.outputs.sc import display_rendition
from node.renditions import read_rendition, rendition_bytes
from node.report import Triage
from node.states import Priority
from node.storage import display_path, instance_path
from scored_factory import scored_study
from security_rig import PASSWORD

PNGS = [p.read_bytes() for p in f.NIH_PNGS]
HTML = {"Accept": "text/html"}


@pytest.fixture(scope="module")
def engine(demo_model):
    from inference.batcher import BatchingEngine
    from inference.engine import InferenceEngine

    engine = BatchingEngine(InferenceEngine(demo_model), max_batch=4, max_wait_ms=2)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def rig(tmp_path_factory, engine, module_backend):
    """The reading app's server over SQLite, then over PostgreSQL (tests/conftest.py module_backend)."""
    settings = {"security": {"login_rate": {"requests": 1000, "per_seconds": 60},
                             "predict_rate": {"requests": 1000, "per_seconds": 60}},
                "ui": {"upload": {"max_members": 4}}}
    rig, server, thread = security_rig.start(tmp_path_factory.mktemp("reading"), engine=engine, settings=settings,
                                             database_url=module_backend)
    try:
        rig.studies = seed_studies(rig, engine)
        yield rig
    finally:
        security_rig.stop(server, thread, rig)


def add_study(rig, engine, datasets, *, priority: Priority, versions: int = 1, keep_display: bool = True,
              patient_name: str = "Doe^Jane", study_date: str = "20261121") -> dict:
    """A done study as the pipeline leaves it: received files, one scored study per version,
    the persisted triage, the display renditions (unless `keep_display` is False)."""
    from inference import decode_dicom

    ctx = rig.ctx
    decoded = [decode_dicom(ds) for ds in datasets]
    scored_results = engine.predict(decoded)
    sources = list(zip(datasets, scored_results))
    first = datasets[0]
    with ctx.db.session() as s:
        study = Study(calling_ae="MODALITY", study_uid=first.StudyInstanceUID, patient_id=str(first.PatientID),
                      accession_number=str(first.AccessionNumber), state="done", version=versions,
                      patient_name=patient_name, study_date=study_date, last_received_at=time.time())
        s.add(study)
        s.flush()
        for ds in datasets:
            path = instance_path(ctx.instances_dir, "MODALITY", first.StudyInstanceUID, ds.SOPInstanceUID)
            path.parent.mkdir(parents=True, exist_ok=True)
            f.write(ds, path)
            instance = Instance(study_id=study.id, sop_instance_uid=ds.SOPInstanceUID, sop_class_uid=ds.SOPClassUID,
                                path=str(path), state="scored")
            s.add(instance)
            s.flush()
            s.add(InstanceRevision(instance_id=instance.id, revision=1, sha256="", path=str(path)))
        for version in range(1, versions + 1):
            scored = scored_study(sources, version=version, triage=Triage(priority))
            results.store(s, study.id, scored)
            save_resources(s, build_report_resources(scored, patient_system=security_rig.SYSTEM), study.id)
        s.add(StudyTriage(study_id=study.id, priority=priority, reason="test", version=versions))
        study_id = study.id
    if keep_display:
        for ds, image in zip(datasets, decoded):
            for version in range(1, versions + 1):
                target = display_path(ctx.work_dir, "MODALITY", first.StudyInstanceUID, version, ds.SOPInstanceUID)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(rendition_bytes(display_rendition(image)))
    positives = sorted({fi.label for r in scored_results for fi in r.findings if fi.positive})
    return {"id": study_id, "uid": first.StudyInstanceUID, "patient_id": str(first.PatientID),
            "sops": [ds.SOPInstanceUID for ds in datasets], "positives": positives, "datasets": datasets}


def seed_studies(rig, engine) -> dict:
    """stat: older and STAT; new: the newest, routine, amended (2 versions); mono1/mono2: the same
    radiograph stored MONOCHROME1 and MONOCHROME2, without kept renditions (decoded on demand)."""
    stat = add_study(rig, engine, [f.make_dx(f.png_pixels(f.NIH_PNGS[1]), patient_id="PAT-STAT", accession="ACC-STAT")],
                     priority=Priority.STAT, patient_name="Urgent^Ursula", study_date="20261120")
    pixels = f.png_pixels(f.NIH_PNGS[0])[::4, ::4]
    mono1 = add_study(rig, engine, [f.make_dx(pixels, photometric="MONOCHROME1", patient_id="PAT-M1")],
                      priority=Priority.ROUTINE, keep_display=False, patient_name="Mono^One", study_date="20261001")
    mono2 = add_study(rig, engine, [f.make_dx(pixels, patient_id="PAT-M2")],
                      priority=Priority.ROUTINE, keep_display=False, patient_name="Mono^Two", study_date="20261002")
    new = add_study(rig, engine, [f.make_dx(f.png_pixels(f.NIH_PNGS[0]), patient_id="PAT-NEW", accession="ACC-NEW")],
                    priority=Priority.ROUTINE, versions=2, patient_name="Newest^Nora", study_date="20261121")
    return {"stat": stat, "mono1": mono1, "mono2": mono2, "new": new}


def row_ids(html: str) -> list[int]:
    return [int(m) for m in re.findall(r'<tr class="study[^"]*" data-id="(\d+)"', html)]


def audit_count(rig, event_id: str) -> int:
    with rig.ctx.db.session() as s:
        return s.scalar(select(func.count()).select_from(AuditRecord).where(AuditRecord.event_id == event_id))


def last_audit(rig) -> AuditRecord:
    with rig.ctx.db.session() as s:
        return s.scalars(select(AuditRecord).order_by(AuditRecord.seq.desc()).limit(1)).one()


# --- the worklist ------------------------------------------------------------------------------


def test_worklist_puts_stat_first_then_newest_and_filters(rig):
    st = rig.studies
    client, _ = rig.login("user-radiologist")
    with closing(client):
        page = client.get("/", headers=HTML)
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        ids = row_ids(page.text)
        # STAT first although older; then newest first (the rig's own study was seeded first, so it is last).
        assert ids == [st["stat"]["id"], st["new"]["id"], st["mono2"]["id"], st["mono1"]["id"], rig.seeded.study_row_id]
        assert "URGENT, Ursula" in page.text and "PAT-STAT" in page.text and "ACC-STAT" in page.text
        assert "2026-11-20" in page.text
        for label in st["stat"]["positives"]:
            assert f'<span class="chip">{label.replace("_", " ")}</span>' in page.text

        def ids_for(**params):
            rsp = client.get("/", params=params, headers=HTML)
            assert rsp.status_code == 200, rsp.text
            return row_ids(rsp.text)

        assert ids_for(priority="stat") == [st["stat"]["id"]]
        assert st["stat"]["id"] not in ids_for(priority="routine")
        only_stat = sorted(set(st["stat"]["positives"]) - set(st["new"]["positives"]))
        assert only_stat, "the two radiographs should differ in a positive finding"
        order = [st[k] for k in ("stat", "new", "mono2", "mono1")]
        assert ids_for(finding=only_stat[0]) == [x["id"] for x in order if only_stat[0] in x["positives"]]
        assert st["new"]["id"] not in ids_for(finding=only_stat[0])
        assert ids_for(q="ursula") == [st["stat"]["id"]]
        assert ids_for(q="acc-new") == [st["new"]["id"]]
        assert ids_for(q="PAT-M") == [st["mono2"]["id"], st["mono1"]["id"]]
        assert ids_for(q="100%_") == []  # LIKE wildcards are searched for literally
        assert ids_for(date_from="2026-10-01", date_to="2026-10-01") == [st["mono1"]["id"]]
        assert ids_for(state="failed") == []
        assert client.get("/", params={"finding": "Flu"}, headers=HTML).status_code == 400


def test_worklist_polling_answers_304_while_unchanged_and_audits_only_what_it_sends(rig, engine):
    client, _ = rig.login("user-viewer")
    with closing(client):
        page = client.get("/", headers=HTML)
        etag = re.search(r'data-etag="([^"]+)"', page.text).group(1).replace("&#34;", '"')
        queries = audit_count(rig, "110112")
        same = client.get("/worklist/rows", headers={"If-None-Match": etag})
        assert same.status_code == 304 and same.content == b""
        assert audit_count(rig, "110112") == queries  # nothing sent, nothing read
        added = add_study(rig, engine, [f.make_dx(np.full((32, 32), 90, np.uint8), patient_id="PAT-LATE")],
                          priority=Priority.ROUTINE, patient_name="Late^<script>alert(1)</script>")
        changed = client.get("/worklist/rows", headers={"If-None-Match": etag})
        assert changed.status_code == 200 and changed.headers["etag"] != etag
        assert "<script" not in changed.text and "LATE, &lt;script&gt;alert(1)&lt;/script&gt;" in changed.text  # escaped
        assert row_ids(changed.text)[1] == added["id"]  # below the STAT study, above the older ones
        assert audit_count(rig, "110112") == queries + 1
        assert "PAT-LATE" in last_audit(rig).xml


# --- pages: login redirect, refusals -----------------------------------------------------------


def test_pages_send_a_browser_to_login_and_refuse_other_roles_with_a_page(rig):
    with rig.client() as anonymous:
        rsp = anonymous.get("/studies/1?version=1", headers=HTML, follow_redirects=False)
        assert rsp.status_code == 303 and rsp.headers["location"] == "/login?next=%2Fstudies%2F1%3Fversion%3D1"
        assert anonymous.get("/studies/1").status_code == 401  # a script, not a browser: the JSON answer
        login = anonymous.get("/login", headers=HTML)
        assert login.status_code == 200 and 'id="login-form"' in login.text
    client, _ = rig.login("user-radiologist")
    with closing(client):
        for page in ("/admin/models", "/admin/system", "/audit"):
            refused = client.get(page, headers=HTML)
            assert refused.status_code == 403 and "Not allowed" in refused.text, page
            assert "lacks admin" in last_audit(rig).xml
        assert client.get("/admin/models").json()["detail"].startswith("role 'radiologist' may not")
        home = client.get("/", headers=HTML).text
        assert 'href="/upload"' in home and 'href="/admin/models"' not in home  # the menu follows the role
    client, _ = rig.login("user-admin")
    with closing(client):
        home = client.get("/", headers=HTML).text
        assert 'id="audit-link"' in home and 'href="/admin/system"' in home


# --- the viewer --------------------------------------------------------------------------------


def test_viewer_page_shows_the_study_versions_downloads_and_audits_the_read(rig):
    new = rig.studies["new"]
    with rig.ctx.db.session() as s:
        s.add(Output(study_id=new["id"], version=2, kind="sr", sop_instance_uid="1.2.3.4", sop_class_uid="1.2",
                     series_uid="1.2.3", path=str(rig.ctx.outputs_dir / "none.dcm")))
    client, _ = rig.login("user-radiologist")
    with closing(client):
        page = client.get(f"/studies/{new['id']}", headers=HTML)
        assert page.status_code == 200
        text = page.text
        assert "NEWEST, Nora" in text and "version 2 of 2" in text
        assert text.count('<tr class="finding') == 14 and "Operating point" in text and "Severity" in text
        assert 'id="demo-banner"' in text and "DEMO WEIGHTS" in text
        assert 'id="priors"' in text and "v1" in text  # the amended study's earlier version, side by side
        assert f'/api/v1/read/{new["id"]}/fhir.json' in text and "Structured report (SR)" in text
        assert 'class="feedback-form"' in text and 'id="feedback-export"' in text
        images = json.loads(re.search(r"data-images='([^']+)'", text).group(1))
        assert [im["sop_instance_uid"] for im in images] == new["sops"]
        assert len(images[0]["findings"]) == 14
        assert any(fi["regions"] for fi in images[0]["findings"] if fi["positive"])
        assert last_audit(rig).event_id == "110110" and "PAT-NEW" in last_audit(rig).xml
        older = client.get(f"/studies/{new['id']}?version=1", headers=HTML)
        assert older.status_code == 200 and "version 1 of 2" in older.text and "(see the latest)" in older.text
        assert client.get(f"/studies/{new['id']}?version=7", headers=HTML).status_code == 404
    client, _ = rig.login("user-viewer")
    with closing(client):
        text = client.get(f"/studies/{new['id']}", headers=HTML).text
        assert 'class="feedback-form"' not in text  # viewers read; radiologists give feedback


def test_image_is_the_pipelines_rendering_and_monochrome1_reads_like_monochrome2(rig):
    st = rig.studies
    client, _ = rig.login("user-viewer")
    with closing(client):
        def image(study, version=1):
            rsp = client.get(f"/api/v1/read/{study['id']}/images/{study['sops'][0]}.png", params={"version": version})
            assert rsp.status_code == 200, rsp.text
            assert rsp.headers["content-type"] == "image/png" and rsp.headers["cache-control"] == "private, no-store"
            return rsp

        kept = image(st["stat"])
        path = display_path(rig.ctx.work_dir, "MODALITY", st["stat"]["uid"], 1, st["stat"]["sops"][0])
        # the infer stage's rendition, as it kept it (uncompressed), served as a lossless PNG
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(kept.content))), read_rendition(path))
        audited = last_audit(rig)
        assert audited.event_id == "110110" and "PAT-STAT" in audited.xml and "/images/" in audited.xml

        # Without a kept rendition the stored file is decoded again, the same way (VOI, MONOCHROME1).
        mono1 = np.asarray(Image.open(io.BytesIO(image(st["mono1"]).content)), np.int16)
        mono2 = np.asarray(Image.open(io.BytesIO(image(st["mono2"]).content)), np.int16)
        assert mono1.shape == mono2.shape == (128, 128)
        assert np.abs(mono1 - mono2).max() <= 1  # the same radiograph, not its negative
        assert mono1.std() > 10
        assert client.get(f"/api/v1/read/{st['stat']['id']}/images/1.2.3.png", params={"version": 1}).status_code == 404
        assert client.get(f"/api/v1/read/{st['stat']['id']}/images/{st['stat']['sops'][0]}.png",
                          params={"version": 9}).status_code == 404


def test_heatmap_overlay_is_transparent_where_cold_and_audited(rig):
    st = rig.studies["stat"]
    label = st["positives"][0]
    client, _ = rig.login("user-viewer")
    with closing(client):
        rsp = client.get(f"/api/v1/read/{st['id']}/heatmaps/{st['sops'][0]}/{label}.png", params={"version": 1})
        assert rsp.status_code == 200 and rsp.headers["cache-control"] == "private, no-store"
        overlay = np.asarray(Image.open(io.BytesIO(rsp.content)))
        assert overlay.shape == (128, 128, 4)
        assert overlay[..., 3].max() > 200 and overlay[..., 3].min() == 0  # hot somewhere, transparent elsewhere
        assert "/heatmaps/" in last_audit(rig).xml
        assert client.get(f"/api/v1/read/{st['id']}/heatmaps/{st['sops'][0]}/Flu.png",
                          params={"version": 1}).status_code == 404


def test_downloads_serve_any_output_kind_and_the_fhir_bundle_as_exports(rig):
    st = rig.studies["stat"]
    pdf = rig.ctx.outputs_dir / "report.pdf"
    pdf.parent.mkdir(parents=True, exist_ok=True)
    pdf.write_bytes(b"%PDF-1.7\n%test\n")
    with rig.ctx.db.session() as s:
        # A kind this branch does not make (the PDF report): listed and served like the others.
        out = Output(study_id=st["id"], version=1, kind="pdf", sop_instance_uid="1.2.826.0.1.9", sop_class_uid="1.2",
                     series_uid="1.2.3", path=str(pdf))
        s.add(out)
        s.flush()
        pdf_id = out.id
    client, _ = rig.login("user-viewer")
    with closing(client):
        page = client.get(f"/studies/{st['id']}", headers=HTML).text
        assert f"/outputs/{pdf_id}" in page and "PDF report" in page
        rsp = client.get(f"/api/v1/read/{st['id']}/outputs/{pdf_id}")
        assert rsp.status_code == 200 and rsp.content == pdf.read_bytes()
        assert rsp.headers["content-type"] == "application/pdf"
        assert 'filename="carina-pdf-1.2.826.0.1.9.pdf"' in rsp.headers["content-disposition"]
        exported = last_audit(rig)
        assert exported.event_id == "110106" and "PAT-STAT" in exported.xml
        sr = client.get(f"/api/v1/read/{rig.seeded.study_row_id}/outputs/{rig.seeded.output_id}")
        assert sr.status_code == 200 and sr.headers["content-type"] == "application/dicom"
        # An output of another study is not this study's.
        assert client.get(f"/api/v1/read/{st['id']}/outputs/{rig.seeded.output_id}").status_code == 404

        bundle = client.get(f"/api/v1/read/{st['id']}/fhir.json")
        assert bundle.status_code == 200 and bundle.headers["content-type"].startswith("application/fhir+json")
        kinds = [e["resource"]["resourceType"] for e in bundle.json()["entry"]]
        assert kinds.count("DiagnosticReport") == 1 and kinds.count("Observation") == len(CHESTXRAY14)
        assert "Patient" in kinds and "Device" in kinds
        assert last_audit(rig).event_id == "110106"


# --- feedback ----------------------------------------------------------------------------------


def test_feedback_is_stored_with_its_author_editable_only_by_them_and_exported(rig):
    from node.users import add_user

    st = rig.studies["stat"]
    label = st["positives"][0]
    add_user(rig.ctx.db, "second-reader", "radiologist", PASSWORD, min_length=12)
    url = f"/api/v1/read/{st['id']}/feedback"
    body = {"version": 1, "sop_instance_uid": st["sops"][0], "label": label, "verdict": "disagree", "comment": "artefact"}
    first, csrf = rig.login("user-radiologist")
    second, csrf2 = rig.login("second-reader")
    viewer, csrf3 = rig.login("user-viewer")
    with closing(first), closing(second), closing(viewer):
        saved = first.put(url, json=body, headers={"X-CSRF-Token": csrf})
        assert saved.status_code == 200, saved.text
        row = saved.json()
        assert (row["user"], row["verdict"], row["comment"], row["mine"], row["model_positive"]) == \
            ("user-radiologist", "disagree", "artefact", True, True)
        created = last_audit(rig)
        assert (created.event_id, created.action) == ("110110", "C") and "PAT-STAT" in created.xml
        again = first.put(url, json=body | {"verdict": "uncertain"}, headers={"X-CSRF-Token": csrf}).json()
        assert again["id"] == row["id"] and again["verdict"] == "uncertain"  # the author's row, changed
        assert last_audit(rig).action == "U"
        assert second.patch(f"/api/v1/feedback/{row['id']}", json={"verdict": "agree"},
                            headers={"X-CSRF-Token": csrf2}).status_code == 403
        changed = first.patch(f"/api/v1/feedback/{row['id']}", json={"verdict": "disagree"}, headers={"X-CSRF-Token": csrf})
        assert changed.status_code == 200 and changed.json()["verdict"] == "disagree"
        assert viewer.put(url, json=body, headers={"X-CSRF-Token": csrf3}).status_code == 403
        assert first.put(url, json=body | {"label": "Flu"}, headers={"X-CSRF-Token": csrf}).status_code == 422
        assert first.put(url, json=body | {"verdict": "maybe"}, headers={"X-CSRF-Token": csrf}).status_code == 422
        listed = second.get(url, params={"version": 1}).json()["feedback"]
        assert [(r["user"], r["mine"]) for r in listed] == [("user-radiologist", False)]
        page = first.get(f"/studies/{st['id']}", headers=HTML).text
        assert re.search(r'<option value="disagree" selected>', page) and 'value="artefact"' in page

        export = first.get("/api/v1/feedback/export.csv")
        assert export.status_code == 200 and export.headers["content-type"].startswith("text/csv")
        lines = export.text.splitlines()
        assert lines[0].split(",")[:3] == ["image", "study_instance_uid", "sop_instance_uid"]
        row_of = {line.split(",")[2]: line.split(",") for line in lines[1:]}
        exported = row_of[st["sops"][0]]
        header = lines[0].split(",")
        assert exported[header.index(label)] == "0"  # "disagree" with a positive: labelled negative
        assert exported[0] == str(Path("MODALITY") / st["uid"] / f"{st['sops'][0]}.dcm")
        assert last_audit(rig).event_id == "110106" and "PAT-STAT" in last_audit(rig).xml


# --- upload ------------------------------------------------------------------------------------


def ndjson(rsp) -> list[dict]:
    assert rsp.status_code == 200, rsp.text
    assert rsp.headers["content-type"].startswith("application/x-ndjson")
    return [json.loads(line) for line in rsp.text.splitlines() if line]


def zipped(members: dict[str, bytes], compression=zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def test_upload_of_one_png_streams_its_result_with_what_the_viewer_draws(rig):
    client, csrf = rig.login("user-radiologist")
    imports = audit_count(rig, "110107")
    with closing(client):
        lines = ndjson(client.post("/api/v1/upload", files={"file": ("chest.png", PNGS[1], "image/png")},
                                   headers={"X-CSRF-Token": csrf}))
    assert [line["type"] for line in lines] == ["start", "result", "done"]
    assert lines[0] == {"type": "start", "total": 1, "archive": False}
    result = lines[1]
    assert result["status"] == "success" and result["name"] == "chest.png"
    assert result["metadata"]["demo"] is True and len(result["prediction"]["diagnoses"]) == 14
    view = result["view"]
    assert view["image"].startswith("data:image/jpeg;base64,") and view["source_shape"] == [512, 512]
    assert set(view["heatmaps"]) == set(CHESTXRAY14) and all(v.startswith("data:image/png;base64,") for v in view["heatmaps"].values())
    assert {fi["label"] for fi in view["findings"] if fi["positive"]} == \
        {d["condition"] for d in result["prediction"]["diagnoses"] if d["positive"]}
    assert lines[2] == {"type": "done", "scored": 1, "failed": 0}
    assert audit_count(rig, "110107") == imports + 1


def test_upload_of_a_zip_scores_each_member_and_reports_the_rest(rig):
    dicom = io.BytesIO()
    f.make_dx(f.png_pixels()[::4, ::4], patient_id="PAT-ZIP").save_as(dicom, enforce_file_format=True)
    archive = zipped({"a/one.png": PNGS[0], "two.dcm": dicom.getvalue(), "notes.txt": b"not an image",
                      "inner.zip": zipped({"x.png": PNGS[0]}), "__MACOSX/a/._one.png": b"junk", "empty/": b""})
    client, csrf = rig.login("user-radiologist")
    imports = audit_count(rig, "110107")
    with closing(client):
        lines = ndjson(client.post("/api/v1/upload", files={"file": ("batch.zip", archive, "application/zip")},
                                   headers={"X-CSRF-Token": csrf}))
    assert lines[0] == {"type": "start", "total": 4, "archive": True}  # the resource fork and the folder are skipped
    by_name = {line["name"]: line for line in lines[1:-1]}
    assert [line["index"] for line in lines[1:-1]] == [0, 1, 2, 3]
    assert by_name["a/one.png"]["status"] == by_name["two.dcm"]["status"] == "success"
    assert by_name["notes.txt"]["status"] == "error" and by_name["notes.txt"]["http_status"] == 415
    assert by_name["inner.zip"]["reason"] == "a zip inside the zip is not opened"
    assert lines[-1] == {"type": "done", "scored": 2, "failed": 2}
    assert audit_count(rig, "110107") == imports + 3  # each image offered to the model (the nested zip was not)
    assert "PAT-ZIP" in "".join(r.xml for r in _recent(rig, 3))


def _recent(rig, n: int) -> list[AuditRecord]:
    with rig.ctx.db.session() as s:
        return s.scalars(select(AuditRecord).order_by(AuditRecord.seq.desc()).limit(n)).all()


@pytest.mark.parametrize("case", ["traversal", "absolute", "bomb", "too_many", "not_a_zip"])
def test_hostile_zips_are_refused_before_anything_is_scored(rig, case):
    if case == "traversal":
        archive, why = zipped({"ok.png": PNGS[0], "../../etc/evil.png": PNGS[0]}), "path traversal"
    elif case == "absolute":
        archive, why = zipped({"/tmp/evil.png": PNGS[0]}), "path traversal"
    elif case == "bomb":
        archive, why = zipped({"zeros.dcm": bytes(8 * 1024 * 1024)}), "zip bomb"  # 8 MB of zeros: ~1000-fold
    elif case == "too_many":
        archive, why = zipped({f"{n}.png": PNGS[0] for n in range(5)}), "at most 4 (ui.upload.max_members)"
    else:
        archive, why = b"PK\x03\x04" + b"\x00" * 200, "not a readable zip archive"
    client, csrf = rig.login("user-radiologist")
    imports = audit_count(rig, "110107")
    with closing(client):
        rsp = client.post("/api/v1/upload", files={"file": ("x.zip", archive, "application/zip")},
                          headers={"X-CSRF-Token": csrf})
    assert rsp.status_code == 422 and why in rsp.json()["reason"], rsp.text
    assert audit_count(rig, "110107") == imports + 1  # one refused import, no image scored
    assert last_audit(rig).outcome == 4


def test_zip_members_are_read_no_further_than_their_bounds():
    from node.uploads import Limits, open_archive, unsafe_name

    for name in ("../a.png", "a/../../b", "/abs.png", "C:evil.png", "a\\b.png", "nul\x00.png", ""):
        assert unsafe_name(name), name
    for name in ("a.png", "dir/sub/a.dcm", "..hidden/a.png", "a..b.png"):
        assert not unsafe_name(name), name
    from node.uploads import ArchiveRefused

    limits = Limits(member_bytes=1000, max_members=10, total_bytes=2000, max_ratio=100)
    total, members = open_archive(io.BytesIO(zipped({"a": b"x" * 800, "b": b"y" * 800, "c": b"z" * 10})), limits)
    assert total == 3 and [m.data for m in members] == [b"x" * 800, b"y" * 800, b"z" * 10]
    # Declared sizes over the total are refused as a whole, before anything is read.
    with pytest.raises(ArchiveRefused, match="max_total_mb"):
        open_archive(io.BytesIO(zipped({"a": b"x" * 800, "b": b"y" * 800, "c": b"z" * 500})), limits)
    with pytest.raises(ArchiveRefused, match="one image is at most 1,000"):
        open_archive(io.BytesIO(zipped({"big": b"x" * 1001})), limits)
    with pytest.raises(ArchiveRefused, match="encrypted"):
        data = bytearray(zipped({"a": b"secret"}, zipfile.ZIP_STORED))
        data[6] |= 1  # the local header's general purpose flag: encrypted
        cd = data.rfind(b"PK\x01\x02")
        data[cd + 8] |= 1  # and the central directory's, which zipfile reads
        open_archive(io.BytesIO(bytes(data)), limits)


# --- administration ----------------------------------------------------------------------------


def _fake_model(root: Path, name: str, version: str, heldout: dict | None = None) -> None:
    directory = root / name / version
    directory.mkdir(parents=True)
    weights = directory / "model.safetensors"
    weights.write_bytes(f"weights of {name}@{version}".encode())
    meta = {"name": name, "version": version, "sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
            "imported_at": "2026-11-30T00:00:00+00:00", "op_threshs": [0.5] * 18}
    if heldout is not None:
        meta |= {"parent": f"{name}@1", "finetune": {}, "heldout": heldout}
    (directory / "model.json").write_text(json.dumps(meta))


def test_admin_activates_models_through_the_guard_and_rolls_back(rig):
    root = rig.ctx.data_dir / "models"
    _fake_model(root, "cxr", "1")
    _fake_model(root, "cxr", "2", heldout={"pathologies": {"Effusion": {
        "candidate_auroc": 0.70, "parent_auroc": 0.85, "delta": -0.15, "delta_ci": [-0.25, -0.05]}}})
    client, csrf = rig.login("user-admin")
    headers = {"X-CSRF-Token": csrf}
    with closing(client):
        first = client.post("/api/v1/admin/models/activate", json={"ref": "cxr@1"}, headers=headers)
        assert first.status_code == 200 and first.json()["active"] == "cxr@1"
        audited = last_audit(rig)
        assert audited.event_type == "110131" and "model:cxr@1" in audited.xml and audited.user_id == "user-admin"
        refused = client.post("/api/v1/admin/models/activate", json={"ref": "cxr@2"}, headers=headers)
        assert refused.status_code == 409 and "Effusion" in refused.json()["reasons"][0]
        assert last_audit(rig).outcome == 4 and (root / "ACTIVE").read_text().strip() == "cxr@1"
        forced = client.post("/api/v1/admin/models/activate", json={"ref": "cxr@2", "force": True}, headers=headers)
        assert forced.status_code == 200 and forced.json()["forced"] is True
        assert "overridden" in last_audit(rig).xml
        view = client.get("/api/v1/admin/models").json()
        assert view["active"] == "cxr@2" and view["rollback_to"] == "cxr@1"
        entry = next(e for e in view["entries"] if e["ref"] == "cxr@2")
        assert entry["imported_at"] and len(entry["weights_sha256"]) == 64 and entry["lineage"] == "fine-tuned from cxr@1"
        page = client.get("/admin/models", headers=HTML).text
        assert "Roll back to cxr@1" in page and "cxr@2" in page and entry["weights_sha256"][:16] in page
        back = client.post("/api/v1/admin/models/rollback", json={}, headers=headers)
        assert back.status_code == 200 and back.json()["active"] == "cxr@1" and back.json()["previous"] == "cxr@2"
        activations = [json.loads(line) for line in (root / "activations.jsonl").read_text().splitlines()]
        assert [a["ref"] for a in activations] == ["cxr@1", "cxr@2", "cxr@1"]
        assert activations[1]["forced"] is True and activations[0]["user"] == "user-admin (web)"
        assert client.post("/api/v1/admin/models/activate", json={"ref": "cxr@9"}, headers=headers).status_code == 404
    radiologist, csrf = rig.login("user-radiologist")
    with closing(radiologist):
        assert radiologist.post("/api/v1/admin/models/activate", json={"ref": "cxr@1"},
                                headers={"X-CSRF-Token": csrf}).status_code == 403


def test_system_page_shows_queues_dead_letters_and_disk(rig):
    job = rig.dead_job()
    client, csrf = rig.login("user-admin")
    with closing(client):
        page = client.get("/admin/system", headers=HTML)
        assert page.status_code == 200
        assert 'id="queue"' in page.text and 'id="throughput"' in page.text and 'id="disk-meter"' in page.text
        assert f'data-job="{job}"' in page.text and "pacs refused: DICOM status 0xA700" in page.text
        assert client.post(f"/api/v1/jobs/{job}/retry", headers={"X-CSRF-Token": csrf}).json() == {"requeued": 1}
        assert f'data-job="{job}"' not in client.get("/admin/system", headers=HTML).text
        assert client.get("/api/v1/admin/destinations/health").json() == {"destinations": []}


def test_destination_probes_use_each_protocol_against_real_peers(rig, tmp_path):
    from hl7_peer import Hl7Peer
    from node.config import Settings
    from node.probes import probe_all
    from peers import Orthanc, free_port

    pacs = Orthanc(tmp_path / "orthanc").start()
    ris = Hl7Peer(tmp_path / "hl7").start()
    closed = free_port()
    try:
        settings = Settings(destinations=[
            {"name": "pacs", "type": "dicom", "ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.dicom_port},
            {"name": "ehr", "type": "fhir", "base_url": f"{rig.base}/fhir"},  # Carina's own FHIR API answers metadata
            {"name": "ris", "type": "hl7", "host": "127.0.0.1", "port": ris.port},
            {"name": "gone-pacs", "type": "dicom", "ae_title": "GONE", "host": "127.0.0.1", "port": closed},
            {"name": "not-fhir", "type": "fhir", "base_url": pacs.url},  # Orthanc's REST API has no /metadata
            {"name": "gone-ris", "type": "hl7", "host": "127.0.0.1", "port": closed},
        ])
        found = {r.name: r for r in probe_all(settings, timeout=3)}
    finally:
        ris.stop()
        pacs.stop()
    assert [(found[n].method, found[n].ok) for n in ("pacs", "ehr", "ris")] == [("C-ECHO", True), ("HTTP", True), ("MLLP", True)]
    assert found["pacs"].detail == "C-ECHO answered success"
    assert not found["gone-pacs"].ok and "no association" in found["gone-pacs"].detail
    assert not found["not-fhir"].ok and "HTTP 404" in found["not-fhir"].detail
    assert not found["gone-ris"].ok and "ConnectionRefusedError" in found["gone-ris"].detail
    assert ris.messages() == []  # the MLLP probe sends no message
