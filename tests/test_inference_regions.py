"""Region outlines: around the hot blob, closed, inside the image, cheap on huge images."""
from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from skimage.measure import points_in_poly

from inference.regions import MAX_VERTICES, DouglasPeucker, find_regions
from inference.types import CHESTXRAY14, Heatmaps


def blob_maps(shape=(7, 7), blobs=((2.0, 4.0, 1.0, 1.0),)) -> np.ndarray:
    """[14, h, w] maps; label 0 holds Gaussian blobs (row, col, sigma, height), scaled to peak 1."""
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float64)
    surface = np.zeros(shape)
    for r, c, sigma, height in blobs:
        surface += height * np.exp(-((rows - r) ** 2 + (cols - c) ** 2) / (2 * sigma**2))
    maps = np.zeros((len(CHESTXRAY14), *shape), dtype=np.float32)
    maps[0] = surface / surface.max()
    return maps


def cell_centre_in_source(heatmaps: Heatmaps, row: float, col: float) -> tuple[float, float]:
    """(x, y) of a feature cell's centre in source pixels (the resize is half-pixel aligned)."""
    row0, col0, side = heatmaps.crop
    h, w = heatmaps.maps.shape[1:]
    return col0 + (col + 0.5) * side / w - 0.5, row0 + (row + 0.5) * side / h - 0.5


def assert_well_formed(region, source_shape):
    rows, cols = source_shape
    polygon = region.polygon
    assert polygon.ndim == 2 and polygon.shape[1] == 2 and 4 <= len(polygon) <= MAX_VERTICES + 1
    np.testing.assert_array_equal(polygon[0], polygon[-1])  # closed
    assert polygon[:, 0].min() >= 0 and polygon[:, 0].max() <= cols - 1
    assert polygon[:, 1].min() >= 0 and polygon[:, 1].max() <= rows - 1
    x1, y1, x2, y2 = region.bbox
    assert 0 <= x1 < x2 <= cols and 0 <= y1 < y2 <= rows
    assert all(isinstance(v, int) for v in region.bbox)
    # The outline lies within its bounding box (to the half pixel the boundary sits on).
    assert polygon[:, 0].min() >= x1 - 1 and polygon[:, 0].max() <= x2
    assert polygon[:, 1].min() >= y1 - 1 and polygon[:, 1].max() <= y2
    assert region.area_px > 0


def test_polygon_surrounds_a_single_blob_on_a_non_square_image():
    heatmaps = Heatmaps(maps=blob_maps(), crop=(0, 100, 600), source_shape=(600, 800))
    (region,) = find_regions(heatmaps, 0)
    assert_well_formed(region, heatmaps.source_shape)
    cx, cy = cell_centre_in_source(heatmaps, 2.0, 4.0)
    assert points_in_poly([[cx, cy]], region.polygon)[0]
    x1, y1, x2, y2 = region.bbox
    assert x1 <= cx < x2 and y1 <= cy < y2
    far_x, far_y = cell_centre_in_source(heatmaps, 6.0, 0.0)
    assert not points_in_poly([[far_x, far_y]], region.polygon)[0]
    # A Gaussian of sigma 1 cell at half height: radius ~1.18 cells = ~101 px here.
    radius = np.sqrt(region.area_px / np.pi)
    assert 70 < radius < 130, radius


def test_two_blobs_give_two_regions_largest_first_and_specks_are_dropped():
    maps = blob_maps(
        shape=(28, 28),
        blobs=((7.0, 7.0, 3.0, 1.0), (20.0, 20.0, 2.0, 1.0), (22.0, 4.0, 0.4, 1.0)),  # big, medium, speck
    )
    heatmaps = Heatmaps(maps=maps, crop=(0, 0, 1000), source_shape=(1000, 1000))
    regions = find_regions(heatmaps, 0)
    assert len(regions) == 2
    assert regions[0].area_px > regions[1].area_px
    for region, (r, c) in zip(regions, [(7.0, 7.0), (20.0, 20.0)]):
        assert_well_formed(region, heatmaps.source_shape)
        assert points_in_poly([cell_centre_in_source(heatmaps, r, c)], region.polygon)[0]
    # Lowering the bar on component size keeps the speck as a third region.
    assert len(find_regions(heatmaps, 0, min_fraction=0.001)) == 3


