"""POST /api/v1/predict on a real uvicorn server, driven by httpx: answers, auth, and a
4xx with a reason for every bad input (never a 500). The last test runs `carina serve`
itself and hot-swaps its model with `carina model import/activate` while it serves."""
from __future__ import annotations

import datetime as dt
import io
import threading
import time

import httpx
import numpy as np
import pytest
import uvicorn
from PIL import Image

import dicom_factory as f
from inference.batcher import BatchingEngine
from inference.decode import decode_dicom_file, decode_png_or_jpeg
from inference.engine import InferenceEngine
from inference.types import CHESTXRAY14, DEMO_WARNING
from model_factory import write_xrv_pickle
from node.api.app import create_app
from node.api.auth import create_token
from node.config import Settings
from node.context import NodeContext
from node.db import Database
from peers import CarinaNode, free_port, wait_until

LIMIT_MB = 1.0


@pytest.fixture(scope="module")
def engine(demo_model):
    return InferenceEngine(demo_model)


@pytest.fixture(scope="module")
def server(tmp_path_factory, engine):
    tmp = tmp_path_factory.mktemp("predict-api")
    settings = Settings(storage={"data_dir": str(tmp)}, inference={"predict_max_upload_mb": LIMIT_MB})
    db = Database(f"sqlite:///{tmp / 'carina.db'}")
    db.create_schema()
    token = create_token(db, "client", "integration")
    ctx = NodeContext(settings, db)
    ctx.engine = BatchingEngine(engine, max_batch=4, max_wait_ms=2)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(ctx), host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {token}"}, timeout=60)
    try:
        yield dict(client=client, ctx=ctx, port=port, token=token)
    finally:
        client.close()
        server.should_exit = True
        thread.join(10)
        ctx.engine.close()
        db.dispose()


def post(server, data: bytes, *, field: str = "image", filename: str = "x", content_type: str = "application/octet-stream"):
    return server["client"].post("/api/v1/predict", files={field: (filename, data, content_type)})


def jpeg_bytes() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(f.png_pixels(f.NIH_PNGS[1])).save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def dicom_bytes(ds) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


# --- answers -------------------------------------------------------------------------------


def test_png_prediction_has_the_documented_shape(server, engine):
    started = dt.datetime.now(dt.timezone.utc)
    rsp = post(server, f.NIH_PNGS[0].read_bytes(), filename="chest.png", content_type="image/png")
    assert rsp.status_code == 200, rsp.text
    body = rsp.json()
    assert body["status"] == "success"
    diagnoses = body["prediction"]["diagnoses"]
    assert sorted(d["condition"] for d in diagnoses) == sorted(CHESTXRAY14)
    assert [d["probability"] for d in diagnoses] == sorted((d["probability"] for d in diagnoses), reverse=True)
    expected = {x.label: x for x in engine.predict([decode_png_or_jpeg(f.NIH_PNGS[0])])[0].findings}
    for d in diagnoses:
        want = expected[d["condition"]]
        assert d["probability"] == pytest.approx(want.probability, abs=1e-4)
        assert d["positive"] == want.positive and d["severity"] == want.severity
        assert d["severity"] in {"none", "low", "moderate", "high"}
        assert (d["severity"] != "none") == d["positive"]  # band 0.5 is the operating point
        if d["positive"]:
            assert d["regions"], d
        for x1, y1, x2, y2 in d["regions"]:
            assert 0 <= x1 < x2 <= 512 and 0 <= y1 < y2 <= 512
    assert any(d["positive"] for d in diagnoses)
    assert 0.0 <= body["prediction"]["confidence_score"] <= 1.0
    assert body["prediction"]["processing_time_ms"] > 0
    meta = body["metadata"]
    assert meta["model_version"] == "demo-seed0" and meta["model_name"] == "densenet121-res224-all"
    assert meta["demo"] is True and meta["caveat"] == DEMO_WARNING
    assert meta["device_uid"].startswith("2.25.")
    assert started <= dt.datetime.fromisoformat(meta["timestamp"]) <= dt.datetime.now(dt.timezone.utc)
    assert meta["image"] == {"format": "png", "rows": 512, "columns": 512}


