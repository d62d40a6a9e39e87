"""Pictures for the reading app: the radiograph as a radiologist sees it, and
each finding's class activation map as a transparent overlay.

- The radiograph is the pipeline's own rendering (inference/decode.py: rescale,
  VOI LUT or window, MONOCHROME1 inverted), as the infer stage keeps it for the
  heatmap SCs (node/storage.py `display_path`, longest side 2048), compressed
  here for the one picture a radiologist opens. When that rendition is gone
  (retention, or a study scored before it was kept) the stored instance is
  decoded again the same way.
- An overlay is a small RGBA PNG covering the whole image: the map in the SCs'
  jet colours, its alpha the activation (cold = transparent). The maps are
  7x7 at the model's resolution, so 128 pixels on the long side lose nothing;
  the browser scales it over the radiograph and applies the chosen opacity.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from inference.types import DecodedImage, Heatmaps
from node.outputs.sc import display_rendition, jet
from node.renditions import read_rendition

OVERLAY_SIDE = 128  # longest side of a heatmap overlay
PREVIEW_SIDE = 1024  # longest side of an uploaded image's preview


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def jpeg(pixels: np.ndarray, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def source_png(display: Path, instance_file: Path | None) -> bytes:
    """The radiograph's display rendition as a PNG: the kept one (node/renditions.py),
    else decoded again from `instance_file`. Raises FileNotFoundError when
    neither exists, DecodeError when the file cannot be decoded."""
    try:
        return png(read_rendition(display))
    except (FileNotFoundError, ValueError):  # gone (retention), or not readable: the source is the truth
        if instance_file is None or not instance_file.is_file():
            raise FileNotFoundError(display) from None
    from inference import decode_dicom_file

    return png(display_rendition(decode_dicom_file(instance_file)))


def preview(image: DecodedImage, max_side: int = PREVIEW_SIDE) -> bytes:
    """A JPEG preview of an uploaded image (same rendering, smaller), for the upload page."""
    return jpeg(display_rendition(image, max_side=max_side))


def overlay_shape(source_shape: tuple[int, int], max_side: int = OVERLAY_SIDE) -> tuple[int, int]:
    scale = min(1.0, max_side / max(source_shape))
    return max(1, round(source_shape[0] * scale)), max(1, round(source_shape[1] * scale))


def heatmap_overlay(heatmaps: Heatmaps, index: int, max_side: int = OVERLAY_SIDE) -> np.ndarray:
    """uint8 RGBA [h, w, 4] of label `index`'s map over the whole image (zero outside the model's crop)."""
    rows, cols = heatmaps.source_shape
    shape = overlay_shape((rows, cols), max_side)
    scale = shape[0] / rows
    row0, col0, side = heatmaps.crop
    small = Heatmaps(heatmaps.maps, (round(row0 * scale), round(col0 * scale), max(1, round(side * scale))), shape)
    heat = np.clip(small.at_source(index), 0.0, 1.0)
    rgba = np.empty(shape + (4,), np.uint8)
    rgba[..., :3] = jet(heat)
    rgba[..., 3] = np.rint(heat * 255.0).astype(np.uint8)
    return rgba


def heatmap_png(heatmaps: Heatmaps, index: int, max_side: int = OVERLAY_SIDE) -> bytes:
    return png(heatmap_overlay(heatmaps, index, max_side))
