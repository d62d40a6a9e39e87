"""Fidelity to torchxrayvision on generated variants: every lossless transfer syntax we can
generate, 8-16 bit, MONOCHROME1; and the places where Carina differs on purpose.

The README claims: "with identical weights, max |dp| over the 18 outputs is at most 1e-5, on
every sample and on generated 8-16-bit variants in every lossless transfer syntax". The tests
here assert exactly that bound (tests/test_inference_model.py does the same for the samples).
Measured on the 2-core CPU VM (demo weights, torch 2.14.1): 1.0e-6 .. 2.8e-6 per variant,
3.8e-6 for the windowed image with voi_lut=True, 1.2e-6 for the negative slope. What is left
is float32 rounding in the resize (Carina: a float32 sparse matrix product; skimage: float64),
up to 6.7e-4 of the [-1024, 1024] input range; the network code path itself differs by 0.0.
"""
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

# The README's fidelity claim, max |dp| over the 18 outputs (measured: <= 3.8e-6).
MAX_DP = 1e-5
# What the network sees, in [-1024, 1024] units: float32 rounding of the resize (measured <= 6.7e-4
# here, 7.9e-4 on 2-3k pixel DX; a float32 ulp at 1024 is 1.2e-4).
MAX_INPUT_DIFFERENCE = 1e-3


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
    """(Carina's probabilities, xrv's probabilities, max |input difference| per image)."""
    ours = np.stack([prepare_input(decode_dicom_file(p)).array for p in paths])
    theirs = np.stack([xrv_pipeline(p, voi_lut=voi_lut) for p in paths]).astype(np.float32)
    with torch.no_grad():
        p_ref = reference_net(torch.from_numpy(theirs)).numpy()  # xrv's own forward, model(x)
        p_ours = torch.sigmoid(demo_model.forward(torch.from_numpy(ours))[0]).numpy()
    return p_ours, p_ref, np.abs(ours - theirs).reshape(len(paths), -1).max(axis=1)


def _variant_sources():
    tall = np.asarray(Image.fromarray(f.png_pixels(f.NIH_PNGS[1])).resize((520, 610)))
    wide = np.asarray(Image.fromarray(f.png_pixels(f.NIH_PNGS[0])).resize((620, 470)))
    return tall, wide


def _dcmconv(*args):
    return lambda ds: f.transcoded(ds, require_tool("dcmconv"), *args)


def _dcmcjpeg(*args):
    return lambda ds: f.transcoded(ds, require_tool("dcmcjpeg"), *args)


# (id, bits stored, photometric, how to encode) -- unsigned: read_xray_dcm has no notion of signed pixels.
# Every lossless syntax Carina decodes; HTJ2K is coded by OpenJPH (Debian openjph-tools).
VARIANTS = [
    ("explicit-le-16bit-mono1", 16, "MONOCHROME1", lambda ds: ds),
    ("implicit-le-8bit", 8, "MONOCHROME2", _dcmconv("+ti")),
    ("explicit-be-11bit", 11, "MONOCHROME2", _dcmconv("+tb")),
    ("deflate-10bit", 10, "MONOCHROME2", f.deflated),
    ("rle-12bit-mono1", 12, "MONOCHROME1", lambda ds: f.encoded(ds, RLELossless)),
    ("jpeg-ls-12bit", 12, "MONOCHROME2", lambda ds: f.encoded(ds, JPEGLSLossless)),
    ("j2k-lossless-16bit", 16, "MONOCHROME2", lambda ds: f.encoded(ds, JPEG2000Lossless)),
    ("jpeg-lossless-sv1-14bit-mono1", 14, "MONOCHROME1", _dcmcjpeg("+e1")),
    ("jpeg-lossless-p14-13bit", 13, "MONOCHROME2", _dcmcjpeg("+el")),
    ("htj2k-lossless-16bit", 16, "MONOCHROME2", lambda ds: f.htj2k(ds, require_tool("ojph_compress"))),
    ("htj2k-rpcl-lossless-12bit-mono1", 12, "MONOCHROME1",
     lambda ds: f.htj2k(ds, require_tool("ojph_compress"), rpcl=True)),
]


