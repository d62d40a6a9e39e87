"""A fixed study whose outputs are pinned byte for byte (tests/data/golden/).

Two source images with fixed UIDs, fixed findings (severity and regions
included), fixed heatmaps and a fixed issue time. `tests/test_golden_outputs.py`
runs them through the real infer and encode stages and the real HL7 and FHIR
builders and compares every output with the digests recorded in
`tests/data/golden/manifest.json`, which were produced by the code before the
typed-pipeline refactor (issue #8). A deliberate output change re-records them
with `python tests/golden_study.py --write` and says why in its commit.
"""
from __future__ import annotations

import datetime as dt
import hashlib
from pathlib import Path

import numpy as np
from PIL import Image

from dicom_factory import NIH_PNGS, make_dx, png_pixels
from inference.severity import SeverityBands
from inference.types import CHESTXRAY14, DecodedImage, Finding, Heatmaps, ImageResult, ModelInfo, Region

GOLDEN_DIR = Path(__file__).resolve().parent / "data" / "golden"
CALLING_AE = "GOLDEN_MOD"
PATIENT_SYSTEM = "urn:oid:1.2.826.0.1.3680043.10.1249.1"
STUDY_UID = "1.2.826.0.1.3680043.10.1249.777.1"
MODEL = ModelInfo("densenet121-res224-all", "demo-seed0", demo=True, weights_sha256="ab" * 32)
# Issue times of version 1 and 2 (UTC, whole seconds: FHIR instants keep seconds).
ISSUED = (
    dt.datetime(2026, 11, 21, 10, 0, 0, tzinfo=dt.timezone.utc),
    dt.datetime(2026, 11, 21, 11, 30, 0, tzinfo=dt.timezone.utc),
)

# (SOP Instance UID, shape, bits, photometric, view, PNG index)
IMAGES = (
    ("1.2.826.0.1.3680043.10.1249.777.1.1.1", (2300, 1900), 12, "MONOCHROME2", "PA", 0),
    ("1.2.826.0.1.3680043.10.1249.777.1.2.1", (560, 640), 16, "MONOCHROME1", "AP", 1),
)
# Per version, per image: {label: probability}; every other label gets a low negative.
POSITIVES = (
    ({"Pneumothorax": 0.91, "Effusion": 0.62, "Cardiomegaly": 0.55}, {"Effusion": 0.71}),
    ({"Effusion": 0.66}, {"Effusion": 0.74, "Nodule": 0.58}),
)
BANDS = SeverityBands.from_pairs()


def local_naive(instant: dt.datetime) -> dt.datetime:
    """DICOM dates and times are the creating equipment's local time."""
    return instant.astimezone().replace(tzinfo=None)


def source_datasets() -> list:
    datasets = []
    for index, (sop_uid, shape, bits, photometric, view, png) in enumerate(IMAGES):
        pixels = np.asarray(Image.fromarray(png_pixels(NIH_PNGS[png])).resize(shape[::-1], Image.Resampling.BILINEAR))
        ds = make_dx(pixels, bits_stored=bits, photometric=photometric, view_position=view,
                     patient_id="GOLD-0042", patient_name="Golden^Gloria^M", accession="ACCGOLD1")
        ds.StudyInstanceUID = STUDY_UID
        ds.SeriesInstanceUID = f"{STUDY_UID}.{index + 1}"
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.SeriesNumber = index + 1
        datasets.append(ds)
    return datasets


def _polygon(cx: float, cy: float, rx: float, ry: float, n: int = 12) -> np.ndarray:
    angles = np.linspace(0.0, 2 * np.pi, n, endpoint=False)
    points = np.stack([cx + rx * np.cos(angles), cy + ry * np.sin(angles)], axis=1)
    return np.vstack([points, points[:1]])


def image_result(image: DecodedImage, version: int, image_index: int) -> ImageResult:
    """The fixed findings and heatmaps of one image in one study version."""
    rows, cols = image.source_shape
    rng = np.random.default_rng(1000 * version + image_index)
    maps = np.zeros((14, 7, 7), dtype=np.float32)
    positives = POSITIVES[version - 1][image_index]
    findings = []
    for index, label in enumerate(CHESTXRAY14):
        probability = positives.get(label, round(0.04 + 0.013 * index, 3))
        positive = probability >= 0.5
        regions: tuple[Region, ...] = ()
        if positive:
            patch = rng.random((3, 3), dtype=np.float32)
            maps[index, 2:5, 1 + index % 3 : 4 + index % 3] = patch / patch.max()
            cx, cy = cols * (0.3 + 0.03 * (index % 5)), rows * (0.45 + 0.02 * (index % 4))
            rx, ry = cols * 0.08, rows * 0.06
            polygon = _polygon(cx, cy, rx, ry)
            bbox = (int(cx - rx), int(cy - ry), int(cx + rx) + 1, int(cy + ry) + 1)
            second = _polygon(cx + 2.5 * rx, cy, rx / 2, ry / 2, n=8)
            regions = (
                Region(polygon, bbox, int(np.pi * rx * ry)),
                Region(second, (int(cx + 2 * rx), int(cy - ry / 2), int(cx + 3 * rx) + 1, int(cy + ry / 2) + 1),
                       int(np.pi * rx * ry / 4)),
            )
        findings.append(Finding(label, probability, 0.5, positive, regions, BANDS.grade(probability, 0.5)))
    side = min(rows, cols)
    heatmaps = Heatmaps(maps=maps, crop=((rows - side) // 2, (cols - side) // 2, side), source_shape=(rows, cols))
    return ImageResult(findings=tuple(findings), heatmaps=heatmaps, image=image, model=MODEL)


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
