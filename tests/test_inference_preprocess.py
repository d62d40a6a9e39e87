"""The fused resize is the MONAI chain it replaces, and the crop is xrv's."""
from __future__ import annotations

import dicom_factory as f
import numpy as np
import pytest
import torch
import torchxrayvision as xrv
from monai.networks.layers.convutils import gaussian_1d
from monai.networks.layers.simplelayers import separable_filtering
from monai.transforms import Resize

from inference.decode import decode_dicom_file
from inference.preprocess import (
    AntiAliasedResize,
    center_crop_geometry,
    linear_interpolation_matrix,
    prepare_input,
    resize_operator,
)
from inference.types import DecodedImage


@pytest.mark.parametrize("side", [150, 224, 333, 1024, 2500])
def test_interpolation_matrix_is_monai_linear_resize(side):
    ours = linear_interpolation_matrix(side, 224).numpy()
    # MONAI computes in float32, so its weights carry float32 rounding ...
    monai_rows = torch.as_tensor(Resize((224,), mode="linear")(torch.eye(side, dtype=torch.float64))).T
    np.testing.assert_allclose(ours, monai_rows.numpy(), atol=5e-4)
    # ... and underneath is torch's half-pixel linear interpolation, matched exactly in float64.
    eye = torch.eye(side, dtype=torch.float64)[None]
    torch_rows = torch.nn.functional.interpolate(eye, size=224, mode="linear", align_corners=False)[0].T
    np.testing.assert_allclose(ours, torch_rows.numpy(), atol=1e-12)


@pytest.mark.parametrize("side", [300, 1024, 1500])
def test_fused_resize_equals_the_literal_monai_chain(side):
    """"Exact algebra" (README): the literal chain is run in float64, so what is left is the
    float32 rounding of the fused operator and product: measured 1.2e-4 (side 300), 4.6e-5
    (1024), 3.1e-5 (1500) on values up to ~1300, where a float32 ulp is 1.2e-4. (The same
    chain in MONAI's default float32 is itself off by up to 0.026 at side 300: torch's
    float32 source coordinates.)"""
    x = torch.from_numpy(np.random.default_rng(side).normal(0, 300, (1, side, side)).astype(np.float32))
    sigma = (side / 224 - 1) / 2
    kernel = gaussian_1d(torch.tensor(sigma, dtype=torch.float64), truncated=4.0, approx="sampled", normalize=True)
    smoothed = separable_filtering(x[None].double(), [kernel, kernel], mode="zeros")[0]
    literal = Resize((224, 224), mode="bilinear", dtype=torch.float64)(smoothed)
    fused = AntiAliasedResize(224)(x)
    np.testing.assert_allclose(fused.numpy(), np.asarray(literal, dtype=np.float64), rtol=0, atol=2.5e-4)


@pytest.mark.parametrize("shape", [(512, 512), (401, 333), (333, 401), (760, 600), (1001, 998), (7, 12)])
def test_crop_geometry_is_xrv_center_crop(shape):
    image = np.arange(shape[0] * shape[1], dtype=np.float32).reshape(1, *shape)
    row0, col0, side = center_crop_geometry(shape)
    np.testing.assert_array_equal(image[:, row0 : row0 + side, col0 : col0 + side], xrv.datasets.XRayCenterCrop()(image))


def test_prepare_input_range_and_crop():
    image = decode_dicom_file(f.SIIM_MONO2)
    model_input = prepare_input(image)
    assert model_input.array.shape == (1, 224, 224) and model_input.array.dtype == np.float32
    assert -1024.0 <= model_input.array.min() and model_input.array.max() <= 1024.0
    assert model_input.crop == (0, 0, 1024)
    white = DecodedImage(pixels=np.full((300, 500), 4095.0, np.float32), maxval=4095.0, source_shape=(300, 500))
    np.testing.assert_allclose(prepare_input(white).array, 1024.0, rtol=0, atol=1e-3)  # measured 2.4e-4


