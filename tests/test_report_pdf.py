"""The printable PDF report, read back by real PDF tools, and its three uses.

poppler's `pdftotext` reads the findings, the disclaimer and the demo marking
(on every page), `pdftoppm` renders every page, `pdffonts` shows every font
embedded, `pdfinfo` the page count and the dates. The Encapsulated PDF passes
dciodvfy and comes back from a real Orthanc byte-identical; FHIR carries the
same bytes as presentedForm; the API serves them to a viewer (audited); each
use can be switched off.
"""
from __future__ import annotations

import base64
import dataclasses
import hashlib
import subprocess
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from pydicom import dcmread
from sqlalchemy import select

import golden_study as g
from inference import decode_dicom
from inference.types import DEMO_WARNING, ModelInfo
from node.api.app import create_app
from node.api.auth import create_token
from node.db import AuditRecord, FhirResource, Output
from node.outputs.encapsulated_pdf import ENCAPSULATED_PDF_STORAGE, document_bytes
from node.outputs.pdf_report import DISCLAIMER, predecessor_of, render_report_pdf, report_document_uid
from node.outputs.sc import display_rendition
from node.states import JobState
from node.storage import report_pdf_path
from node.terminology import load_terminology
from peers import Orthanc, require_tool
from pipeline_rig import PipelineRig
from scored_factory import scored_study
from test_outputs_sr import assert_valid_dicom

FONTS = Path("/usr/share/fonts/truetype/dejavu")
REAL = ModelInfo("densenet121-res224-all", "xrv-1", demo=False, weights_sha256="c0ffee" + "0" * 58)