@pytest.mark.parametrize("kind", ["dicom-jpeg-mono1", "dicom-16bit-dx", "jpeg"])
def test_dicom_and_jpeg_uploads(server, engine, kind):
    if kind == "dicom-jpeg-mono1":
        data, decoded, fmt = f.SIIM_MONO1.read_bytes(), decode_dicom_file(f.SIIM_MONO1), "dicom"
    elif kind == "dicom-16bit-dx":
        ds = f.make_dx(bits_stored=16, photometric="MONOCHROME1")
        data = dicom_bytes(ds)
        decoded, fmt = decode_dicom_file(io.BytesIO(data)), "dicom"
    else:
        data, fmt = jpeg_bytes(), "jpeg"
        decoded = decode_png_or_jpeg(data)
    rsp = post(server, data)  # the declared content type does not matter: the bytes are sniffed
    assert rsp.status_code == 200, rsp.text
    body = rsp.json()
    assert body["metadata"]["image"]["format"] == fmt
    want = {x.label: x.probability for x in engine.predict([decoded])[0].findings}
    got = {d["condition"]: d["probability"] for d in body["prediction"]["diagnoses"]}
    assert got == pytest.approx(want, abs=1e-4)


# --- auth ----------------------------------------------------------------------------------


def test_a_token_is_required(server):
    url = f"http://127.0.0.1:{server['port']}/api/v1/predict"
    files = {"image": ("x.png", f.NIH_PNGS[0].read_bytes(), "image/png")}
    assert httpx.post(url, files=files).status_code == 401
    assert httpx.post(url, files=files, headers={"Authorization": "Bearer crn_wrong"}).status_code == 401


# --- refusals ------------------------------------------------------------------------------


def reason(rsp) -> str:
    body = rsp.json()
    assert body["status"] == "error"
    return body["reason"]


def test_too_large_by_content_length_is_413(server):
    rsp = post(server, b"\x89PNG\r\n\x1a\n" + b"\x00" * int(LIMIT_MB * 1024 * 1024 + 10))
    assert rsp.status_code == 413
    assert "exceeds the limit of 1 MB" in reason(rsp) and "predict_max_upload_mb" in reason(rsp)


