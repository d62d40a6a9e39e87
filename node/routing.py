"""Routing rules: which received images the model may score.

The model was trained on adult frontal chest radiographs; scoring anything
else produces confident nonsense, so each excluded image records the exact
rule that excluded it."""
from __future__ import annotations

import re
from datetime import date

from pydicom.dataset import Dataset

from dicom_scp.contexts import CHEST_CAPABLE_SOP_CLASSES, SECONDARY_CAPTURE
from node.config import RoutingSettings

# Also what the receiver records for non-chest SOP classes at C-STORE time.
NOT_CHEST = "ignored: not a chest radiograph"

LATERAL_VIEWS = {"LL", "RL", "LLD", "RLD", "LAT", "LATERAL"}


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    return str(value).strip().upper() if value not in (None, "") else ""


def age_in_years(ds: Dataset) -> float | None:
    """PatientAge (AS, e.g. "062Y", "018M"), else StudyDate - PatientBirthDate."""
    age = _text(ds, "PatientAge")
    match = re.fullmatch(r"(\d{1,3})([DWMY]?)", age)
    if match:
        n, unit = int(match.group(1)), match.group(2) or "Y"  # bare "62" seen in the wild
        return n / {"D": 365.25, "W": 52.18, "M": 12.0, "Y": 1.0}[unit]
    born, studied = _text(ds, "PatientBirthDate"), _text(ds, "StudyDate")
    try:
        b = date(int(born[:4]), int(born[4:6]), int(born[6:8]))
        s = date(int(studied[:4]), int(studied[4:6]), int(studied[6:8]))
    except (ValueError, IndexError):
        return None
    return (s - b).days / 365.25


def exclusion(ds: Dataset, rules: RoutingSettings) -> str | None:
    """None when the image should be scored, else the rule that excludes it."""
    sop_class = str(ds.get("SOPClassUID", ""))
    if sop_class not in CHEST_CAPABLE_SOP_CLASSES:
        return NOT_CHEST
    body_part, modality, view = _text(ds, "BodyPartExamined"), _text(ds, "Modality"), _text(ds, "ViewPosition")
    if sop_class == SECONDARY_CAPTURE:
        # An SC's body part is judged by sc_body_parts alone (its Modality is
        # usually OT), so that list can name parts body_parts does not.
        if body_part not in rules.sc_body_parts:
            return f"ignored: rule sc_body_parts (Secondary Capture with BodyPartExamined {body_part or 'missing'})"
    else:
        if modality not in rules.modalities:
            return f"ignored: rule modalities (Modality {modality or 'missing'} not in {rules.modalities})"
        if body_part:
            if body_part not in rules.body_parts:
                return f"ignored: rule body_parts (BodyPartExamined {body_part} not in {rules.body_parts})"
        elif not rules.missing_body_part_eligible:
            return "ignored: rule missing_body_part_eligible (BodyPartExamined missing)"
    if view in LATERAL_VIEWS:
        if not rules.score_laterals:
            return f"ignored: rule score_laterals (ViewPosition {view})"
    elif view:
        if view not in rules.view_positions:
            return f"ignored: rule view_positions (ViewPosition {view} not in {rules.view_positions})"
    elif not rules.missing_view_position_eligible:
        return "ignored: rule missing_view_position_eligible (ViewPosition missing)"
    if rules.min_age_years is not None:
        age = age_in_years(ds)
        if age is None:
            if not rules.missing_age_eligible:
                return "ignored: rule missing_age_eligible (patient age unknown)"
        elif age < rules.min_age_years:
            return f"ignored: rule min_age_years (patient age {age:.1f} < {rules.min_age_years})"
    return None
