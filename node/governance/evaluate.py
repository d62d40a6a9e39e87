"""`carina eval`: a model's performance on the hospital's own labelled images.

Per pathology: prevalence, AUROC with its 95 % bootstrap CI, the confusion
counts at the model's operating point with sensitivity, specificity, PPV and
NPV (Wilson CIs), and calibration (ECE and the reliability table). A
pathology the labels do not cover is reported `evaluated: false` with the
reason, never as zero; one whose labelled images are all of one class gets
its counts but no AUROC.

The record (`carina.evaluation/1`) is written as JSON beside a self-contained
HTML report, and a copy without per-image data goes into the model registry
(dataset hash, date, user) under the evaluated version.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from inference.serialize import model_to_json
from inference.types import CHESTXRAY14
from node.governance import metrics
from node.governance.labels import LabelledSet
from node.governance.scoring import ScoredSet
from node.models import current_user, utc_now_iso

SCHEMA = "carina.evaluation/1"
DEFAULT_RESAMPLES = 2000


def pathology_metrics(y: np.ndarray, s: np.ndarray, threshold: float, *, resamples: int, seed: int) -> dict:
    n, positives = len(y), int(y.sum())
    row = {
        "evaluated": True, "n": n, "positives": positives, "prevalence": positives / n if n else None,
        "threshold": float(threshold), "auroc": metrics.auroc(y, s), "auroc_ci": None,
    }
    if row["auroc"] is None:
        row["auroc_note"] = "only one class among the labelled images: AUROC undefined"
    else:
        row["auroc_ci"] = list(metrics.bootstrap_auroc_ci(y, s, resamples=resamples, seed=seed))
    row.update(metrics.Confusion.at(y, s, threshold).summary())
    row["ece"], row["reliability"] = metrics.reliability(y, s)
    return row


def evaluation_record(scored: ScoredSet, labelled: LabelledSet, images_dir: Path, *, resamples: int = DEFAULT_RESAMPLES,
                      seed: int = 0, thresholds: np.ndarray | None = None, backend: str | None = None) -> dict:
    thresholds = scored.thresholds if thresholds is None else thresholds
    pathologies = {}
    for i, label in enumerate(CHESTXRAY14):
        y, s = scored.column(label)
        if label not in labelled.pathologies or len(y) == 0:
            pathologies[label] = {"evaluated": False, "reason": "not in the labels" if label not in labelled.pathologies
                                  else "no labelled image was scored"}
            continue
        pathologies[label] = pathology_metrics(y, s, float(thresholds[i]), resamples=resamples, seed=seed + i)
    return {
        "schema": SCHEMA,
        "model": scored.model.ref,
        "model_info": model_to_json(scored.model),
        "backend": backend,
        "date": utc_now_iso(),
        "user": current_user(),
        "dataset": {
            "labels_file": str(labelled.path),
            "labels_format": labelled.format,
            "labels_sha256": labelled.sha256,
            "images_dir": str(images_dir),
            "dataset_sha256": scored.dataset_sha256,
            "images_listed": len(labelled.images),
            "images_scored": len(scored.names),
            "images_missing": len(scored.missing),
            "images_unreadable": [{"image": n, "reason": r} for n, r in scored.unreadable],
            "ignored_columns": list(labelled.ignored_columns),
        },
        "dataset_sha256": scored.dataset_sha256,
        "bootstrap": {"resamples": resamples, "seed": seed, "level": 0.95, "method": "percentile, images resampled"},
        "calibration_bins": 10,
        "not_evaluated": [label for label, row in pathologies.items() if not row["evaluated"]],
        "pathologies": pathologies,
    }


def write_outputs(record: dict, scored: ScoredSet, out_dir: Path) -> dict[str, Path]:
    """evaluation.json, report.html (plots embedded) and scores.csv (per image) in `out_dir`."""
    from node.governance.report import render_html

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "evaluation.json", "html": out_dir / "report.html", "scores": out_dir / "scores.csv"}
    paths["json"].write_text(json.dumps(record, indent=2) + "\n")
    paths["html"].write_text(render_html(record, scored))
    lines = ["image," + ",".join(f"p_{label}" for label in CHESTXRAY14)]
    for name, row in zip(scored.names, scored.probabilities):
        lines.append(_csv_cell(name) + "," + ",".join(repr(float(p)) for p in row))
    paths["scores"].write_text("\n".join(lines) + "\n")
    return paths


def _csv_cell(text: str) -> str:
    return '"' + text.replace('"', '""') + '"' if any(c in text for c in ',"\n') else text


def registry_copy(record: dict, outputs: dict[str, Path] | None = None) -> dict:
    """What the registry keeps: the record without the per-bin tables, plus where the report is."""
    kept = json.loads(json.dumps(record))
    for row in kept["pathologies"].values():
        row.pop("reliability", None)
    if outputs:
        kept["outputs"] = {k: str(v) for k, v in outputs.items()}
    return kept