@pytest.mark.filterwarnings("ignore:Converting MONOCHROME1")
def test_generated_transfer_syntax_variants_match_torchxrayvision(demo_model, reference_net, tmp_path):
    tall, wide = _variant_sources()
    paths = []
    for i, (name, bits, photometric, encode) in enumerate(VARIANTS):
        ds = encode(f.make_dx(tall if i % 2 else wide, bits_stored=bits, photometric=photometric))
        paths.append(f.write(ds, tmp_path / f"{name}.dcm"))
    syntaxes = {pydicom.dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID for p in paths}
    assert len(syntaxes) == len(VARIANTS), syntaxes  # every variant a different encoding
    assert all(not s.is_compressed or "Lossless" in s.name for s in syntaxes), syntaxes
    p_ours, p_ref, inputs = probabilities(demo_model, reference_net, paths)
    names = [name for name, *_ in VARIANTS]
    worst = dict(zip(names, np.abs(p_ours - p_ref).max(axis=1).tolist()))
    print("max |dp| per variant:", {k: f"{v:.2e}" for k, v in worst.items()})
    print("max |input difference| per variant:", {k: f"{v:.2e}" for k, v in zip(names, inputs)})
    assert max(worst.values()) <= MAX_DP, worst
    assert inputs.max() <= MAX_INPUT_DIFFERENCE, dict(zip(names, inputs))
    assert np.abs(p_ref[0] - p_ref[1]).max() > 0.02  # the two sources differ: the comparison means something


@pytest.mark.filterwarnings("ignore:Converting MONOCHROME1")
def test_window_is_a_deliberate_difference_and_matches_xrv_with_voi_lut(demo_model, reference_net, tmp_path):
    """README "Where Carina deliberately differs": read_xray_dcm ignores the window by default;
    Carina applies it (as a PACS viewer would). With voi_lut=True xrv applies the same DICOM
    window (through pydicom), and then the two agree to the fidelity bound (measured 3.8e-6)."""
    tall, _ = _variant_sources()
    narrow = f.make_dx(tall, bits_stored=12, window=(1800.0, 1600.0))  # clips the darkest and brightest
    path = f.write(narrow, tmp_path / "windowed.dcm")
    p_ours, p_plain, _ = probabilities(demo_model, reference_net, [path])
    _, p_windowed, inputs = probabilities(demo_model, reference_net, [path], voi_lut=True)
    print(f"windowed: max |dp| {np.abs(p_ours - p_windowed).max():.2e} against voi_lut=True, "
          f"{np.abs(p_ours - p_plain).max():.3f} against the plain reader")
    assert np.abs(p_ours - p_windowed).max() <= MAX_DP
    assert inputs.max() <= MAX_INPUT_DIFFERENCE
    assert np.abs(p_ours - p_plain).max() > 0.02  # the window really changes what the model sees (measured 0.92)


def test_negative_rescale_slope_is_a_deliberate_difference(demo_model, reference_net, tmp_path):
    """README "Where Carina deliberately differs": Rescale Slope -1 means "larger stored value
    is darker"; Carina renders it the right way round, read_xray_dcm (which skips the rescale)
    sees the negative. The radiograph stored with slope -1 gives Carina the same answer, to the
    fidelity bound (measured 1.2e-6), as the plain one gives xrv."""
    plain = f.make_dx(sop_class_uid=f.CR_IMAGE, modality="CR", bits_stored=12)
    inverted = copy.deepcopy(plain)
    stored = np.frombuffer(plain.PixelData, dtype="<u2").reshape(plain.Rows, plain.Columns)
    inverted.PixelData = (4095 - stored).astype("<u2").tobytes()
    inverted.RescaleSlope, inverted.RescaleIntercept = -1, 4095
    p_plain_path = f.write(plain, tmp_path / "plain.dcm")
    inv_path = f.write(inverted, tmp_path / "inverted.dcm")
    p_ours, p_ref, _ = probabilities(demo_model, reference_net, [inv_path, p_plain_path])
    print(f"negative slope: max |dp| {np.abs(p_ours[0] - p_ref[1]).max():.2e}")
    assert np.abs(p_ours[0] - p_ref[1]).max() <= MAX_DP  # Carina on slope -1 == xrv on the plain image
    assert np.abs(p_ours[0] - p_ref[0]).max() > 0.02  # xrv on slope -1 sees a photographic negative