def test_too_large_when_streamed_without_content_length_is_413(server):
    boundary = "carinaboundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"big.png\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode()

    def body():
        yield head
        for _ in range(24):  # 1.5 MB in 64 kB chunks, chunked transfer encoding
            yield b"\x00" * 65536
        yield f"\r\n--{boundary}--\r\n".encode()

    rsp = server["client"].post("/api/v1/predict", content=body(),
                                headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert rsp.status_code == 413 and "exceeds the limit" in reason(rsp)


@pytest.mark.parametrize(
    "case,status,text",
    [
        ("text-file", 415, "expected a DICOM, PNG or JPEG"),
        ("not-multipart", 415, "multipart/form-data"),
        ("missing-field", 422, "field 'image'"),
        ("empty-file", 422, "empty"),
        ("truncated-png", 422, "cannot decode the PNG"),
        ("colour-jpeg", 422, "not a greyscale radiograph"),
        ("rgb-dicom", 422, "not a greyscale radiograph"),
        ("mpeg2-dicom", 422, "1.2.840.10008.1.2.4.100"),
        ("truncated-dicom", 422, "cannot decode the DICOM"),
        ("huge-dicom-header", 422, "refused before decoding"),
    ],
)
def test_bad_input_is_a_4xx_with_a_reason(server, case, status, text):
    client = server["client"]
    if case == "not-multipart":
        rsp = client.post("/api/v1/predict", content=f.NIH_PNGS[0].read_bytes(), headers={"Content-Type": "image/png"})
    elif case == "missing-field":
        rsp = post(server, f.NIH_PNGS[0].read_bytes(), field="file")
    else:
        rsp = post(server, bad_upload(case))
    assert rsp.status_code == status, rsp.text
    assert text in reason(rsp)


def bad_upload(case: str) -> bytes:
    if case == "text-file":
        return b"patient name, diagnosis\nnot an image\n"
    if case == "empty-file":
        return b""
    if case == "truncated-png":
        return f.NIH_PNGS[0].read_bytes()[:2000]
    if case == "colour-jpeg":
        grey = f.png_pixels()
        buf = io.BytesIO()
        Image.fromarray(np.stack([grey, np.zeros_like(grey), 255 - grey], axis=2)).save(buf, format="JPEG")
        return buf.getvalue()
    ds = f.make_dx(bits_stored=8)
    if case == "rgb-dicom":
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
        ds.PixelData = np.repeat(f.png_pixels()[..., None], 3, axis=2).tobytes()
    elif case == "mpeg2-dicom":
        from pydicom.encaps import encapsulate

        ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"
        ds.PixelData = encapsulate([b"\x00\x00\x01\xb3" + b"\x00" * 60])
    elif case == "truncated-dicom":
        return dicom_bytes(ds)[:5000]
    elif case == "huge-dicom-header":
        ds.Rows = ds.Columns = 50000
    return dicom_bytes(ds)


def test_no_model_yet_is_503(server):
    ctx = server["ctx"]
    engine, ctx.engine = ctx.engine, None
    try:
        rsp = post(server, f.NIH_PNGS[0].read_bytes())
    finally:
        ctx.engine = engine
    assert rsp.status_code == 503 and "not loaded" in reason(rsp)


def test_concurrent_requests_share_the_batcher(server):
    data = f.NIH_PNGS[1].read_bytes()
    before = sum(server["ctx"].engine.batch_sizes.values())
    results = []

    def call():
        results.append(post(server, data).status_code)

    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == [200] * 4
    assert sum(server["ctx"].engine.batch_sizes.values()) > before


# --- the real node: predict, then hot-swap while it serves -----------------------------------------


def test_carina_serve_switches_model_on_activation_without_restart(tmp_path, demo_model):
    node = CarinaNode(tmp_path / "node", extra={"inference": {"device": "cpu", "model_poll_seconds": 0.2}})
    node.start()
    try:
        token = node.create_token()
        client = httpx.Client(base_url=node.url, headers={"Authorization": f"Bearer {token}"}, timeout=60)
        png = f.NIH_PNGS[0].read_bytes()
        before = client.post("/api/v1/predict", files={"image": ("a.png", png, "image/png")}).json()
        assert before["metadata"]["model_version"] == "demo-seed0" and before["metadata"]["caveat"] == DEMO_WARNING
        pid = node.proc.pid

        pickle, digest = write_xrv_pickle(tmp_path / "cxr.pt", demo_model.module.state_dict(), seed=7)
        out = node.carina("model", "import", str(pickle), "--name", "cxr", "--version", "7", "--sha256", digest, "--activate")
        assert "cxr@7 is now active" in out.stdout
        wait_until(lambda: node.api("/healthz")["model"]["version"] == "7", 60, what="the node to switch to cxr@7")
        after = client.post("/api/v1/predict", files={"image": ("a.png", png, "image/png")}).json()
        assert after["metadata"]["model_name"] == "cxr" and after["metadata"]["model_version"] == "7"
        assert after["metadata"]["demo"] is False and "caveat" not in after["metadata"]
        assert after["metadata"]["device_uid"] != before["metadata"]["device_uid"]
        assert node.proc.pid == pid and node.proc.poll() is None  # same process: no restart
        assert "model switched: densenet121-res224-all@demo-seed0 -> cxr@7" in node.log_text()
        assert "cxr@7" in node.carina("model", "list").stdout
        client.close()
    finally:
        node.stop()