def test_at_most_max_regions():
    blobs = tuple((r, c, 0.8, 1.0) for r in (4.0, 14.0, 24.0) for c in (4.0, 14.0, 24.0))
    heatmaps = Heatmaps(maps=blob_maps(shape=(28, 28), blobs=blobs), crop=(0, 0, 500), source_shape=(500, 500))
    assert len(find_regions(heatmaps, 0)) == 3
    assert len(find_regions(heatmaps, 0, max_regions=5)) == 5


def test_higher_level_gives_a_smaller_region():
    heatmaps = Heatmaps(maps=blob_maps(), crop=(0, 0, 700), source_shape=(700, 700))
    (loose,) = find_regions(heatmaps, 0, level=0.3)
    (tight,) = find_regions(heatmaps, 0, level=0.8)
    assert tight.area_px < loose.area_px
    with pytest.raises(ValueError):
        find_regions(heatmaps, 0, level=1.0)


def test_blob_at_the_image_edge_stays_inside_and_closed():
    heatmaps = Heatmaps(maps=blob_maps(blobs=((0.0, 6.0, 1.2, 1.0),)), crop=(50, 0, 400), source_shape=(500, 400))
    (region,) = find_regions(heatmaps, 0)
    assert_well_formed(region, heatmaps.source_shape)
    assert region.polygon[:, 1].min() >= 50 - 1  # from the crop's top edge, not the image's


def test_empty_map_has_no_regions():
    heatmaps = Heatmaps(maps=np.zeros((14, 7, 7), dtype=np.float32), crop=(0, 0, 100), source_shape=(100, 100))
    assert find_regions(heatmaps, 0) == ()


def test_huge_source_is_outlined_on_a_small_grid():
    # 9000 x 12000 source: a full-resolution mask alone would be 81 MB as bool.
    heatmaps = Heatmaps(maps=blob_maps(), crop=(0, 1500, 9000), source_shape=(9000, 12000))
    tracemalloc.start()
    try:
        (region,) = find_regions(heatmaps, 0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 20_000_000
    assert_well_formed(region, heatmaps.source_shape)
    assert points_in_poly([cell_centre_in_source(heatmaps, 2.0, 4.0)], region.polygon)[0]


def test_many_vertices_are_simplified():
    # A ragged, star-like hot area whose raw outline has hundreds of points.
    rows, cols = np.mgrid[0:128, 0:128].astype(np.float64)
    theta = np.arctan2(rows - 64, cols - 64)
    radius = np.hypot(rows - 64, cols - 64)
    star = (radius < 30 + 20 * np.sin(9 * theta)).astype(np.float32)
    maps = np.zeros((14, 128, 128), dtype=np.float32)
    maps[0] = star
    heatmaps = Heatmaps(maps=maps, crop=(0, 0, 2048), source_shape=(2048, 2048))
    (region,) = find_regions(heatmaps, 0, max_vertices=24)
    assert len(region.polygon) <= 25
    np.testing.assert_array_equal(region.polygon[0], region.polygon[-1])
    assert points_in_poly([[1024.0, 1024.0]], region.polygon)[0]


def test_the_simplification_is_scikit_image_s_at_every_tolerance():
    """DouglasPeucker measures each segment once for the whole tolerance ladder `_outline`
    climbs; it must pick exactly the corners skimage's approximate_polygon picks."""
    from scipy import ndimage
    from skimage.measure import approximate_polygon, find_contours

    rng = np.random.default_rng(12)
    compared = 0
    for _ in range(60):
        surface = ndimage.zoom(ndimage.gaussian_filter(rng.random((48, 48)), rng.uniform(1, 5)), 4, order=1)
        labels, count = ndimage.label(surface >= np.quantile(surface, rng.uniform(0.5, 0.95)))
        for k in range(1, min(count, 3) + 1):
            contour = max(find_contours(np.pad((labels == k).astype(np.float32), 1), 0.5), key=len) - 1.0
            simplify, tolerance = DouglasPeucker(contour), 0.5
            for _ in range(10):
                assert np.array_equal(simplify(tolerance), approximate_polygon(contour, tolerance)), tolerance
                compared += 1
                tolerance *= 1.5
    assert compared > 600
