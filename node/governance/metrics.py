"""The statistics of local validation, on plain numpy arrays.

Conventions (they are what the reports and the registry records mean):

- `y` is 0/1, `s` the model's probability; "positive" means s >= threshold,
  exactly the verdict the node reports.
- AUROC is the Mann-Whitney statistic with mid-ranks (a tie between a
  positive and a negative counts one half), which is the area under the
  trapezoidal ROC curve.
- Its 95 % confidence interval is the percentile bootstrap over images
  (`resamples` draws with replacement, seeded). A resample that holds only
  one class has no AUROC and is drawn again, so every CI rests on exactly
  `resamples` values.
- Proportions (sensitivity, specificity, PPV, NPV) carry Wilson score
  intervals. A proportion whose denominator is zero is None, never 0.
- ECE uses `bins` equal-width probability bins: the count-weighted mean of
  |fraction positive - mean probability| over the non-empty bins.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.stats import rankdata

Z95 = 1.959963984540054  # the 97.5th percentile of the standard normal


def _arrays(y, s) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y, dtype=np.int8)
    s = np.asarray(s, dtype=np.float64)
    if y.shape != s.shape or y.ndim != 1:
        raise ValueError(f"labels {y.shape} and scores {s.shape} must be equal-length vectors")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 or 1")
    return y, s


def auroc(y, s) -> float | None:
    """Area under the ROC curve; None when only one class is present."""
    y, s = _arrays(y, s)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = rankdata(s)  # mid-ranks for ties
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _auroc_rows(y: np.ndarray, s: np.ndarray) -> np.ndarray:
    """AUROC of each row of the [B, n] resampled labels and scores (NaN for one class)."""
    ranks = rankdata(s, axis=1)
    n_pos = y.sum(axis=1).astype(np.float64)
    n_neg = y.shape[1] - n_pos
    with np.errstate(invalid="ignore", divide="ignore"):
        return ((ranks * y).sum(axis=1) - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def _resample_indices(y: np.ndarray, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """`resamples` index draws, each holding both classes."""
    n = len(y)
    out = np.empty((0, n), dtype=np.int64)
    while len(out) < resamples:
        draw = rng.integers(0, n, size=(resamples - len(out), n))
        picked = y[draw]
        both = (picked.min(axis=1) == 0) & (picked.max(axis=1) == 1)
        out = np.concatenate([out, draw[both]])
    return out


def bootstrap_auroc_ci(y, s, *, resamples: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float] | None:
    y, s = _arrays(y, s)
    if y.min() == y.max():
        return None
    idx = _resample_indices(y, resamples, np.random.default_rng(seed))
    values = _auroc_rows(y[idx], s[idx])
    lo, hi = np.percentile(values, [(1 - level) / 2 * 100, (1 + level) / 2 * 100])
    return float(lo), float(hi)


def paired_auroc_difference(y, s_new, s_old, *, resamples: int = 2000, seed: int = 0,
                            level: float = 0.95) -> dict | None:
    """AUROC(new) - AUROC(old) on the same images, with a paired percentile-bootstrap
    CI (each resample draws the same images for both models)."""
    y, s_new = _arrays(y, s_new)
    _, s_old = _arrays(y, s_old)
    if y.min() == y.max():
        return None
    idx = _resample_indices(y, resamples, np.random.default_rng(seed))
    deltas = _auroc_rows(y[idx], s_new[idx]) - _auroc_rows(y[idx], s_old[idx])
    lo, hi = np.percentile(deltas, [(1 - level) / 2 * 100, (1 + level) / 2 * 100])
    new, old = auroc(y, s_new), auroc(y, s_old)
    return {"candidate_auroc": new, "parent_auroc": old, "delta": new - old, "delta_ci": [float(lo), float(hi)]}


def wilson(successes: int, total: int, z: float = Z95) -> tuple[float, float] | None:
    if total == 0:
        return None
    p = successes / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class Confusion:
    tp: int
    fp: int
    tn: int
    fn: int

    @classmethod
    def at(cls, y, s, threshold: float) -> "Confusion":
        y, s = _arrays(y, s)
        positive = s >= threshold
        return cls(tp=int((positive & (y == 1)).sum()), fp=int((positive & (y == 0)).sum()),
                   tn=int((~positive & (y == 0)).sum()), fn=int((~positive & (y == 1)).sum()))

    @staticmethod
    def _ratio(a: int, b: int) -> float | None:
        return None if b == 0 else a / b

    @property
    def sensitivity(self) -> float | None:
        return self._ratio(self.tp, self.tp + self.fn)

    @property
    def specificity(self) -> float | None:
        return self._ratio(self.tn, self.tn + self.fp)

    @property
    def ppv(self) -> float | None:
        return self._ratio(self.tp, self.tp + self.fp)

    @property
    def npv(self) -> float | None:
        return self._ratio(self.tn, self.tn + self.fn)

    def summary(self) -> dict:
        return {
            "tp": self.tp, "fp": self.fp, "tn": self.tn, "fn": self.fn,
            "sensitivity": self.sensitivity, "sensitivity_ci": wilson(self.tp, self.tp + self.fn),
            "specificity": self.specificity, "specificity_ci": wilson(self.tn, self.tn + self.fp),
            "ppv": self.ppv, "ppv_ci": wilson(self.tp, self.tp + self.fp),
            "npv": self.npv, "npv_ci": wilson(self.tn, self.tn + self.fn),
        }


def reliability(y, s, bins: int = 10) -> tuple[float, list[dict]]:
    """(ECE, per-bin {lower, upper, count, mean_probability, fraction_positive})."""
    y, s = _arrays(y, s)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(s, edges[1:-1], right=False), 0, bins - 1)
    rows, ece = [], 0.0
    for b in range(bins):
        mask = which == b
        count = int(mask.sum())
        row = {"lower": float(edges[b]), "upper": float(edges[b + 1]), "count": count,
               "mean_probability": None, "fraction_positive": None}
        if count:
            row["mean_probability"] = float(s[mask].mean())
            row["fraction_positive"] = float(y[mask].mean())
            ece += count / len(y) * abs(row["fraction_positive"] - row["mean_probability"])
        rows.append(row)
    return float(ece), rows


def roc_curve(y, s) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rates, true positive rates) at every distinct score, from (0,0) to (1,1)."""
    y, s = _arrays(y, s)
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last_of_tie = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]
    tps = np.cumsum(y)[last_of_tie]
    fps = (last_of_tie + 1) - tps
    n_pos, n_neg = max(int(y.sum()), 1), max(len(y) - int(y.sum()), 1)
    return np.r_[0.0, fps / n_neg], np.r_[0.0, tps / n_pos]