def _tool(name: str, *args: str) -> str:
    proc = subprocess.run([require_tool(name), *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{name} {args}: {proc.stderr}"
    return proc.stdout


def pdf_text(path: Path, page: int | None = None) -> str:
    pages = ("-f", str(page), "-l", str(page)) if page else ()
    return _tool("pdftotext", "-layout", *pages, str(path), "-")


def page_count(path: Path) -> int:
    info = _tool("pdfinfo", str(path))
    return int(next(line.split()[-1] for line in info.splitlines() if line.startswith("Pages:")))


def squeeze(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture(scope="module")
def golden():
    """The golden study's two images, their display renditions and version 1 and 2 scored studies."""
    pairs, displays = [], {}
    for index, ds in enumerate(g.source_datasets()):
        image = decode_dicom(ds)
        pairs.append((ds, g.image_result(image, 1, index)))
        displays[str(ds.SOPInstanceUID)] = display_rendition(image)
    v1 = scored_study(pairs, model=g.MODEL, issued=g.ISSUED[0])
    v2 = scored_study(pairs, model=g.MODEL, version=2, issued=g.ISSUED[1])
    return pairs, displays, v1, v2


def _write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_the_report_reads_back_with_findings_disclaimer_and_demo_marking_on_every_page(tmp_path, golden):
    _, displays, v1, _ = golden
    path = _write(tmp_path, "v1.pdf", render_report_pdf(v1, displays, font_dir=FONTS))
    pages = page_count(path)
    assert 1 <= pages <= 2
    text = squeeze(pdf_text(path))
    terms = load_terminology()
    for label, (_, finding) in v1.strongest.items():
        row = f"{terms.finding(label).display}{' (critical)' if label in v1.triage.critical else ''} " \
              f"{finding.probability:.2f} {finding.threshold:.2f} {'positive' if finding.positive else 'negative'} " \
              f"{finding.severity}"
        assert row in text, row
    assert squeeze(DISCLAIMER) in text
    assert "Golden, Gloria M" in text and "GOLD-0042" in text and "ACCGOLD1" in text and g.STUDY_UID in text
    assert "Triage priority: STAT" in text
    assert "Model densenet121-res224-all Version demo-seed0" in text and "ab" * 32 in text
    for page in range(1, pages + 1):  # the em dash included, as printed
        assert DEMO_WARNING in pdf_text(path, page), f"page {page} lacks the demo marking"
    fonts = _tool("pdffonts", str(path)).splitlines()[2:]
    assert fonts and all(line.split()[-5] == "yes" for line in fonts), fonts  # every font embedded


def test_every_page_renders(tmp_path, golden):
    _, displays, v1, _ = golden
    path = _write(tmp_path, "v1.pdf", render_report_pdf(v1, displays, font_dir=FONTS))
    _tool("pdftoppm", "-r", "40", "-png", str(path), str(tmp_path / "page"))
    rendered = sorted(tmp_path.glob("page-*.png"))
    assert len(rendered) == page_count(path)
    for png in rendered:
        pixels = np.asarray(Image.open(png).convert("L"))
        assert pixels.min() < 64 and pixels.max() > 200, png  # text and paper, not a blank page
    # The heatmaps are in colour: the rendered pages hold saturated pixels.
    rgb = np.concatenate([np.asarray(Image.open(p).convert("RGB")).reshape(-1, 3) for p in rendered]).astype(int)
    assert ((rgb.max(axis=1) - rgb.min(axis=1)) > 120).sum() > 500


def test_same_scored_study_same_bytes_dated_by_its_issue_time(tmp_path, golden):
    _, displays, v1, _ = golden
    first = render_report_pdf(v1, displays, font_dir=FONTS)
    assert render_report_pdf(v1, displays, font_dir=FONTS) == first
    info = _tool("pdfinfo", "-isodates", str(_write(tmp_path, "v1.pdf", first)))
    assert "CreationDate:    2026-11-21T10:00:00Z" in info, info
    later = dataclasses.replace(v1, issued=g.ISSUED[1])
    assert render_report_pdf(later, displays, font_dir=FONTS) != first


def test_an_amended_version_says_so_and_names_the_one_it_supersedes(tmp_path, golden):
    _, displays, v1, v2 = golden
    path = _write(tmp_path, "v2.pdf", render_report_pdf(v2, displays, font_dir=FONTS, predecessor=predecessor_of(v1)))
    text = squeeze(pdf_text(path))
    assert "AMENDED REPORT — version 2, issued 2026-11-21 11:30 UTC" in text
    assert f"supersedes version 1 issued 2026-11-21 10:00 UTC (document {report_document_uid(v1)})" in text
    first = squeeze(pdf_text(_write(tmp_path, "v1.pdf", render_report_pdf(v1, displays, font_dir=FONTS))))
    assert "AMENDED" not in first and "Preliminary AI report, version 1" in first


def test_imported_weights_carry_no_demo_marking_and_a_name_outside_the_font_is_not_a_box(tmp_path, golden):
    pairs, displays, _, _ = golden
    pairs = [(ds.copy(), result) for ds, result in pairs]
    for ds, _ in pairs:
        ds.PatientName = "Ωμέγα^Жанна"  # Greek and Cyrillic: DejaVu has them
        ds.StudyDescription = "胸部 XR"  # CJK: DejaVu does not
    scored = scored_study(pairs, model=REAL)
    path = _write(tmp_path, "real.pdf", render_report_pdf(scored, displays, font_dir=FONTS))
    text = squeeze(pdf_text(path))
    assert "DEMO" not in text
    assert REAL.weights_sha256 in text and "Version xrv-1" in text
    assert "Ωμέγα, Жанна" in text
    assert "?? XR" in text  # no empty boxes: the missing glyphs print as "?"


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    pacs = Orthanc(tmp_path_factory.mktemp("orthanc-pdf")).start()
    yield pacs
    pacs.stop()


FINDINGS = {"Pneumothorax": 0.91, "Effusion": 0.73}


def test_encapsulated_pdf_is_valid_and_comes_back_from_orthanc_byte_identical(tmp_path, pacs):
    destination = {"name": "pacs", "type": "dicom", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.dicom_port}
    rig = PipelineRig(tmp_path, destinations=[destination])
    try:
        study_id, ds = rig.add_study(FINDINGS)
        rig.encode(study_id)
        assert rig.run_deliveries(study_id)["pacs"].state == JobState.DONE
        with rig.db.session() as s:
            [ours] = s.scalars(select(Output.path).where(Output.study_id == study_id, Output.kind == "pdf")).all()
        report = report_pdf_path(rig.ctx.outputs_dir, "MODALITY", str(ds.StudyInstanceUID), 1).read_bytes()
        assert_valid_dicom(Path(ours))  # no dciodvfy error and no warning but the known ones
        encapsulated = dcmread(ours)
        assert encapsulated.SOPClassUID == ENCAPSULATED_PDF_STORAGE and encapsulated.Modality == "DOC"
        assert encapsulated.StudyInstanceUID == ds.StudyInstanceUID and encapsulated.SeriesNumber == 9905
        assert [i.ReferencedSOPInstanceUID for i in encapsulated.SourceInstanceSequence] == [ds.SOPInstanceUID]
        assert document_bytes(encapsulated) == report

        [held] = [i for i in pacs.study_instances(str(ds.StudyInstanceUID))
                  if i["MainDicomTags"]["SOPInstanceUID"] == encapsulated.SOPInstanceUID]
        copy = dcmread(pacs.download(held["ID"], tmp_path / "from-orthanc.dcm"))
        assert copy == encapsulated  # every element, byte for byte
        assert bytes(copy.EncapsulatedDocument) == bytes(encapsulated.EncapsulatedDocument)
        assert document_bytes(copy) == report
        assert "Pneumothorax" in pdf_text(_write(tmp_path, "from-orthanc.pdf", document_bytes(copy)))
    finally:
        rig.close()


def _report_resource(rig: PipelineRig) -> dict:
    import json

    with rig.db.session() as s:
        body = s.scalar(select(FhirResource.body).where(FhirResource.resource_type == "DiagnosticReport",
                                                        FhirResource.is_current))
    return json.loads(body)


def test_fhir_carries_the_same_pdf_inline(tmp_path):
    rig = PipelineRig(tmp_path)
    try:
        study_id, ds = rig.add_study(FINDINGS)
        rig.encode(study_id)
        report = report_pdf_path(rig.ctx.outputs_dir, "MODALITY", str(ds.StudyInstanceUID), 1).read_bytes()
        [form] = _report_resource(rig)["presentedForm"]
        assert form["contentType"] == "application/pdf" and form["size"] == len(report)
        assert base64.b64decode(form["data"]) == report
        assert base64.b64decode(form["hash"]) == hashlib.sha1(report).digest()
        assert len(form["data"]) < 400_000  # an EHR's transaction stays small
    finally:
        rig.close()


def test_the_api_serves_the_pdf_to_a_viewer_and_audits_it(tmp_path):
    rig = PipelineRig(tmp_path)
    try:
        study_id, ds = rig.add_study(FINDINGS)
        rig.encode(study_id)
        report = report_pdf_path(rig.ctx.outputs_dir, "MODALITY", str(ds.StudyInstanceUID), 1).read_bytes()
        token = create_token(rig.db, "viewer", "viewer", expires_days=1)
        client = TestClient(create_app(rig.ctx))
        url = f"/api/v1/studies/{ds.StudyInstanceUID}/report.pdf"
        rsp = client.get(url, headers={"Authorization": f"Bearer {token}"})
        assert rsp.status_code == 200 and rsp.headers["content-type"] == "application/pdf"
        assert rsp.content == report
        assert client.get(url).status_code == 401
        assert client.get(url + "?version=2", headers={"Authorization": f"Bearer {token}"}).status_code == 404
        with rig.db.session() as s:
            records = s.execute(select(AuditRecord.event_id, AuditRecord.user_id, AuditRecord.xml)).all()
        assert any(event == "110110" and user == "token:viewer" and url in xml and str(ds.PatientID) in xml
                   for event, user, xml in records)
    finally:
        rig.close()


def test_each_use_switches_off(tmp_path):
    # No Encapsulated PDF: the file still serves FHIR and the download.
    rig = PipelineRig(tmp_path / "no-dicom", outputs={"kinds": ["sr", "sc"]})
    try:
        study_id, ds = rig.add_study(FINDINGS)
        rig.encode(study_id)
        with rig.db.session() as s:
            kinds = set(s.scalars(select(Output.kind).where(Output.study_id == study_id)))
        assert kinds == {"sr", "sc"}
        assert report_pdf_path(rig.ctx.outputs_dir, "MODALITY", str(ds.StudyInstanceUID), 1).exists()
        assert "presentedForm" in _report_resource(rig)
    finally:
        rig.close()

    # Nothing uses it: not even rendered; FHIR without presentedForm; the download answers 404.
    rig = PipelineRig(tmp_path / "none", outputs={"kinds": ["sr"], "report_pdf": {"fhir": False, "download": False}})
    try:
        study_id, ds = rig.add_study(FINDINGS)
        rig.encode(study_id)
        assert not report_pdf_path(rig.ctx.outputs_dir, "MODALITY", str(ds.StudyInstanceUID), 1).exists()
        assert "presentedForm" not in _report_resource(rig)
        token = create_token(rig.db, "viewer", "viewer", expires_days=1)
        rsp = TestClient(create_app(rig.ctx)).get(f"/api/v1/studies/{ds.StudyInstanceUID}/report.pdf",
                                                  headers={"Authorization": f"Bearer {token}"})
        assert rsp.status_code == 404 and "switched off" in rsp.text
    finally:
        rig.close()


def test_serve_refuses_to_start_without_the_font(tmp_path):
    from node.config import ConfigError, Settings, check_serve

    settings = Settings(dicom={"accept_any_peer": True}, outputs={"report_pdf": {"font_dir": str(tmp_path)}})
    with pytest.raises(ConfigError, match="fonts-dejavu-core"):
        check_serve(settings)
    check_serve(Settings(dicom={"accept_any_peer": True},
                         outputs={"kinds": ["sr"], "report_pdf": {"fhir": False, "download": False,
                                                                  "font_dir": str(tmp_path)}}))


def test_the_fhir_push_carries_the_pdf_the_ehr_files(tmp_path):
    from fhir_peer import FhirTestServer

    ehr = FhirTestServer().start()
    try:
        rig = PipelineRig(tmp_path, destinations=[{"name": "ehr", "type": "fhir", "base_url": ehr.base_url}])
        study_id, ds = rig.add_study(FINDINGS)
        rig.encode(study_id)
        assert rig.run_deliveries(study_id)["ehr"].state == JobState.DONE
        report = report_pdf_path(rig.ctx.outputs_dir, "MODALITY", str(ds.StudyInstanceUID), 1).read_bytes()
        rig.close()
        [bundle] = ehr.bundles
        [entry] = [e for e in bundle["entry"] if e["resource"]["resourceType"] == "DiagnosticReport"]
        [form] = entry["resource"]["presentedForm"]
        assert base64.b64decode(form["data"]) == report and form["contentType"] == "application/pdf"
        [stored] = ehr.of_type("DiagnosticReport")  # as the EHR keeps it
        assert base64.b64decode(stored["presentedForm"][0]["data"]) == report
    finally:
        ehr.stop()
