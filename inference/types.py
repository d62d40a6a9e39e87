"""Typed values that cross the boundary between the model and the rest of Carina.

Everything here is plain data (numpy + dataclasses): `inference/` must never
import `node` or `dicom_scp`, and its callers must never reach into torch.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# The 14 ChestX-ray14 labels Carina reports, in torchxrayvision's output order
# (the first 14 of its 18 outputs). These strings are the keys of fhir/terminology.json.
CHESTXRAY14: tuple[str, ...] = (
    "Atelectasis",
    "Consolidation",
    "Infiltration",
    "Pneumothorax",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Effusion",
    "Pneumonia",
    "Pleural_Thickening",
    "Cardiomegaly",
    "Nodule",
    "Mass",
    "Hernia",
)

DEMO_WARNING = "DEMO WEIGHTS — NOT FOR CLINICAL USE"


@dataclass(frozen=True)
class ModelInfo:
    """Which weights produced a result. `version` enters output UIDs."""

    name: str  # e.g. "densenet121-res224-all"
    version: str  # e.g. "demo-seed0" or the imported version
    demo: bool
    weights_sha256: str | None = None  # of the safetensors file actually loaded
    # Of the file the operator imported (the torchxrayvision pickle), as verified
    # by `carina model import`; None for demo weights.
    source_sha256: str | None = None
    # An ensemble's members, in registry order; empty for a single model. Kept
    # out of the JSON (and so out of every output) when empty, so a single
    # model's outputs are byte-identical to those written before ensembles.
    members: tuple["ModelInfo", ...] = ()

    @property
    def ref(self) -> str:
        """`name@version`, how the model registry and the CLI name a model."""
        return f"{self.name}@{self.version}"

    @property
    def caveat(self) -> str | None:
        return DEMO_WARNING if self.demo else None

    @property
    def is_ensemble(self) -> bool:
        return bool(self.members)


@dataclass(frozen=True)
class DecodedImage:
    """A radiograph ready for display and for the model.

    `pixels` is float32 [rows, columns] after Modality LUT (rescale), VOI LUT or
    window, and MONOCHROME1 inversion: larger always means brighter, in 0..`maxval`.
    """

    pixels: np.ndarray
    maxval: float
    source_shape: tuple[int, int]  # (rows, columns) of the stored image

    def display_uint8(self) -> np.ndarray:
        """8-bit presentation of `pixels` for rendering secondary captures."""
        # One float32 working array updated in place: the same arithmetic, and
        # so the same bytes, as clip(pixels / maxval, 0, 1) * 255 rounded, at
        # half the passes over a 16 MB picture.
        work = np.divide(self.pixels, max(self.maxval, 1e-6), dtype=np.float32)
        np.clip(work, 0.0, 1.0, out=work)
        work *= 255.0
        np.rint(work, out=work)
        return work.astype(np.uint8)


@dataclass(frozen=True)
class Region:
    """An outlined hot area of one finding, in source pixel coordinates.

    `polygon` is float [N, 2] of (column, row) = (x, y), closed: first point == last.
    `bbox` is (x1, y1, x2, y2), inclusive-exclusive, integers.
    """

    polygon: np.ndarray
    bbox: tuple[int, int, int, int]
    area_px: int


@dataclass(frozen=True)
class Finding:
    label: str  # one of CHESTXRAY14
    probability: float  # sigmoid output of the model, 0..1 (not op-normalised)
    threshold: float  # the model's operating point for this label
    positive: bool  # probability >= threshold
    regions: tuple[Region, ...] = ()  # only for positive findings
    # From the configured probability bands (inference.severity); None when no
    # bands were applied (e.g. results stored before severities existed).
    severity: str | None = None


@dataclass(frozen=True)
class Heatmaps:
    """Class activation maps for the 14 labels from one forward pass.

    Kept at feature-map resolution with the crop geometry, so a 4k image does
    not cost 14 full-size float maps; `at_source` upsamples one on demand.
    `maps` is float32 [14, h, w], each scaled to 0..1 (0 where the class has no
    positive evidence). `crop` is (row0, col0, side) of the square the model saw.
    """

    maps: np.ndarray
    crop: tuple[int, int, int]
    source_shape: tuple[int, int]

    def at_source(self, index: int) -> np.ndarray:
        """float32 [rows, columns] map for label `index`, zero outside the crop."""
        from skimage.transform import resize  # heavy import, only when rendering

        row0, col0, side = self.crop
        full = np.zeros(self.source_shape, dtype=np.float32)
        full[row0 : row0 + side, col0 : col0 + side] = resize(
            self.maps[index], (side, side), order=1, mode="edge", anti_aliasing=False
        )
        return full


@dataclass(frozen=True)
class ImageResult:
    """What the model says about one image."""

    findings: tuple[Finding, ...]  # 14, in CHESTXRAY14 order
    heatmaps: Heatmaps
    image: DecodedImage
    model: ModelInfo
    timings_ms: dict[str, float] = field(default_factory=dict)

    @property
    def positives(self) -> tuple[Finding, ...]:
        return tuple(f for f in self.findings if f.positive)
