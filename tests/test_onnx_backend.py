"""The ONNX Runtime backend (issue #13): `carina model export-onnx`, fidelity against torch,
hash checks, and switching the runtime of a running `carina serve` without a restart.

Fidelity bound (README): max |dp| <= 1e-4 over the 14 findings on the shared images and on
generated variants (8-16 bit, MONOCHROME1, VOI LUT, landscape), scored in one batch.
"""
from __future__ import annotations

import json
import shutil

import httpx
import numpy as np
import pytest

import dicom_factory as f
from inference import InferenceEngine, decode_dicom, load_model
from inference.engine import decode_image
from inference.model import WeightsError
from inference.onnx_backend import load_onnx_model, onnx_sidecar
from node.models import ModelRegistry
from peers import CarinaNode, wait_until

DEMO = "densenet121-res224-all@demo-seed0"
MAX_DP = 1e-4


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    registry = ModelRegistry(tmp_path_factory.mktemp("onnx") / "models")
    entry = registry.ensure_demo()
    [path] = registry.export_onnx(DEMO)
    return entry, path


def images():
    """The shared samples and generated variants, decoded by the pipeline's decoder."""
    out = [decode_image(p) for p in (*f.NIH_PNGS, f.DATA / "siim_cr_jpeg_mono1.dcm", f.DATA / "siim_cr_jpeg_mono2.dcm")]
    chest = f.png_pixels(f.NIH_PNGS[1])
    for bits, photometric in ((8, "MONOCHROME2"), (12, "MONOCHROME1"), (16, "MONOCHROME2")):
        out.append(decode_dicom(f.make_dx(chest, bits_stored=bits, photometric=photometric)))
    lut = np.clip(np.linspace(-800, 4400, 4096), 0, 4095).astype(np.uint16)  # a 12-bit VOI LUT with clipped ends
    out.append(decode_dicom(f.with_voi_lut(f.make_dx(chest, bits_stored=12), lut, bits_per_entry=12)))
    out.append(decode_dicom(f.make_dx(f.small_chest_pixels(3, 300)[:, :240])))  # landscape crop of a generated chest
    return out


def test_onnx_scores_like_torch_within_1e4(exported):
    entry, path = exported
    meta = json.loads(onnx_sidecar(path).read_text())
    assert meta["weights_sha256"] == entry.meta["sha256"] and meta["outputs"] == ["logits", "features"]
    torch_engine = InferenceEngine(load_model(entry.weights, device="cpu"), max_batch=16)
    onnx_engine = InferenceEngine(load_onnx_model(path, entry.weights, providers=["CPUExecutionProvider"]), max_batch=16)
    batch = images()
    ours, theirs = onnx_engine.predict(batch), torch_engine.predict(batch)
    dp = max(abs(a.probability - b.probability) for x, y in zip(ours, theirs) for a, b in zip(x.findings, y.findings))
    assert dp <= MAX_DP, dp
    # One forward pass still gives the heatmaps: the graph returns the feature map.
    dmap = max(float(np.abs(x.heatmaps.maps - y.heatmaps.maps).max()) for x, y in zip(ours, theirs))
    assert dmap <= 1e-3, dmap
    assert [x.model.ref for x in ours] == [DEMO] * len(batch)
    print(f"ONNX vs torch on {len(batch)} images: max |dp| {dp:.2e}, max |dmap| {dmap:.2e}")


def test_a_damaged_or_foreign_onnx_file_is_refused(exported, tmp_path):
    entry, path = exported
    damaged = tmp_path / "model.onnx"
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    damaged.write_bytes(bytes(blob))
    shutil.copy(onnx_sidecar(path), onnx_sidecar(damaged))
    with pytest.raises(WeightsError, match="SHA-256"):
        load_onnx_model(damaged, entry.weights)
    foreign = tmp_path / "foreign.onnx"
    shutil.copy(path, foreign)
    meta = json.loads(onnx_sidecar(path).read_text()) | {"weights_sha256": "0" * 64}
    onnx_sidecar(foreign).write_text(json.dumps(meta))
    with pytest.raises(WeightsError, match="exported from weights"):
        load_onnx_model(foreign, entry.weights)


def test_a_running_node_switches_runtime_without_restart(tmp_path):
    node = CarinaNode(tmp_path / "node", extra={"inference": {"device": "cpu", "model_poll_seconds": 0.2}})
    node.start()
    try:
        token = node.create_token(role="admin")
        client = httpx.Client(base_url=node.url, headers={"Authorization": f"Bearer {token}"}, timeout=120)
        png = f.NIH_PNGS[0].read_bytes()

        def probabilities():
            body = client.post("/api/v1/predict", files={"image": ("a.png", png, "image/png")}).json()
            return np.array([d["probability"] for d in body["prediction"]["diagnoses"]])

        assert node.api("/healthz")["model"]["backend"] == "torch"
        on_torch, pid = probabilities(), node.proc.pid
        # Switching before the export is refused by the running node, which keeps torch.
        node.carina("model", "backend", "onnxruntime")
        wait_until(lambda: "cannot be loaded (onnxruntime runtime)" in node.log_text(), 60, what="the refused switch")
        assert node.api("/healthz")["model"]["backend"] == "torch"

        out = node.carina("model", "export-onnx", DEMO)
        assert "exported" in out.stdout
        node.carina("model", "backend", "onnxruntime")  # asked again: the node tries again
        wait_until(lambda: node.api("/healthz")["model"]["backend"] == "onnxruntime", 120, what="the switch to ONNX Runtime")
        on_onnx = probabilities()
        assert np.abs(on_onnx - on_torch).max() <= MAX_DP  # (the API rounds to 1e-6)
        node.carina("model", "backend", "config")
        wait_until(lambda: node.api("/healthz")["model"]["backend"] == "torch", 120, what="back to torch")
        assert node.proc.pid == pid and node.proc.poll() is None  # the same process throughout
        assert f"model switched: {DEMO} -> {DEMO} (runtime torch -> onnxruntime)" in node.log_text()
        client.close()
    finally:
        node.stop()
