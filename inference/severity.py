"""Severity grades from probability bands.

A grade says how strongly the model asserts a finding, not how severe the
disease is. Bands are read on the probability normalised at the label's
operating point (torchxrayvision's `op_norm`): the operating point maps to 0.5,
so one set of bands means the same thing for every label, and a grade at or
above 0.5 is exactly a positive finding. With demo weights (every operating
point 0.5) the normalised probability is the probability itself.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

# (lower bound on the normalised probability, grade), ascending from 0.
DEFAULT_BANDS: tuple[tuple[float, str], ...] = ((0.0, "none"), (0.5, "low"), (0.7, "moderate"), (0.85, "high"))


def normalise_at_operating_point(probability: float, threshold: float) -> float:
    """xrv's `op_norm`: piecewise linear, 0 -> 0, threshold -> 0.5, 1 -> 1."""
    if probability < threshold:
        return probability / (threshold * 2.0)
    return 1.0 - (1.0 - probability) / ((1.0 - threshold) * 2.0)


@dataclass(frozen=True)
class SeverityBands:
    bounds: tuple[float, ...]
    grades: tuple[str, ...]

    @classmethod
    def from_pairs(cls, pairs: Iterable[tuple[float, str]] = DEFAULT_BANDS) -> "SeverityBands":
        pairs = [(float(lo), str(grade)) for lo, grade in pairs]
        check_bands(pairs)
        return cls(tuple(lo for lo, _ in pairs), tuple(grade for _, grade in pairs))

    def grade(self, probability: float, threshold: float) -> str:
        value = normalise_at_operating_point(probability, threshold)
        grade = self.grades[0]
        for lo, name in zip(self.bounds, self.grades):
            if value >= lo:
                grade = name
        return grade


def check_bands(pairs: list[tuple[float, str]]) -> None:
    """ValueError unless: non-empty, first bound 0, strictly ascending, all < 1, grades distinct."""
    if not pairs:
        raise ValueError("severity bands must not be empty")
    bounds = [lo for lo, _ in pairs]
    grades = [grade for _, grade in pairs]
    if bounds[0] != 0.0:
        raise ValueError(f"the first severity band must start at 0.0, not {bounds[0]}")
    if any(b >= a for a, b in zip(bounds[1:], bounds[:-1])) or bounds[-1] >= 1.0:
        raise ValueError(f"severity band bounds must ascend strictly within [0, 1): {bounds}")
    if any(not g.strip() for g in grades) or len(set(grades)) != len(grades):
        raise ValueError(f"severity grades must be distinct and non-empty: {grades}")
