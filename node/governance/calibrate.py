"""`carina model calibrate`: operating points chosen for the hospital's targets.

For `--target-sensitivity LABEL=0.95` the new threshold is the highest one
whose sensitivity on the calibration set is at least 0.95 (the score of the
positive image that must still be caught); for `--target-specificity` it is
the lowest one whose specificity is at least the target. "Positive" stays
probability >= threshold, as everywhere in the node.

The result is a new registry version `NAME@VERSION+calN` with these
operating points (the others kept from the parent), recording for each
target the threshold, its 95 % bootstrap interval (the same rule applied to
resampled images), what it achieves with Wilson intervals, and the whole
evaluation at the new operating points. The parent is never touched, and the
new version is not activated: that stays a separate, audited step.
"""
from __future__ import annotations

import numpy as np

from inference.types import CHESTXRAY14
from node.governance import metrics
from node.governance.evaluate import evaluation_record, registry_copy
from node.governance.labels import LabelledSet
from node.governance.scoring import ScoredSet


class CalibrationError(ValueError):
    """A target cannot be met or parsed; the message says which."""


def parse_targets(items: list[str] | None, what: str) -> dict[str, float]:
    targets = {}
    by_key = {label.lower(): label for label in CHESTXRAY14}
    for item in items or []:
        name, sep, value = item.partition("=")
        label = by_key.get(name.strip().lower().replace(" ", "_"))
        if not sep or label is None:
            raise CalibrationError(f"--target-{what} expects LABEL=VALUE with a ChestX-ray14 label, got {item!r}")
        try:
            target = float(value)
        except ValueError:
            raise CalibrationError(f"--target-{what} {item!r}: {value!r} is not a number") from None
        if not 0.0 < target <= 1.0:
            raise CalibrationError(f"--target-{what} {item!r}: the target must be in (0, 1]")
        targets[label] = target
    return targets


def _choose(y: np.ndarray, s: np.ndarray, what: str, target: float) -> float:
    rule = metrics.threshold_for_sensitivity if what == "sensitivity" else metrics.threshold_for_specificity
    return rule(y, s, target)


def _threshold_ci(y, s, what, target, *, resamples: int, seed: int) -> list[float] | None:
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(resamples):
        idx = rng.integers(0, len(y), len(y))
        if y[idx].min() == y[idx].max():
            continue
        values.append(_choose(y[idx], s[idx], what, target))
    if not values:
        return None
    lo, hi = np.percentile(values, [2.5, 97.5])
    return [float(lo), float(hi)]


def calibrate(scored: ScoredSet, labelled: LabelledSet, images_dir, parent_thresholds: tuple[float, ...], *,
              sensitivity: dict[str, float], specificity: dict[str, float], resamples: int = 2000,
              seed: int = 0) -> tuple[list[float], dict]:
    """(the 18 new operating points, the calibration record)."""
    if not sensitivity and not specificity:
        raise CalibrationError("give at least one --target-sensitivity or --target-specificity")
    both = set(sensitivity) & set(specificity)
    if both:
        raise CalibrationError(f"{sorted(both)}: one target per pathology (sensitivity or specificity)")
    thresholds = list(parent_thresholds)
    targets = []
    for what, wanted in (("sensitivity", sensitivity), ("specificity", specificity)):
        for label, target in wanted.items():
            if label not in labelled.pathologies:
                raise CalibrationError(f"{label} is not in the labels: it cannot be calibrated")
            y, s = scored.column(label)
            if len(y) == 0 or y.min() == y.max():
                raise CalibrationError(f"{label}: the calibration set needs positive and negative images")
            threshold = _choose(y, s, what, target)
            if not 0.0 < threshold < 1.0:
                raise CalibrationError(f"{label}: {what} {target} needs threshold {threshold}, outside (0, 1)")
            i = CHESTXRAY14.index(label)
            achieved = metrics.Confusion.at(y, s, threshold).summary()
            targets.append({
                "label": label, "target": what, "value": target, "threshold": threshold,
                "previous_threshold": float(parent_thresholds[i]),
                "threshold_ci": _threshold_ci(y, s, what, target, resamples=resamples, seed=seed + i),
                "achieved": achieved, "n": int(len(y)), "positives": int(y.sum()),
            })
            thresholds[i] = threshold
    evaluation = evaluation_record(scored, labelled, images_dir, resamples=resamples, seed=seed,
                                   thresholds=np.asarray(thresholds[: len(CHESTXRAY14)]))
    record = {
        "method": "highest threshold meeting the target sensitivity / lowest meeting the target specificity "
                  "on the calibration set; threshold CI: percentile bootstrap of the same rule",
        "targets": targets,
        "dataset_sha256": scored.dataset_sha256,
        "evaluation": registry_copy(evaluation),
    }
    return thresholds, record
