"""CAMs from one forward pass equal Grad-CAM on the post-ReLU feature map."""
from __future__ import annotations

import dicom_factory as f
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from inference.cam import class_activation_maps, heatmaps_for_batch, scale_per_class
from inference.decode import decode_dicom_file, decode_png_or_jpeg
from inference.preprocess import prepare_input
from inference.types import CHESTXRAY14


@pytest.fixture(scope="module")
def demo(demo_model):
    return demo_model


@pytest.fixture(scope="module")
def inputs():
    images = [decode_png_or_jpeg(f.NIH_PNGS[0]), decode_dicom_file(f.SIIM_MONO2)]
    return images, [prepare_input(image) for image in images]


def grad_cam(model, x: torch.Tensor, cls: int) -> np.ndarray:
    """Textbook Grad-CAM on relu(features): weights = spatial mean of d logit / dA."""
    with torch.enable_grad():
        # The weights are frozen, so let the graph flow from the input instead.
        activations = F.relu(model.module.features(x.clone().requires_grad_(True)))
        logits = model.module.classifier(F.adaptive_avg_pool2d(activations, (1, 1)).flatten(1))
        (grads,) = torch.autograd.grad(logits[0, cls], activations)
    alpha = grads.mean(dim=(2, 3), keepdim=True)
    return F.relu((alpha * activations).sum(dim=1))[0].detach().numpy()


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_cam_equals_grad_cam_for_several_classes(demo, inputs):
    images, model_inputs = inputs
    checked = 0
    for image, model_input in zip(images, model_inputs):
        x = torch.from_numpy(model_input.array[None])
        with torch.no_grad():
            _, features = demo.forward(x)
        heatmaps = heatmaps_for_batch(features, demo.classifier_weight, [model_input.crop], [image.source_shape])[0]
        for cls in (0, 3, 7, 10, 12):  # Atelectasis, Pneumothorax, Effusion, Cardiomegaly, Mass
            reference = grad_cam(demo, x, cls)
            assert reference.max() > 0, "Grad-CAM has no positive evidence; pick another class"
            similarity = cosine(heatmaps.maps[cls], reference)
            # README: "cosine 1.0000". Equal up to rounding: measured 1 - 1.4e-13 at worst.
            assert similarity >= 1 - 1e-6, (CHESTXRAY14[cls], similarity)
            checked += 1
    assert checked == 10


def test_cam_mean_plus_bias_is_the_logit(demo, inputs):
    # Global average pooling commutes with the linear head: a check on the einsum.
    _, model_inputs = inputs
    x = torch.from_numpy(np.stack([m.array for m in model_inputs]))
    with torch.no_grad():
        logits, features = demo.forward(x)
    cams = class_activation_maps(features, demo.classifier_weight)
    bias = demo.module.classifier.bias.detach()
    torch.testing.assert_close(cams.mean(dim=(2, 3)) + bias, logits, atol=1e-5, rtol=0)  # measured 1.4e-6


def test_scaling_is_per_class_zero_to_one_with_negative_evidence_clipped():
    cams = torch.tensor(
        [[[[-2.0, 1.0], [3.0, 0.5]], [[-1.0, -3.0], [-0.5, -2.0]], [[0.0, 4.0], [2.0, -1.0]]]], dtype=torch.float32
    )
    scaled = scale_per_class(cams)
    expected = torch.tensor([[[[0.0, 1 / 3], [1.0, 0.5 / 3]], [[0.0, 0.0], [0.0, 0.0]], [[0.0, 1.0], [0.5, 0.0]]]])
    torch.testing.assert_close(scaled, expected)


def test_heatmaps_carry_geometry_and_14_maps(demo, inputs):
    images, model_inputs = inputs
    x = torch.from_numpy(np.stack([m.array for m in model_inputs]))
    with torch.no_grad():
        _, features = demo.forward(x)
    maps = heatmaps_for_batch(
        features, demo.classifier_weight, [m.crop for m in model_inputs], [i.source_shape for i in images]
    )
    for image, model_input, hm in zip(images, model_inputs, maps):
        assert hm.maps.shape == (len(CHESTXRAY14), 7, 7) and hm.maps.dtype == np.float32
        assert hm.crop == model_input.crop and hm.source_shape == image.source_shape
        assert hm.maps.min() >= 0.0
        peaks = hm.maps.max(axis=(1, 2))
        assert np.all((peaks == 0.0) | np.isclose(peaks, 1.0))
        assert hm.at_source(0).shape == image.source_shape
