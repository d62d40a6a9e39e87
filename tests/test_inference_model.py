"""The model: fidelity to torchxrayvision, demo weights, weight files, device choice."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import dicom_factory as f
import numpy as np
import pytest
import skimage.io
import torch
import torchxrayvision as xrv
from PIL import Image

from inference.decode import decode_dicom_file, decode_png_or_jpeg
from inference.model import (
    DEMO_THRESHOLD,
    default_weights_path,
    import_xrv_checkpoint,
    MODEL_NAME,
    PATHOLOGIES,
    XRV_OP_THRESHOLDS,
    XRV_WEIGHTS_FILENAME,
    WeightsError,
    build_demo_state_dict,
    load_model,
    save_safetensors,
    select_device,
)
from inference.preprocess import center_crop_geometry, prepare_input
from inference.types import CHESTXRAY14, ModelInfo
from model_factory import state_digest, write_xrv_pickle

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo(demo_model):
    return demo_model


# --- fidelity to the torchxrayvision reference loop --------------------------------------


def xrv_reference_input(path: Path) -> np.ndarray:
    """[1,224,224] exactly as torchxrayvision's README/scripts prepare an image."""
    if path.suffix == ".dcm":
        img = xrv.utils.read_xray_dcm(path)
    else:
        img = xrv.datasets.normalize(skimage.io.imread(path), 255)
        if img.ndim > 2:
            img = img[:, :, 0]
    img = xrv.datasets.XRayCenterCrop()(img[None, ...])
    return xrv.datasets.XRayResizer(224)(img)


def decode_any(path: Path):
    return decode_dicom_file(path) if path.suffix == ".dcm" else decode_png_or_jpeg(path)


@pytest.fixture(scope="module")
def fidelity_images(tmp_path_factory) -> list[Path]:
    # Every shared sample, plus a non-square 12-bit MONOCHROME1 DX so the crop
    # arithmetic and inversion at another bit depth are exercised too.
    tall = np.asarray(Image.fromarray(f.png_pixels()).resize((600, 760)))
    extra = f.write(f.make_dx(tall, bits_stored=12, photometric="MONOCHROME1"), tmp_path_factory.mktemp("dx") / "dx.dcm")
    images = sorted(f.DATA.glob("*.png")) + sorted(f.DATA.glob("*.dcm")) + [extra]
    assert len(images) >= 5
    # tests/data is a byte copy of the workplace's shared/data/cxr: fidelity on one is fidelity on the other.
    shared = REPO.parent / "shared" / "data" / "cxr"
    if shared.is_dir():
        for sample in sorted(shared.glob("*.png")) + sorted(shared.glob("*.dcm")):
            assert sample.read_bytes() == (f.DATA / sample.name).read_bytes(), f"{sample.name} differs from tests/data"
    return images


@pytest.mark.filterwarnings("ignore:Converting MONOCHROME1")
def test_all_18_outputs_match_the_torchxrayvision_pipeline(demo, fidelity_images):
    reference_net = xrv.models.DenseNet(weights=None, apply_sigmoid=True, op_threshs=None)
    reference_net.load_state_dict(demo.module.state_dict())
    reference_net.eval()

    ours, theirs = [], []
    for path in fidelity_images:
        image = decode_any(path)
        model_input = prepare_input(image)
        assert model_input.crop == center_crop_geometry(image.source_shape)
        ours.append(model_input.array)
        theirs.append(xrv_reference_input(path))
    with torch.no_grad():
        p_ref = reference_net(torch.from_numpy(np.stack(theirs))).numpy()
        logits, _ = demo.forward(torch.from_numpy(np.stack(ours)))
        p_ours = torch.sigmoid(logits).numpy()
    assert p_ours.shape == p_ref.shape == (len(fidelity_images), 18)
    worst = np.abs(p_ours - p_ref).max(axis=1)
    print("max |dp| per image:", {p.name: f"{w:.2e}" for p, w in zip(fidelity_images, worst)})
    # The README's bound: "max |dp| over the 18 outputs is at most 1e-5, on every sample".
    # Measured with the demo weights: 1.4e-6 .. 2.1e-6 per image.
    assert worst.max() <= 1e-5, dict(zip([p.name for p in fidelity_images], worst))
    # The images do differ in what the model says, so the comparison means something.
    assert np.abs(p_ref[0] - p_ref[1]).max() > 0.02


