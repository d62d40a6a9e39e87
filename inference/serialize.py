"""The model's typed results <-> JSON-ready dicts.

`finding_*`, `heatmaps_*` and `model_*` are the pieces the node's scored-study
codec (node/scored_study.py) is made of; `result_*` round-trips one whole
ImageResult except its pixels. Python floats print with repr, so float32 maps
and float64 probabilities survive `json.dumps`/`json.loads` bit for bit.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from inference.types import CHESTXRAY14, DecodedImage, Finding, Heatmaps, ImageResult, ModelInfo, Region

SCHEMA_VERSION = 1


def result_to_json(result: ImageResult) -> dict[str, Any]:
    return {
        "schema": SCHEMA_VERSION,
        "model": model_to_json(result.model),
        "findings": [finding_to_json(f) for f in result.findings],
        "heatmaps": heatmaps_to_json(result.heatmaps),
        "timings_ms": {k: float(v) for k, v in result.timings_ms.items()},
    }


def result_from_json(data: dict[str, Any], image: DecodedImage) -> ImageResult:
    """Rebuild the result for `image`, the same instance decoded again."""
    if data.get("schema") != SCHEMA_VERSION:
        raise ValueError(f"unsupported result schema {data.get('schema')!r}, expected {SCHEMA_VERSION}")
    heatmaps = heatmaps_from_json(data["heatmaps"])
    if heatmaps.source_shape != tuple(image.source_shape):
        raise ValueError(f"result is for a {heatmaps.source_shape} image, given {tuple(image.source_shape)}")
    return ImageResult(
        findings=tuple(finding_from_json(f) for f in data["findings"]),
        heatmaps=heatmaps,
        image=image,
        model=model_from_json(data["model"]),
        timings_ms={k: float(v) for k, v in data.get("timings_ms", {}).items()},
    )


def model_to_json(model: ModelInfo) -> dict[str, Any]:
    data = {
        "name": model.name,
        "version": model.version,
        "demo": model.demo,
        "weights_sha256": model.weights_sha256,
        "source_sha256": model.source_sha256,
    }
    if model.members:  # only ensembles carry the key: single-model JSON is unchanged
        data["members"] = [model_to_json(member) for member in model.members]
    return data


def model_from_json(data: dict[str, Any]) -> ModelInfo:
    return ModelInfo(
        name=data["name"],
        version=data["version"],
        demo=bool(data["demo"]),
        weights_sha256=data.get("weights_sha256"),
        source_sha256=data.get("source_sha256"),
        members=tuple(model_from_json(member) for member in data.get("members", ())),
    )


def heatmaps_to_json(heatmaps: Heatmaps) -> dict[str, Any]:
    return {
        "labels": list(CHESTXRAY14),
        "maps": np.asarray(heatmaps.maps, dtype=np.float32).tolist(),
        "crop": [int(v) for v in heatmaps.crop],
        "source_shape": [int(v) for v in heatmaps.source_shape],
    }


def heatmaps_from_json(data: dict[str, Any]) -> Heatmaps:
    if data.get("labels", list(CHESTXRAY14)) != list(CHESTXRAY14):
        raise ValueError("heatmaps are not for the 14 labels in CHESTXRAY14 order")
    return Heatmaps(
        maps=np.asarray(data["maps"], dtype=np.float32),
        crop=tuple(int(v) for v in data["crop"]),
        source_shape=tuple(int(v) for v in data["source_shape"]),
    )


def finding_to_json(finding: Finding) -> dict[str, Any]:
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


def finding_from_json(data: dict[str, Any]) -> Finding:
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