# Builds the operator for a 60-megapixel square (7745^2) in a fresh process and reports how
# much the peak RSS rose (the same /proc method as the 4k decode test).
_MEASURE_OPERATOR = r"""
import json, sys
from inference.preprocess import _sparse_operator
_sparse_operator(300)  # warm every import and allocator path on a small side

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
base, reset_peak = status("VmRSS"), status("VmHWM")
a, r = _sparse_operator(int(sys.argv[1]))
print(json.dumps({"base": base, "reset_peak": reset_peak, "peak": status("VmHWM"), "nnz": int(a.nnz),
                  "shape": list(a.shape)}))
"""


def test_operator_for_a_huge_crop_is_small():
    """The operator is O(size * side), never the side x side identity MONAI's Resize would
    need: for a 7745^2 crop the identity alone is 240 MB (float32). Building A (dense
    [224, 7745], then sparse) raises the peak RSS by 40 MB here; the bound is 100 MB. Each row
    has only the Gaussian's support (+1 for the bilinear taps), so A @ X costs nnz
    multiply-adds per column. (How long it takes is in bench/hostile_input.py.)"""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    side = 7745
    a = resize_operator(side)
    assert a.shape == (224, side)
    np.testing.assert_allclose(a.sum(dim=1).numpy()[5:-5], 1.0, atol=1e-5)  # rows are averages inside
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", _MEASURE_OPERATOR, str(side)], capture_output=True, text=True,
                          timeout=300, cwd=repo, env={**os.environ, "PYTHONPATH": str(repo)})
    assert proc.returncode == 0, proc.stderr
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    assert m["reset_peak"] - m["base"] < 4 << 20, "the kernel did not reset VmHWM; the measurement would be void"
    assert m["shape"] == [224, side]
    added = m["peak"] - m["base"]
    print(f"operator for a {side}^2 crop: +{added / 2**20:.0f} MB peak RSS, {m['nnz']} non-zeros")
    assert added < 100 << 20, f"{added / 2**20:.0f} MB"
    sigma = (side / 224 - 1) / 2
    assert m["nnz"] <= 224 * (8 * sigma + 4), m["nnz"]  # the Gaussian's +-4 sigma support, + 1 tap


@pytest.mark.parametrize("shape", [(1024, 1024), (3000, 2500), (2500, 3000), (401, 333), (150, 180), (7, 12)])
def test_fast_path_equals_the_literal_monai_chain(shape):
    from inference.preprocess import prepare_input_reference

    rng = np.random.default_rng(shape[0] * 7 + shape[1])
    pixels = (rng.random(shape, dtype=np.float32) ** 2 * 4095).astype(np.float32)
    pixels[: shape[0] // 3] *= 0.2  # structure, not just noise
    image = DecodedImage(pixels=pixels, maxval=4095.0, source_shape=shape)
    fast, literal = prepare_input(image), prepare_input_reference(image)
    assert fast.crop == literal.crop and fast.array.shape == literal.array.shape == (1, 224, 224)
    assert fast.array.dtype == np.float32 and fast.array.flags.c_contiguous
    # Of a +-1024 range: float32 rounding only, measured 3.4e-4 .. 4.6e-4 (a float32 ulp at 1024 is 1.2e-4).
    np.testing.assert_allclose(fast.array, literal.array, rtol=0, atol=1e-3)
    # The border rows, where zero padding makes resize and scaling not commute naively, match too
    # (measured 1.2e-4 .. 3.1e-4).
    np.testing.assert_allclose(fast.array[0, [0, -1]], literal.array[0, [0, -1]], rtol=0, atol=1e-3)


def test_out_of_range_pixels_take_the_clipping_chain():
    from inference.preprocess import prepare_input_reference

    pixels = np.full((300, 300), 8000.0, np.float32)  # above maxval: ScaleIntensityRange clips
    image = DecodedImage(pixels=pixels, maxval=4095.0, source_shape=(300, 300))
    # Not an approximation: out-of-range input is handed to the literal chain itself.
    np.testing.assert_array_equal(prepare_input(image).array, prepare_input_reference(image).array)
    assert prepare_input(image).array.max() <= 1024.0