@pytest.mark.filterwarnings("ignore:Converting MONOCHROME1")
def test_preprocessing_matches_xrv_pixels(fidelity_images):
    """What the network sees, in [-1024, 1024] units. The only difference is float32 rounding
    in Carina's resize (skimage works in float64): measured 4.3e-4 .. 6.1e-4 on these images,
    7.9e-4 on 2-3k pixel DX, against a float32 ulp of 1.2e-4 at 1024."""
    worst = {}
    for path in fidelity_images:
        ours = prepare_input(decode_any(path)).array
        theirs = xrv_reference_input(path)
        assert ours.shape == theirs.shape == (1, 224, 224)
        worst[path.name] = float(np.abs(ours - theirs).max())
    print("max |input difference| per image:", {k: f"{v:.2e}" for k, v in worst.items()})
    assert max(worst.values()) <= 1e-3, worst


# --- demo weights --------------------------------------------------------------------------


def test_demo_model_info_and_thresholds(demo):
    assert demo.info.name == MODEL_NAME == "densenet121-res224-all"
    assert demo.info.version == "demo-seed0" and demo.info.demo
    assert demo.info.caveat and "NOT FOR CLINICAL USE" in demo.info.caveat
    assert demo.op_thresholds == (DEMO_THRESHOLD,) * 18
    assert not demo.module.training
    assert demo.device.type == "cpu"


def test_demo_weights_are_deterministic_and_leave_the_global_rng_alone(demo):
    rng_before = torch.get_rng_state()
    first = build_demo_state_dict(0)
    second = build_demo_state_dict(0)
    assert torch.equal(rng_before, torch.get_rng_state())
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert state_digest(first) == state_digest(demo.module.state_dict())
    other_seed = build_demo_state_dict(1)
    assert not torch.equal(first["classifier.weight"], other_seed["classifier.weight"])


