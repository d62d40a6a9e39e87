"""The study-level facts every output builder needs, read once from the
source headers so builders never re-parse DICOM for demographics."""
from __future__ import annotations

from dataclasses import dataclass

from pydicom.dataset import Dataset


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    return "" if value is None else str(value).strip()


@dataclass(frozen=True)
class SourceImage:
    sop_instance_uid: str
    sop_class_uid: str
    series_uid: str
    series_number: int | None
    instance_number: int | None
    modality: str
    view_position: str
    series_description: str

    @classmethod
    def from_dataset(cls, ds: Dataset) -> "SourceImage":
        def _int(keyword: str) -> int | None:
            try:
                return int(ds.get(keyword)) if ds.get(keyword) not in (None, "") else None
            except (TypeError, ValueError):
                return None

        return cls(
            sop_instance_uid=_text(ds, "SOPInstanceUID"),
            sop_class_uid=_text(ds, "SOPClassUID"),
            series_uid=_text(ds, "SeriesInstanceUID"),
            series_number=_int("SeriesNumber"),
            instance_number=_int("InstanceNumber"),
            modality=_text(ds, "Modality"),
            view_position=_text(ds, "ViewPosition"),
            series_description=_text(ds, "SeriesDescription"),
        )


@dataclass(frozen=True)
class StudyFacts:
    study_uid: str
    patient_id: str
    patient_name: str  # DICOM PN form (Family^Given); PHI: never log it
    patient_birth_date: str  # YYYYMMDD or ""
    patient_sex: str  # M, F, O or ""
    accession_number: str
    study_date: str  # YYYYMMDD or ""
    study_time: str  # HHMMSS[.frac] or ""
    study_description: str
    images: tuple[SourceImage, ...]  # the images that were scored

    @classmethod
    def from_datasets(cls, datasets: list[Dataset]) -> "StudyFacts":
        if not datasets:
            raise ValueError("a study needs at least one source image")
        first = datasets[0]
        return cls(
            study_uid=_text(first, "StudyInstanceUID"),
            patient_id=_text(first, "PatientID"),
            patient_name=_text(first, "PatientName"),
            patient_birth_date=_text(first, "PatientBirthDate"),
            patient_sex=_text(first, "PatientSex"),
            accession_number=_text(first, "AccessionNumber"),
            study_date=_text(first, "StudyDate"),
            study_time=_text(first, "StudyTime"),
            study_description=_text(first, "StudyDescription"),
            images=tuple(SourceImage.from_dataset(ds) for ds in datasets),
        )


def _person_name(ds: Dataset) -> str:
    # Compare names the way a PN is written loosely: case, spaces and empty trailing components aside.
    return "^".join(part.strip() for part in _text(ds, "PatientName").upper().split("^")).rstrip("^")


def patient_disagreement(datasets: list[Dataset]) -> str:
    """Why these images cannot be one patient's study, or "" when they agree.

    They disagree when they carry two different PatientIDs, or two different
    PatientNames or PatientBirthDates. A blank value agrees with anything (some
    modalities leave them empty). The reason names what differs and how many
    values, never the values themselves (PHI)."""
    for keyword, values in (
        ("PatientID", {_text(ds, "PatientID") for ds in datasets}),
        ("PatientName", {_person_name(ds) for ds in datasets}),
        ("PatientBirthDate", {_text(ds, "PatientBirthDate") for ds in datasets}),
    ):
        values.discard("")
        if len(values) > 1:
            return f"images disagree on {keyword} ({len(values)} different values); not scored as one patient"
    return ""
