"""ImageResult <-> JSON-ready dict, stored in the DB between the infer and encode stages.

Everything except the image pixels is kept (the encoder re-decodes the stored
instance). Python floats print with repr, so float32 maps and float64
probabilities survive `json.dumps`/`json.loads` bit for bit.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from inference.types import CHESTXRAY14, DecodedImage, Finding, Heatmaps, ImageResult, ModelInfo, Region

SCHEMA_VERSION = 1


def result_to_json(result: ImageResult) -> dict[str, Any]:
    return {
        "schema": SCHEMA_VERSION,
        "model": {
            "name": result.model.name,
            "version": result.model.version,
            "demo": result.model.demo,
            "weights_sha256": result.model.weights_sha256,
            "source_sha256": result.model.source_sha256,
        },
        "findings": [_finding_to_json(f) for f in result.findings],
        "heatmaps": {
            "labels": list(CHESTXRAY14),
            "maps": np.asarray(result.heatmaps.maps, dtype=np.float32).tolist(),
            "crop": [int(v) for v in result.heatmaps.crop],
            "source_shape": [int(v) for v in result.heatmaps.source_shape],
        },
        "timings_ms": {k: float(v) for k, v in result.timings_ms.items()},
    }


def result_from_json(data: dict[str, Any], image: DecodedImage) -> ImageResult:
    """Rebuild the result for `image`, the same instance decoded again."""
    if data.get("schema") != SCHEMA_VERSION:
        raise ValueError(f"unsupported result schema {data.get('schema')!r}, expected {SCHEMA_VERSION}")
    hm = data["heatmaps"]
    source_shape = tuple(int(v) for v in hm["source_shape"])
    if source_shape != tuple(image.source_shape):
        raise ValueError(f"result is for a {source_shape} image, given {tuple(image.source_shape)}")
    heatmaps = Heatmaps(
        maps=np.asarray(hm["maps"], dtype=np.float32),
        crop=tuple(int(v) for v in hm["crop"]),
        source_shape=source_shape,
    )
    model = data["model"]
    return ImageResult(
        findings=tuple(_finding_from_json(f) for f in data["findings"]),
        heatmaps=heatmaps,
        image=image,
        model=ModelInfo(
            name=model["name"],
            version=model["version"],
            demo=bool(model["demo"]),
            weights_sha256=model.get("weights_sha256"),
            source_sha256=model.get("source_sha256"),
        ),
        timings_ms={k: float(v) for k, v in data.get("timings_ms", {}).items()},
    )


def _finding_to_json(finding: Finding) -> dict[str, Any]:
    return {
        "label": finding.label,
        "probability": float(finding.probability),
        "threshold": float(finding.threshold),
        "positive": bool(finding.positive),
        "severity": finding.severity,
        "regions": [
            {
                "polygon": np.asarray(r.polygon, dtype=np.float64).tolist(),
                "bbox": [int(v) for v in r.bbox],
                "area_px": int(r.area_px),
            }
            for r in finding.regions
        ],
    }


def _finding_from_json(data: dict[str, Any]) -> Finding:
    return Finding(
        label=data["label"],
        probability=float(data["probability"]),
        threshold=float(data["threshold"]),
        positive=bool(data["positive"]),
        regions=tuple(
            Region(
                polygon=np.asarray(r["polygon"], dtype=np.float64).reshape(-1, 2),
                bbox=tuple(int(v) for v in r["bbox"]),
                area_px=int(r["area_px"]),
            )
            for r in data["regions"]
        ),
        severity=data.get("severity"),  # absent in results stored before severities existed
    )
