"""Outlines of the hot areas of a finding's heatmap, in source pixel coordinates.

Coordinates follow array indexing: (x, y) = (column, row) with (0, 0) the
centre of the top-left pixel. (DICOM SCOORD puts 0,0 at that pixel's outer
corner, so an SR writer adds 0.5.)
"""
from __future__ import annotations

import math

import numpy as np
from scipy import ndimage
from skimage.measure import find_contours
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
    simplify = DouglasPeucker(contour)
    tolerance = 0.5
    polygon = simplify(tolerance)
    while len(polygon) - 1 > max_vertices:
        tolerance *= 1.5
        polygon = simplify(tolerance)
    if len(polygon) < 4:  # simplified to a line: keep the raw outline (tiny blobs)
        polygon = contour
    if not np.array_equal(polygon[0], polygon[-1]):
        polygon = np.vstack([polygon, polygon[:1]])
    return polygon


class DouglasPeucker:
    """`skimage.measure.approximate_polygon(coords, tolerance)` for one chain at several tolerances.

    Douglas-Peucker splits a segment at its point farthest from the chord when
    that distance exceeds the tolerance. Where a segment splits does not depend
    on the tolerance, only whether it does, so each segment's farthest point is
    measured once (with scikit-image's arithmetic, so the corners are the same
    bits) and a larger tolerance only walks fewer of them. `_outline` raises the
    tolerance until the polygon has few enough corners: scikit-image measured
    every segment again at each try, in Python, with the GIL held.
    """

    def __init__(self, coords: np.ndarray):
        self.coords = coords
        self._farthest: dict[tuple[int, int], tuple[float, int]] = {}  # (start, end) -> (distance, index)

    def __call__(self, tolerance: float) -> np.ndarray:
        if tolerance <= 0:
            return self.coords
        chain = np.zeros(len(self.coords), bool)
        chain[0] = chain[-1] = True
        pending = [(0, len(self.coords) - 1)]
        while pending:
            start, end = pending.pop()
            distance, index = self._farthest_point(start, end)
            if distance > tolerance:
                chain[index] = True
                pending += [(index, end), (start, index)]
        return self.coords[chain, :]

    def _farthest_point(self, start: int, end: int) -> tuple[float, int]:
        known = self._farthest.get((start, end))
        if known is None:
            known = self._farthest[start, end] = self._measure(start, end)
        return known

    def _measure(self, start: int, end: int) -> tuple[float, int]:
        """The inner point farthest from the segment, as scikit-image 0.26 measures it."""
        if end - start < 2:
            return -math.inf, -1
        r0, c0 = self.coords[start, :]
        r1, c1 = self.coords[end, :]
        dr = r1 - r0
        dc = c1 - c0
        segment_angle = -np.arctan2(dr, dc)
        segment_dist = c0 * np.sin(segment_angle) + r0 * np.cos(segment_angle)
        inner = self.coords[start + 1:end, :]
        dr0 = inner[:, 0] - r0
        dc0 = inner[:, 1] - c0
        dr1 = inner[:, 0] - r1
        dc1 = inner[:, 1] - c1
        # Beside the segment: distance to the line; beyond either end: to the nearer end point.
        perp = np.logical_and(dr0 * dr + dc0 * dc > 0, -dr1 * dr - dc1 * dc > 0)
        to_line = np.abs(inner[:, 0] * np.cos(segment_angle) + inner[:, 1] * np.sin(segment_angle) - segment_dist)
        to_ends = np.minimum(np.sqrt(dc0 ** 2 + dr0 ** 2), np.sqrt(dc1 ** 2 + dr1 ** 2))
        dists = np.where(perp, to_line, to_ends)
        farthest = int(np.argmax(dists))
        return float(dists[farthest]), start + 1 + farthest
