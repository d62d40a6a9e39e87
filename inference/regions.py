"""Outlines of the hot areas of a finding's heatmap, in source pixel coordinates.

Coordinates follow array indexing: (x, y) = (column, row) with (0, 0) the
centre of the top-left pixel. (DICOM SCOORD puts 0,0 at that pixel's outer
corner, so an SR writer adds 0.5.)
"""
from __future__ import annotations

import math

import numpy as np
from scipy import ndimage
from skimage.measure import approximate_polygon, find_contours
from skimage.transform import resize

from inference.types import Heatmaps, Region

DEFAULT_LEVEL = 0.5  # relative CAM level that outlines a region
MAX_REGIONS = 3
MIN_COMPONENT_FRACTION = 0.25  # of the largest component's area; smaller specks are noise
MAX_VERTICES = 64
WORK_SIZE = 256  # outline on at most this grid: a 7x7 map has no finer detail, and 512 costs 3x


def find_regions(
    heatmaps: Heatmaps,
    index: int,
    *,
    level: float = DEFAULT_LEVEL,
    max_regions: int = MAX_REGIONS,
    min_fraction: float = MIN_COMPONENT_FRACTION,
    max_vertices: int = MAX_VERTICES,
    work_size: int = WORK_SIZE,
) -> tuple[Region, ...]:
    """Regions where label `index`'s map reaches `level`, largest first."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    row0, col0, side = heatmaps.crop
    grid = min(side, work_size)
    scale = side / grid  # source pixels per grid cell
    # Same interpolation as Heatmaps.at_source, so outlines match the rendered map.
    surface = resize(heatmaps.maps[index], (grid, grid), order=1, mode="edge", anti_aliasing=False)
    labels, count = ndimage.label(surface >= level)
    if count == 0:
        return ()
    areas = np.bincount(labels.ravel())[1:]
    order = np.argsort(areas)[::-1][:max_regions]
    kept = [k for k in order if areas[k] >= min_fraction * areas[order[0]]]

    rows, cols = heatmaps.source_shape
    regions = []
    for k in kept:
        component = labels == k + 1
        outline = _outline(component, max_vertices)  # (row, col) in grid cells
        y = np.clip(row0 + (outline[:, 0] + 0.5) * scale - 0.5, 0, rows - 1)
        x = np.clip(col0 + (outline[:, 1] + 0.5) * scale - 0.5, 0, cols - 1)
        r_idx, c_idx = np.nonzero(component)
        bbox = (
            max(0, math.floor(col0 + c_idx.min() * scale)),
            max(0, math.floor(row0 + r_idx.min() * scale)),
            min(cols, math.ceil(col0 + (c_idx.max() + 1) * scale)),
            min(rows, math.ceil(row0 + (r_idx.max() + 1) * scale)),
        )
        regions.append(
            Region(
                polygon=np.stack([x, y], axis=1).astype(np.float64),
                bbox=bbox,
                area_px=int(round(areas[k] * scale * scale)),
            )
        )
    return tuple(regions)


def _outline(component: np.ndarray, max_vertices: int) -> np.ndarray:
    """Closed outer boundary of one component, simplified to <= max_vertices corners."""
    # The zero border makes every contour closed, also where the component touches the edge.
    padded = np.pad(component.astype(np.float32), 1)
    contour = max(find_contours(padded, 0.5), key=len) - 1.0
    tolerance = 0.5
    polygon = approximate_polygon(contour, tolerance)
    while len(polygon) - 1 > max_vertices:
        tolerance *= 1.5
        polygon = approximate_polygon(contour, tolerance)
    if len(polygon) < 4:  # simplified to a line: keep the raw outline (tiny blobs)
        polygon = contour
    if not np.array_equal(polygon[0], polygon[-1]):
        polygon = np.vstack([polygon, polygon[:1]])
    return polygon