def threshold_for_sensitivity(y, s, target: float) -> float:
    """The highest threshold whose sensitivity (s >= threshold) is at least `target`."""
    y, s = _arrays(y, s)
    positives = np.sort(s[y == 1])[::-1]
    if len(positives) == 0:
        raise ValueError("no positive images: sensitivity cannot be set")
    k = max(1, math.ceil(target * len(positives) - 1e-12))
    return float(positives[k - 1])


def threshold_for_specificity(y, s, target: float) -> float:
    """The lowest threshold whose specificity (s < threshold for negatives) is at least `target`."""
    y, s = _arrays(y, s)
    negatives = np.sort(s[y == 0])
    if len(negatives) == 0:
        raise ValueError("no negative images: specificity cannot be set")
    m = math.ceil(target * len(negatives) - 1e-12)
    if m == 0:
        return float(np.nextafter(0.0, 1.0))
    return float(np.nextafter(negatives[m - 1], np.inf))


def agreement(a, b) -> dict:
    """Two raters' binary verdicts on the same items: positive and negative
    agreement (Cicchetti & Feinstein) and Cohen's kappa. None where undefined."""
    a = np.asarray(a, dtype=bool)
    b = np.asarray(b, dtype=bool)
    both_pos = int((a & b).sum())
    both_neg = int((~a & ~b).sum())
    only_a = int((a & ~b).sum())
    only_b = int((~a & b).sum())
    n = len(a)
    observed = (both_pos + both_neg) / n if n else None
    expected = ((a.mean() * b.mean()) + ((1 - a.mean()) * (1 - b.mean()))) if n else None
    kappa = None  # undefined with no items, or when chance agreement is already 1 (both raters constant)
    if n and expected < 1.0:
        kappa = float((observed - expected) / (1.0 - expected))
    return {
        "n": n, "both_positive": both_pos, "both_negative": both_neg,
        "only_active_positive": only_a, "only_candidate_positive": only_b,
        "observed_agreement": observed,
        "positive_agreement": None if 2 * both_pos + only_a + only_b == 0 else 2 * both_pos / (2 * both_pos + only_a + only_b),
        "negative_agreement": None if 2 * both_neg + only_a + only_b == 0 else 2 * both_neg / (2 * both_neg + only_a + only_b),
        "kappa": kappa,
    }
