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
    x = torch.from_numpy(np.random.default_rng(side).normal(0, 300, (1, side, side)).astype(np.float32))
    sigma = (side / 224 - 1) / 2
    kernel = gaussian_1d(torch.tensor(sigma), truncated=4.0, approx="sampled", normalize=True)
    literal = Resize((224, 224), mode="bilinear")(separable_filtering(x[None], [kernel, kernel], mode="zeros")[0])
    fused = AntiAliasedResize(224)(x)
    np.testing.assert_allclose(fused.numpy(), np.asarray(literal), atol=0.05)  # of a +-1000 range


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
    np.testing.assert_allclose(prepare_input(white).array, 1024.0, atol=1e-2)


def test_operator_for_a_huge_crop_is_small_and_quick():
    import time

    resize_operator.cache_clear()
    started = time.perf_counter()
    a = resize_operator(7745)  # a 60-megapixel square
    assert time.perf_counter() - started < 2.0
    assert a.shape == (224, 7745)
    np.testing.assert_allclose(a.sum(dim=1).numpy()[5:-5], 1.0, atol=1e-5)  # rows are averages inside


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
    np.testing.assert_allclose(fast.array, literal.array, atol=0.01)  # of a +-1024 range
    # The border rows, where zero padding makes resize and scaling not commute naively, match too.
    np.testing.assert_allclose(fast.array[0, [0, -1]], literal.array[0, [0, -1]], atol=0.01)


def test_out_of_range_pixels_take_the_clipping_chain():
    from inference.preprocess import prepare_input_reference

    pixels = np.full((300, 300), 8000.0, np.float32)  # above maxval: ScaleIntensityRange clips
    image = DecodedImage(pixels=pixels, maxval=4095.0, source_shape=(300, 300))
    np.testing.assert_allclose(prepare_input(image).array, prepare_input_reference(image).array, atol=1e-3)
    assert prepare_input(image).array.max() <= 1024.0 + 1e-3
