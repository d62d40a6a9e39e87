"""DICOMweb against real peers: `carina serve`, Orthanc with its DICOMweb plugin
(Debian orthanc-dicomweb) and the `dicomweb-client` package.

- STOW-RS in: dicomweb-client stores a chest CR; the node scores it like a
  C-STORE'd study and its outputs go out by STOW-RS (a `dicomweb` destination)
  into Orthanc. Orthanc itself pushes a study into Carina by STOW-RS (its
  "DicomWeb.Servers"). A malformed part fails alone, with DICOM status codes,
  and the header check gives the same status as the SCP's for the same file.
- QIDO-RS and WADO-RS: dicomweb-client, as a viewer, finds and retrieves the
  outputs, their metadata and bulk data, byte for byte.
- The README tour's curl push works as written.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import urllib.request
from pathlib import Path

import httpx
import pytest
import yaml
from dicomweb_client.api import DICOMwebClient
from pydicom import dcmread
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian
from requests.exceptions import HTTPError

from dicom_factory import make_dx, small_chest_pixels, write_raw, dataset_bytes
from peers import (
    REPO,
    CarinaNode,
    Orthanc,
    carina_db_rows,
    carina_outputs_in_orthanc,
    expected_outputs,
    http_json,
    orthanc_dicomweb,
    send_raw,
    study_state,
    wait_until,
)

SIIM = REPO / "tests" / "data" / "siim_cr_jpeg_mono1.dcm"
SIIM2 = REPO / "tests" / "data" / "siim_cr_jpeg_mono2.dcm"
DX = "1.2.840.10008.5.1.4.1.1.1.1"
DICOM_TYPE = 'multipart/related; type="application/dicom"; boundary=XyZ'


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """Orthanc (DICOMweb plugin) as the STOW-RS destination and as a STOW-RS sender, and a node."""
    work = tmp_path_factory.mktemp("dicomweb")
    pacs = Orthanc(work / "orthanc")
    node = CarinaNode(
        work / "carina",
        destinations=[{"name": "archive", "type": "dicomweb", "base_url": f"{pacs.url}/dicom-web"}],
        extra={"dicomweb": {"stow_senders": [{"token": "web-client", "source": "WEBCLIENT"},
                                             {"token": "orthanc", "source": "ORTHANC_WEB"},
                                             {"token": "tour-stow", "source": "WEBUPLOAD"}]}},
    )
    # Links in answers (RetrieveURL, BulkDataURI) use api.public_base_url: dicomweb-client
    # sends a Host header without the port, so the request's own URL would lose it.
    config = yaml.safe_load(node.config_path.read_text())
    config["api"]["public_base_url"] = node.url
    node.config_path.write_text(yaml.safe_dump(config))
    tokens = {name: node.create_token(name, role) for name, role in
              (("web-client", "integration"), ("orthanc", "integration"), ("tour-stow", "integration"),
               ("not-a-sender", "integration"), ("viewer", "viewer"), ("admin", "admin"))}
    pacs.extra_config = orthanc_dicomweb({"carina": {"Url": f"{node.url}/dicomweb/",
                                                     "HttpHeaders": {"Authorization": f"Bearer {tokens['orthanc']}"}}})
    pacs.start()
    node.start()
    node.token = tokens["admin"]
    try:
        yield node, pacs, tokens
    finally:
        node.stop()
        pacs.stop()


def client(node: CarinaNode, token: str) -> DICOMwebClient:
    return DICOMwebClient(url=f"{node.url}/dicomweb", headers={"Authorization": f"Bearer {token}"})


def done(node: CarinaNode, study_uid: str, calling_ae: str) -> dict:
    def finished():
        view = study_state(node, study_uid, calling_ae)
        if view and view["state"] == "done" and view["deliveries"] and all(
                d["state"] == "done" and d["study_version"] == view["version"] for d in view["deliveries"]):
            return view
        assert not view or view["state"] not in ("failed", "ignored"), view
        return None
    return wait_until(finished, 240, 0.5, what=f"study {study_uid} from {calling_ae} done and delivered")


@pytest.fixture(scope="module")
def stowed(site):
    """The SIIM CR stored by dicomweb-client (STOW-RS), scored, delivered by STOW-RS to Orthanc."""
    node, pacs, tokens = site
    ds = dcmread(SIIM)
    answer = client(node, tokens["web-client"]).store_instances([ds])
    [item] = answer.ReferencedSOPSequence
    assert item.ReferencedSOPInstanceUID == ds.SOPInstanceUID and "FailedSOPSequence" not in answer
    view = done(node, ds.StudyInstanceUID, "WEBCLIENT")
    return ds, view


def test_stow_in_is_the_scp_intake_and_the_outputs_go_out_by_stow(site, stowed):
    node, pacs, _ = site
    ds, view = stowed
    # Stored as received (the dataset byte for byte), keyed by the token's source name.
    stored = node.workdir / "var" / "instances" / "WEBCLIENT" / ds.StudyInstanceUID / f"{ds.SOPInstanceUID}.dcm"
    assert dcmread(stored) == ds
    [(state,)] = carina_db_rows(node, "SELECT state FROM instances WHERE sop_instance_uid = ?", (ds.SOPInstanceUID,))
    assert state == "scored" and view["calling_ae"] == "WEBCLIENT"
    # Every output in Orthanc, through its DICOMweb plugin, byte for byte.
    assert carina_outputs_in_orthanc(pacs, ds.StudyInstanceUID) == expected_outputs(view)
    held = {i["MainDicomTags"]["SOPInstanceUID"]: i["ID"] for i in pacs.study_instances(ds.StudyInstanceUID)}
    rows = carina_db_rows(node, "SELECT o.sop_instance_uid, o.path FROM outputs o JOIN studies s ON s.id = o.study_id "
                                "WHERE s.calling_ae = 'WEBCLIENT' AND s.study_uid = ?", (ds.StudyInstanceUID,))
    assert set(held) == {uid for uid, _ in rows}
    for uid, path in rows:
        assert dcmread(pacs.download(held[uid], node.workdir / "copy.dcm")) == dcmread(path), uid
    # Audited: one STOW-RS record naming the patient, one delivery by DICOMweb.
    audits = carina_db_rows(node, "SELECT event_id, user_id, xml FROM audit_records")
    assert any(e == "110104" and u == "token:web-client" and ds.PatientID in x and "STOW-RS: 1 stored" in x
               for e, u, x in audits)


def test_orthanc_pushes_a_study_into_carina_by_stow(site):
    node, pacs, _ = site
    ds = make_dx(small_chest_pixels(2), patient_id="ORTHANC-WEB-1")
    path = node.workdir / "from-orthanc.dcm"
    ds.save_as(path, enforce_file_format=True)
    uploaded = http_json(f"{pacs.url}/instances", method="POST", data=path.read_bytes())
    request = urllib.request.Request(f"{pacs.url}/dicom-web/servers/carina/stow", method="POST",
                                     data=json.dumps({"Resources": [uploaded["ParentStudy"]], "Synchronous": True}).encode())
    with urllib.request.urlopen(request, timeout=120) as rsp:
        assert rsp.status == 200
    view = done(node, ds.StudyInstanceUID, "ORTHANC_WEB")
    assert [i["state"] for i in view["instances"]] == ["scored"]
    stored = node.workdir / "var" / "instances" / "ORTHANC_WEB" / ds.StudyInstanceUID / f"{ds.SOPInstanceUID}.dcm"
    assert dcmread(stored).PixelData == ds.PixelData


def _multipart(parts: list[tuple[str, bytes]], boundary: str = "XyZ") -> bytes:
    body = b""
    for content_type, data in parts:
        body += f"--{boundary}\r\nContent-Type: {content_type}\r\n\r\n".encode() + data + b"\r\n"
    return body + f"--{boundary}--\r\n".encode()


def _stow(node, token, body: bytes, study_uid: str | None = None, content_type: str = DICOM_TYPE) -> httpx.Response:
    url = f"{node.url}/dicomweb/studies" + (f"/{study_uid}" if study_uid else "")
    return httpx.post(url, content=body, headers={"Authorization": f"Bearer {token}", "Content-Type": content_type},
                      timeout=60)


def _reasons(answer: dict) -> list[int]:
    return [item["00081197"]["Value"][0] for item in answer.get("00081198", {}).get("Value", [])]


def _stored_uids(answer: dict) -> list[str]:
    return [item["00081155"]["Value"][0] for item in answer.get("00081199", {}).get("Value", [])]


def _file_bytes(ds, tmp_path: Path, name: str) -> bytes:
    path = tmp_path / name
    ds.save_as(path, enforce_file_format=True)
    return path.read_bytes()


def test_a_malformed_part_fails_alone_with_dicom_status_codes(site, tmp_path):
    node, _, tokens = site
    good = make_dx(small_chest_pixels(3), patient_id="STOW-MIXED")
    other_study = make_dx(small_chest_pixels(4), patient_id="STOW-MIXED")
    no_study = make_dx(small_chest_pixels(5), patient_id="STOW-MIXED")
    del no_study.StudyInstanceUID
    unknown_class = make_dx(small_chest_pixels(6), patient_id="STOW-MIXED")
    unknown_class.SOPClassUID = unknown_class.file_meta.MediaStorageSOPClassUID = "1.2.3.4.5.6"
    unknown_class.StudyInstanceUID = good.StudyInstanceUID
    body = _multipart([
        ("application/dicom", _file_bytes(good, tmp_path, "good.dcm")),
        ("application/dicom", b"\0" * 128 + b"DICM" + b"not a dataset"),
        ("application/dicom", _file_bytes(other_study, tmp_path, "other.dcm")),
        ("application/dicom", _file_bytes(no_study, tmp_path, "nostudy.dcm")),
        ("application/dicom", _file_bytes(unknown_class, tmp_path, "unknown.dcm")),
        ("text/plain", b"hello"),
    ])
    rsp = _stow(node, tokens["web-client"], body, study_uid=good.StudyInstanceUID)
    assert rsp.status_code == 202 and rsp.headers["content-type"] == "application/dicom+json"
    answer = rsp.json()
    assert _stored_uids(answer) == [good.SOPInstanceUID]
    assert _reasons(answer) == [0xC210, 0xA900, 0xC210, 0x0122, 0xC000]
    failed = answer["00081198"]["Value"]
    assert failed[1]["00081155"]["Value"] == [other_study.SOPInstanceUID]
    instances = carina_db_rows(node, "SELECT i.sop_instance_uid FROM instances i JOIN studies s ON s.id = i.study_id "
                                     "WHERE s.patient_id = 'STOW-MIXED'")
    assert instances == [(good.SOPInstanceUID,)]
    # Nothing stored at all: 409, and nothing left in the node's temp directory.
    rsp = _stow(node, tokens["web-client"], _multipart([("application/dicom", b"junk")]))
    assert rsp.status_code == 409 and _reasons(rsp.json()) == [0xC000]
    assert not list((node.workdir / "var" / "tmp").glob("stow-*"))


def test_the_header_check_is_the_scps(site, tmp_path):
    """The same hostile files give the same DICOM status by C-STORE and by STOW-RS."""
    from test_dicom_bounded_input import write_bomb

    node, _, tokens = site
    cases = []
    long_uid = make_dx(small_chest_pixels(7), patient_id="SAME-CHECK")
    long_uid.StudyInstanceUID = "1." + "2" * 70  # the request's UIDs must be valid for pynetdicom to send it
    cases.append(("uid-over-64", tmp_path / "long.dcm", long_uid, ExplicitVRLittleEndian))
    garbled = make_dx(small_chest_pixels(8), patient_id="SAME-CHECK")
    # (0008,0005) CS claiming 65535 bytes, then a few: the header itself is unreadable.
    body = b"\x08\x00\x05\x00CS\xff\xff" + dataset_bytes(garbled)[:40]
    cases.append(("garbled-header", write_raw(tmp_path / "garbled.dcm", DX, garbled.SOPInstanceUID,
                                              ExplicitVRLittleEndian, body), None, ExplicitVRLittleEndian))
    bomb, _ = write_bomb(tmp_path / "bomb.dcm", "SAME-CHECK")
    cases.append(("deflate-bomb", bomb, None, DeflatedExplicitVRLittleEndian))
    for name, path, ds, syntax in cases:
        if ds is not None:
            ds.save_as(path, enforce_file_format=True)
        [dimse] = send_raw(node.dicom_port, [(path, DX, syntax)])
        rsp = _stow(node, tokens["web-client"], _multipart([("application/dicom", path.read_bytes())]))
        assert rsp.status_code == 409, (name, rsp.text)
        assert _reasons(rsp.json()) == [dimse], (name, hex(dimse))
        assert dimse == 0xC000, name


def test_who_may_stow(site):
    node, _, tokens = site
    body = _multipart([("application/dicom", SIIM2.read_bytes())])
    rsp = _stow(node, tokens["not-a-sender"], body)
    assert rsp.status_code == 403 and "dicomweb.stow_senders" in rsp.text
    assert _stow(node, tokens["viewer"], body).status_code == 403
    assert _stow(node, "crn_nonsense", body).status_code == 401
    rsp = _stow(node, tokens["web-client"], body, content_type='multipart/related; type="application/dicom+json"; boundary=XyZ')
    assert rsp.status_code == 415


def test_qido_and_wado_serve_carinas_outputs_to_a_viewer(site, stowed):
    node, _, tokens = site
    ds, view = stowed
    viewer = client(node, tokens["viewer"])
    [study] = viewer.search_for_studies(search_filters={"PatientID": ds.PatientID, "StudyDate": "19000101-"})
    assert study["0020000D"]["Value"] == [ds.StudyInstanceUID]
    assert set(study["00080061"]["Value"]) == {"SR", "DOC", "SEG", "PR", "OT"}  # the SCs are OT (highdicom)
    outputs = carina_db_rows(node, "SELECT o.kind, o.sop_instance_uid, o.series_uid, o.path FROM outputs o "
                                   "JOIN studies s ON s.id = o.study_id WHERE s.calling_ae = 'WEBCLIENT' "
                                   "AND s.study_uid = ?", (ds.StudyInstanceUID,))
    assert study["00201208"]["Value"] == [len(outputs)]

    series = viewer.search_for_series(ds.StudyInstanceUID)
    assert sorted(s["00200011"]["Value"][0] for s in series) == [9901, 9902, 9903, 9904, 9905]
    [sr] = viewer.search_for_instances(ds.StudyInstanceUID, search_filters={"Modality": "SR"})
    [(sr_uid, sr_series, sr_path)] = [(u, s, p) for k, u, s, p in outputs if k == "sr"]
    assert sr["00080018"]["Value"] == [sr_uid]
    assert viewer.search_for_instances(search_filters={"SOPInstanceUID": sr_uid}, fields=["ContentDate"])[0][
        "00080023"]["Value"]
    paged = viewer.search_for_instances(ds.StudyInstanceUID, limit=2, offset=1)
    assert len(paged) == 2
    assert viewer.search_for_studies(search_filters={"PatientID": "nobody"}) == []

    # WADO-RS: the instance as stored, a whole series, the whole study.
    assert viewer.retrieve_instance(ds.StudyInstanceUID, sr_series, sr_uid) == dcmread(sr_path)
    sc_series = next(s for k, _, s, _ in outputs if k == "sc")
    assert len(viewer.retrieve_series(ds.StudyInstanceUID, sc_series)) == sum(k == "sc" for k, *_ in outputs)
    assert sorted(i.SOPInstanceUID for i in viewer.retrieve_study(ds.StudyInstanceUID)) == sorted(u for _, u, _, _ in outputs)

    # Metadata: the PDF's document is a BulkDataURI, which gives the document back.
    [(pdf_uid, pdf_series, pdf_path)] = [(u, s, p) for k, u, s, p in outputs if k == "pdf"]
    meta = viewer.retrieve_instance_metadata(ds.StudyInstanceUID, pdf_series, pdf_uid)
    assert meta["00420012"]["Value"] == ["application/pdf"]
    uri = meta["00420011"]["BulkDataURI"]
    assert uri.startswith(f"{node.url}/dicomweb/studies/{ds.StudyInstanceUID}/")
    assert viewer.retrieve_bulkdata(uri)[0] == bytes(dcmread(pdf_path).EncapsulatedDocument)
    assert len(viewer.retrieve_study_metadata(ds.StudyInstanceUID)) == len(outputs)

    # Only viewers and up; every answer is audited with its patient.
    with pytest.raises(HTTPError, match="403"):
        client(node, tokens["web-client"]).search_for_studies()
    audits = carina_db_rows(node, "SELECT event_id, user_id, xml FROM audit_records WHERE user_id = 'token:viewer'")
    assert {e for e, _, x in audits if ds.PatientID in x} == {"110112", "110110"}


def test_wado_answers_406_for_a_transfer_syntax_it_would_have_to_transcode(site, stowed):
    node, _, tokens = site
    ds, _ = stowed
    url = f"{node.url}/dicomweb/studies/{ds.StudyInstanceUID}"
    headers = {"Authorization": f"Bearer {tokens['viewer']}"}
    rsp = httpx.get(url, headers={**headers, "Accept": 'multipart/related; type="application/dicom"; '
                                                       'transfer-syntax=1.2.840.10008.1.2.4.50'})
    assert rsp.status_code == 406
    rsp = httpx.get(url, headers={**headers, "Accept": 'multipart/related; type="application/dicom"; '
                                                       'transfer-syntax=1.2.840.10008.1.2.1'})
    assert rsp.status_code == 200
    assert httpx.get(f"{node.url}/dicomweb/studies/1.2.3", headers=headers).status_code == 404


def test_the_readme_tour_push_works_as_written(site):
    node, _, tokens = site
    readme = (REPO / "README.md").read_text()
    [command] = re.findall(r"```sh\n\s*(curl [^\n]*/dicomweb/studies)\n\s*```", readme)
    command = command.replace("http://127.0.0.1:8080", node.url)
    env = dict(os.environ, STOW_TOKEN=tokens["tour-stow"])
    proc = subprocess.run(["bash", "-c", command], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    answer = json.loads(proc.stdout)
    assert _stored_uids(answer) == [dcmread(SIIM2).SOPInstanceUID]
    view = study_state(node, dcmread(SIIM2).StudyInstanceUID, "WEBUPLOAD")
    assert view is not None and view["calling_ae"] == "WEBUPLOAD"
