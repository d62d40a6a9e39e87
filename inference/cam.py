"""Class activation maps for all labels from the forward pass already made.

The xrv DenseNet head is relu(features) -> global average pool -> linear. For
such a head Grad-CAM on the post-ReLU map has channel weights
alpha_ck = mean_ij d(logit_c)/dA_kij = W[c,k] / (h*w), so Grad-CAM_c =
relu(sum_k W[c,k] A_k) / (h*w): the CAM up to a positive scale. One einsum over
the kept feature map therefore gives every class's map with no backward pass.
"""
from __future__ import annotations

import numpy as np
import torch

from inference.types import CHESTXRAY14, Heatmaps


def class_activation_maps(features: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Raw CAMs [B, C, h, w] from relu'd features [B, K, h, w] and classifier weight [C, K].

    The classifier bias is left out: it adds the same constant to every cell,
    so it moves no evidence from one place to another.
    """
    return torch.einsum("ck,bkhw->bchw", weight.to(features.dtype), features)


def scale_per_class(cams: torch.Tensor) -> torch.Tensor:
    """Scale each map to 0..1: negative evidence clipped to 0, then divided by its own max.

    So 1 marks the cell that most supports that class in this image and 0 marks
    no support. The scale is relative: maps are not comparable across classes
    or images (the probability says how strongly; the map says where). A map
    with no positive cell at all stays all zero.
    """
    positive = cams.clamp(min=0)
    peak = positive.amax(dim=(-2, -1), keepdim=True)
    return torch.where(peak > 0, positive / peak.clamp(min=torch.finfo(cams.dtype).tiny), torch.zeros_like(positive))


def heatmaps_for_batch(
    features: torch.Tensor,
    weight: torch.Tensor,
    crops: list[tuple[int, int, int]],
    source_shapes: list[tuple[int, int]],
) -> list[Heatmaps]:
    """One `Heatmaps` (the 14 ChestX-ray14 labels) per image of the batch."""
    n_labels = len(CHESTXRAY14)
    maps = scale_per_class(class_activation_maps(features, weight[:n_labels])).float().cpu().numpy()
    return [
        Heatmaps(maps=np.ascontiguousarray(maps[i], dtype=np.float32), crop=tuple(crop), source_shape=tuple(shape))
        for i, (crop, shape) in enumerate(zip(crops, source_shapes))
    ]
