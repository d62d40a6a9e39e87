"""Fidelity to torchxrayvision on generated variants: every lossless transfer syntax,
bit depths, MONOCHROME1; and the places where Carina differs on purpose."""
from __future__ import annotations

import copy
from pathlib import Path

import dicom_factory as f
import numpy as np
import pydicom
import pytest
import torch
import torchxrayvision as xrv
from PIL import Image
from peers import require_tool
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless

from inference.decode import decode_dicom_file
from inference.preprocess import prepare_input


@pytest.fixture(scope="module")
def reference_net(demo_model):
    net = xrv.models.DenseNet(weights=None, apply_sigmoid=True, op_threshs=None)
    net.load_state_dict(demo_model.module.state_dict())
    return net.eval()


def xrv_pipeline(path: Path, *, voi_lut: bool = False) -> np.ndarray:
    img = xrv.utils.read_xray_dcm(path, voi_lut=voi_lut)
    img = xrv.datasets.XRayCenterCrop()(img[None, ...])
    return xrv.datasets.XRayResizer(224)(img)


def probabilities(demo_model, reference_net, paths: list[Path], *, voi_lut: bool = False):
    ours = np.stack([prepare_input(decode_dicom_file(p)).array for p in paths])
    theirs = np.stack([xrv_pipeline(p, voi_lut=voi_lut) for p in paths]).astype(np.float32)
    with torch.no_grad():
        p_ref = reference_net(torch.from_numpy(theirs)).numpy()
        p_ours = torch.sigmoid(demo_model.forward(torch.from_numpy(ours))[0]).numpy()
    return p_ours, p_ref


def _variant_sources():
    tall = np.asarray(Image.fromarray(f.png_pixels(f.NIH_PNGS[1])).resize((520, 610)))
    wide = np.asarray(Image.fromarray(f.png_pixels(f.NIH_PNGS[0])).resize((620, 470)))
    return tall, wide


# (id, bits stored, photometric, how to encode) -- unsigned: read_xray_dcm has no notion of signed pixels
VARIANTS = [
    ("implicit-le-8bit", 8, "MONOCHROME2", lambda ds: f.transcoded(ds, require_tool("dcmconv"), "+ti")),
    ("deflate-10bit", 10, "MONOCHROME2", f.deflated),
    ("rle-12bit-mono1", 12, "MONOCHROME1", lambda ds: f.encoded(ds, RLELossless)),
    ("jpeg-ls-12bit", 12, "MONOCHROME2", lambda ds: f.encoded(ds, JPEGLSLossless)),
    ("j2k-lossless-16bit", 16, "MONOCHROME2", lambda ds: f.encoded(ds, JPEG2000Lossless)),
    ("jpeg-lossless-sv1-14bit-mono1", 14, "MONOCHROME1", lambda ds: f.transcoded(ds, require_tool("dcmcjpeg"), "+e1")),
]


@pytest.mark.filterwarnings("ignore:Converting MONOCHROME1")
def test_generated_transfer_syntax_variants_match_torchxrayvision(demo_model, reference_net, tmp_path):
    tall, wide = _variant_sources()
    paths = []
    for i, (name, bits, photometric, encode) in enumerate(VARIANTS):
        ds = encode(f.make_dx(tall if i % 2 else wide, bits_stored=bits, photometric=photometric))
        paths.append(f.write(ds, tmp_path / f"{name}.dcm"))
    syntaxes = {pydicom.dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID.name for p in paths}
    assert len(syntaxes) == len(VARIANTS), syntaxes  # really six different encodings
    p_ours, p_ref = probabilities(demo_model, reference_net, paths)
    worst = dict(zip([name for name, *_ in VARIANTS], np.abs(p_ours - p_ref).max(axis=1).round(6)))
    print("max |dp| per variant:", worst)
    assert max(worst.values()) <= 0.01, worst


@pytest.mark.filterwarnings("ignore:Converting MONOCHROME1")
def test_window_is_a_deliberate_difference_and_matches_xrv_with_voi_lut(demo_model, reference_net, tmp_path):
    """read_xray_dcm ignores the window by default; Carina applies it (as a PACS viewer would).

    With voi_lut=True xrv applies the same DICOM window (through pydicom), and then the two agree."""
    tall, _ = _variant_sources()
    narrow = f.make_dx(tall, bits_stored=12, window=(1800.0, 1600.0))  # clips the darkest and brightest
    path = f.write(narrow, tmp_path / "windowed.dcm")
    p_ours, p_plain = probabilities(demo_model, reference_net, [path])
    _, p_windowed = probabilities(demo_model, reference_net, [path], voi_lut=True)
    assert np.abs(p_ours - p_windowed).max() <= 0.01
    assert np.abs(p_ours - p_plain).max() > 0.02  # the window really changes what the model sees


def test_negative_rescale_slope_is_a_deliberate_difference(demo_model, reference_net, tmp_path):
    """Rescale Slope -1 means "larger stored value is darker"; Carina renders it the right way
    round, read_xray_dcm (which skips the rescale) sees the negative. The radiograph stored with
    slope -1 gives Carina the same answer as the plain one gives xrv."""
    plain = f.make_dx(sop_class_uid=f.CR_IMAGE, modality="CR", bits_stored=12)
    inverted = copy.deepcopy(plain)
    stored = np.frombuffer(plain.PixelData, dtype="<u2").reshape(plain.Rows, plain.Columns)
    inverted.PixelData = (4095 - stored).astype("<u2").tobytes()
    inverted.RescaleSlope, inverted.RescaleIntercept = -1, 4095
    p_plain_path = f.write(plain, tmp_path / "plain.dcm")
    inv_path = f.write(inverted, tmp_path / "inverted.dcm")
    p_ours, p_ref = probabilities(demo_model, reference_net, [inv_path, p_plain_path])
    assert np.abs(p_ours[0] - p_ref[1]).max() <= 0.01  # Carina on slope -1 == xrv on the plain image
    assert np.abs(p_ours[0] - p_ref[0]).max() > 0.02  # xrv on slope -1 sees a photographic negative
