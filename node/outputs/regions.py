"""Where a finding is drawn: the geometry the SR, SEG and GSPS share.

A finding is drawn when it is positive and its class activation map gave a
region (`inference/regions.py`). Region polygons are in array-index space,
pixel centres at integers; the SR's SCOORD and the GSPS's PIXEL graphics put
(0, 0) at the outer corner of the top-left pixel instead (PS3.3 C.18.6.1.1,
C.10.5.1.2), so both use `outline`. The SEG fills the same polygons at the
source resolution (`mask`), so every output outlines the same pixels.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from inference.types import Finding, Region


def drawable(finding: Finding) -> bool:
    """Positive, with a region to outline."""
    return finding.positive and bool(finding.regions)


def drawable_findings(findings: tuple[Finding, ...]) -> tuple[Finding, ...]:
    return tuple(f for f in findings if drawable(f))


def largest(finding: Finding) -> Region:
    """The region that stands for a finding where only one fits (SR group, label anchor)."""
    return max(finding.regions, key=lambda r: r.area_px)


def outline(region: Region, rows: int, columns: int) -> np.ndarray:
    """Closed polyline (column, row) for `region` in DICOM image coordinates.

    Each vertex moves by +0.5 from array-index space to pixel-corner space.
    Clipped to [0, columns] x [0, rows]. A degenerate outline falls back to
    the bounding box, whose inclusive-exclusive integer edges are already
    pixel-corner positions.
    """
    points = np.asarray(region.polygon, dtype=np.float64).reshape(-1, 2) + 0.5
    if len(np.unique(np.round(points, 3), axis=0)) < 3:
        x1, y1, x2, y2 = region.bbox
        points = np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2]], dtype=np.float64)
    points[:, 0] = np.clip(points[:, 0], 0.0, float(columns))
    points[:, 1] = np.clip(points[:, 1], 0.0, float(rows))
    if not np.array_equal(points[0], points[-1]):
        points = np.vstack([points, points[:1]])
    return points.astype(np.float32)


def mask(finding: Finding, rows: int, columns: int) -> np.ndarray:
    """bool [rows, columns]: the pixels inside or on any of the finding's region polygons.

    PIL fills a polygon given in pixel-centre coordinates including its
    boundary pixels, so an outline through pixel centres keeps the pixels it
    passes through (a w x h box between centres covers (w+1)(h+1) pixels).
    """
    picture = Image.new("1", (columns, rows), 0)
    draw = ImageDraw.Draw(picture)
    for region in finding.regions:
        points = np.asarray(region.polygon, dtype=np.float64).reshape(-1, 2)
        if len(points) >= 3:
            draw.polygon([tuple(p) for p in points.tolist()], fill=1, outline=1)
        else:
            x1, y1, x2, y2 = region.bbox
            draw.rectangle([x1, y1, x2 - 1, y2 - 1], fill=1)
    return np.asarray(picture, dtype=bool)