def test_demo_weights_are_identical_in_another_process(demo):
    code = (
        "import hashlib, torch\n"
        "from inference.model import build_demo_state_dict\n"
        "torch.set_num_threads(1)\n"  # a different thread setting must not matter either
        "s = build_demo_state_dict(0)\n"
        "h = hashlib.sha256()\n"
        "for k in sorted(s):\n"
        "    h.update(k.encode()); h.update(s[k].detach().contiguous().numpy().tobytes())\n"
        "print(h.hexdigest())\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == state_digest(demo.module.state_dict())


@pytest.mark.filterwarnings("ignore:Converting MONOCHROME1")
def test_demo_outputs_are_moderate_image_dependent_and_mostly_negative(demo, fidelity_images):
    batch = np.stack([prepare_input(decode_any(p)).array for p in fidelity_images])
    with torch.no_grad():
        p = torch.sigmoid(demo.forward(torch.from_numpy(batch))[0]).numpy()[:, : len(CHESTXRAY14)]
    assert p.min() > 0.02 and p.max() < 0.98, p.round(3)  # not saturated
    positives = (p >= DEMO_THRESHOLD).sum(axis=1)
    assert positives.max() <= 5 and positives.sum() >= 1, positives  # a few, not none, not most
    assert p.std(axis=0).max() > 0.1  # the image matters


# --- weight files ----------------------------------------------------------------------------


def test_safetensors_round_trip(demo, tmp_path):
    path = save_safetensors(demo, tmp_path / "carina.safetensors")
    sidecar = json.loads((tmp_path / "carina.json").read_text())
    assert sidecar["pathologies"] == list(PATHOLOGIES) and sidecar["name"] == MODEL_NAME
    assert sidecar["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()

    loaded = load_model(path, device="cpu")
    assert state_digest(loaded.module.state_dict()) == state_digest(demo.module.state_dict())
    assert (loaded.info.name, loaded.info.version, loaded.info.demo) == (MODEL_NAME, "demo-seed0", True)
    assert loaded.info.weights_sha256 == sidecar["sha256"]
    assert loaded.op_thresholds == demo.op_thresholds

    blob = bytearray(path.read_bytes())
    blob[-1] ^= 0xFF
    path.write_bytes(bytes(blob))
    with pytest.raises(WeightsError, match="SHA-256"):
        load_model(path, device="cpu")


def test_safetensors_without_valid_sidecar_is_refused(demo, tmp_path):
    path = save_safetensors(demo, tmp_path / "w.safetensors")
    meta = json.loads((tmp_path / "w.json").read_text())
    (tmp_path / "w.json").write_text(json.dumps({**meta, "pathologies": list(reversed(PATHOLOGIES))}))
    with pytest.raises(WeightsError, match="outputs"):
        load_model(path, device="cpu")
    (tmp_path / "w.json").unlink()
    with pytest.raises(WeightsError, match="sidecar"):
        load_model(path, device="cpu")
    with pytest.raises(WeightsError, match="does not exist"):
        load_model(tmp_path / "missing.safetensors", device="cpu")


@pytest.fixture(scope="module")
def xrv_pickle(demo, tmp_path_factory) -> tuple[Path, str]:
    """A torchxrayvision-format .pt (the whole nn.Module pickled) and its SHA-256."""
    return write_xrv_pickle(tmp_path_factory.mktemp("xrv") / XRV_WEIGHTS_FILENAME, demo.module.state_dict())


@pytest.fixture
def no_unpickling(monkeypatch):
    """Any torch.load call fails the test: run time must never unpickle."""
    calls = []

    def forbidden(*args, **kwargs):
        calls.append(args)
        raise AssertionError("torch.load called at run time")

    monkeypatch.setattr(torch, "load", forbidden)
    return calls


def test_xrv_pickle_is_refused_at_run_time_with_the_import_command(xrv_pickle, no_unpickling):
    path, _ = xrv_pickle
    with pytest.raises(WeightsError, match=r"never unpickles.*carina model import"):
        load_model(path, device="cpu")
    assert no_unpickling == []


def test_pickle_disguised_as_safetensors_is_not_unpickled(xrv_pickle, tmp_path, no_unpickling):
    path, digest = xrv_pickle
    disguised = tmp_path / "w.safetensors"
    disguised.write_bytes(path.read_bytes())
    (tmp_path / "w.json").write_text(json.dumps({
        "name": "x", "version": "1", "pathologies": list(PATHOLOGIES), "op_threshs": [0.5] * 18, "sha256": digest,
    }))
    with pytest.raises(WeightsError, match="not a valid safetensors"):
        load_model(disguised, device="cpu")
    assert no_unpickling == []


def test_xrv_cache_file_is_not_used_at_run_time(xrv_pickle, monkeypatch, no_unpickling):
    path, _ = xrv_pickle
    monkeypatch.setattr(xrv.utils, "get_cache_dir", lambda: str(path.parent) + "/")
    assert default_weights_path() == path  # the file is right where xrv would look ...
    loaded = load_model(None, device="cpu", demo_seed=0)
    assert loaded.info.demo and loaded.info.version == "demo-seed0"  # ... and it is left alone
    assert no_unpickling == []


def test_import_verifies_converts_and_records_metadata(demo, xrv_pickle, tmp_path):
    path, digest = xrv_pickle
    meta = import_xrv_checkpoint(path, tmp_path / "m.safetensors", name="cxr-all", version="2.0",
                                 expected_sha256=digest.upper())  # hex case does not matter
    assert meta["pathologies"] == list(PATHOLOGIES)
    assert meta["op_threshs"] == list(XRV_OP_THRESHOLDS)  # xrv's published operating points
    assert "model_urls" in meta["op_threshs_source"]
    assert meta["source_sha256"] == digest and meta["source_file"] == path.name
    assert meta["sha256"] == hashlib.sha256((tmp_path / "m.safetensors").read_bytes()).hexdigest()
    assert meta["imported_at"].endswith("+00:00") and meta["demo"] is False
    assert (tmp_path / "m.safetensors").read_bytes()[:1] != b"\x80"  # not a pickle (protocol marker)

    loaded = load_model(tmp_path / "m.safetensors", device="cpu")
    assert loaded.info == ModelInfo("cxr-all", "2.0", False, meta["sha256"], digest)
    assert loaded.info.caveat is None
    assert loaded.op_thresholds == XRV_OP_THRESHOLDS
    assert state_digest(loaded.module.state_dict()) == state_digest(demo.module.state_dict())


def test_import_refuses_a_hash_mismatch_before_unpickling(xrv_pickle, tmp_path, monkeypatch):
    path, digest = xrv_pickle
    calls = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(a))
    wrong = ("0" if digest[0] != "0" else "1") + digest[1:]
    with pytest.raises(WeightsError, match=rf"SHA-256 mismatch.*{digest}.*expected {wrong}.*Refusing"):
        import_xrv_checkpoint(path, tmp_path / "m.safetensors", name="n", version="1", expected_sha256=wrong)
    with pytest.raises(WeightsError, match="64 hex digits"):
        import_xrv_checkpoint(path, tmp_path / "m.safetensors", name="n", version="1", expected_sha256="abc")
    assert calls == [] and not (tmp_path / "m.safetensors").exists()


def test_import_takes_op_threshs_stored_in_the_checkpoint(demo, tmp_path):
    custom = [0.3] * 18
    path, digest = write_xrv_pickle(tmp_path / "t.pt", demo.module.state_dict(), op_threshs=custom)
    meta = import_xrv_checkpoint(path, tmp_path / "t.safetensors", name="n", version="1", expected_sha256=digest)
    assert meta["op_threshs"] == pytest.approx(custom) and meta["op_threshs_source"] == "checkpoint buffer op_threshs"
    assert load_model(tmp_path / "t.safetensors", device="cpu").op_thresholds == pytest.approx(tuple(custom))


def test_import_refuses_another_architecture(tmp_path):
    path = tmp_path / "other.pt"
    torch.save(torch.nn.Linear(3, 2), path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(WeightsError, match="architecture"):
        import_xrv_checkpoint(path, tmp_path / "o.safetensors", name="n", version="1", expected_sha256=digest)
    assert not (tmp_path / "o.safetensors").exists()


# --- device ------------------------------------------------------------------------------


def test_cpu_when_cuda_is_absent(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    plan = select_device("auto")
    assert plan.device == torch.device("cpu") and plan.amp_dtype is None and not plan.channels_last
    with pytest.raises(ValueError, match="CUDA is not available"):
        select_device("cuda")


@pytest.mark.parametrize("bf16,expected", [(True, torch.bfloat16), (False, torch.float16)])
def test_cuda_gets_autocast_and_channels_last(monkeypatch, bf16, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    plan = select_device("auto")
    assert plan.device == torch.device("cuda") and plan.amp_dtype == expected and plan.channels_last
    assert select_device("cuda:1").device == torch.device("cuda:1")
    assert select_device("cpu").device == torch.device("cpu")  # explicit CPU wins
    with pytest.raises(ValueError):
        select_device("tpu")


def test_empty_cache_falls_back_to_demo_weights_with_cpu_threads_applied(monkeypatch, tmp_path):
    monkeypatch.setattr(xrv.utils, "get_cache_dir", lambda: str(tmp_path) + "/")
    before = torch.get_num_threads()
    try:
        loaded = load_model(None, device="cpu", cpu_threads=1, demo_seed=3)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert loaded.info.version == "demo-seed3" and loaded.info.demo
