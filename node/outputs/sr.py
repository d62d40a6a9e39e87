"""The study's AI findings as a DICOM Comprehensive 3D SR, TID 1500 Measurement Report.

One SR per study. For every scored image and every ChestX-ray14 label there is
one measurement group carrying:

- Tracking Identifier + Tracking Unique Identifier (deterministic),
- TID 4019 Algorithm Identification (model name and version),
- Finding (DCM 121071) = the label's concept from fhir/terminology.json,
- a qualitative evaluation whose concept name is that same finding concept and
  whose value is Present/Absent (SCT, from the terminology),
- NUM Probability (DCM 122157), the model's sigmoid output, unit UCUM "1",
- NUM Threshold Value (DCM 122411), the operating point the verdict used,
  also UCUM "1", so a reader can see how close to the cut-off the case is.

Positive findings with a hot region are TID 1410 planar ROI groups with an
Image Region SCOORD POLYLINE (that is what OHIF draws); every other group is a
TID 1501 group naming its source image.

Why the root concept is not LOINC 18748-4 by default: OHIF opens a TID 1500 SR
only when the root concept is (126000, DCM, "Imaging Measurement Report") and
otherwise shows "not supported" and nothing else. Both are in CID 7021, so
`title=` accepts the terminology's LOINC title for viewers that prefer it.
"""
from __future__ import annotations

import copy
from typing import Mapping

import numpy as np
from highdicom.sr import (
    AlgorithmIdentification,
    CodedConcept,
    CodeContentItem,
    Comprehensive3DSR,
    ContainerContentItem,
    DeviceObserverIdentifyingAttributes,
    GraphicTypeValues,
    ImageContentItem,
    ImageRegion,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    NumContentItem,
    ObservationContext,
    ObserverContext,
    PlanarROIMeasurementsAndQualitativeEvaluations,
    QualitativeEvaluation,
    RelationshipTypeValues,
    SourceImageForMeasurementGroup,
    SourceImageForRegion,
    TextContentItem,
    TrackingIdentifier,
    UIDRefContentItem,
)
from highdicom._standard_utils import get_module_attribute_map
from pydicom import config as pydicom_config
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.valuerep import DA, TM, validate_value

from inference.types import Finding, ModelInfo, Region
from node.outputs import uids
from node.outputs.equipment import (
    DEVICE_NAME,
    MANUFACTURER,
    contributing_equipment,
    device_uid,
    series_description,
)
from node.scored_study import ScoredStudy
from node.terminology import Terminology, load_terminology, procedure_coding

SR_SERIES_NUMBER = 9901
SR_SERIES_BASE = "Carina AI findings"
# OHIF-compatible TID 1500 root (see module docstring).
IMAGING_MEASUREMENT_REPORT = codes.DCM.ImagingMeasurementReport
# TID 1500 row 12 container for report-level text; dcmtk's TID 1500 uses the same code.
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")
UNITLESS = codes.UCUM.NoUnits  # probabilities and thresholds are fractions 0..1

_PIXEL_TAGS = (0x7FE00008, 0x7FE00009, 0x7FE00010)


def build_sr(
    study: ScoredStudy,
    headers: Mapping[str, Dataset],
    predecessors: list[Dataset] | None = None,
    *,
    manufacturer: str = MANUFACTURER,
    series_number: int = SR_SERIES_NUMBER,
    title: Code | None = None,
) -> Comprehensive3DSR:
    """TID 1500 SR over all scored images of one study version.

    `headers` are the scored images' source headers by SOP Instance UID
    (pixels are not needed); `predecessors` the SRs this one supersedes
    (PS3.3 C.17.2.1 Predecessor Documents Sequence). Content and Instance
    Creation date/time are the study's issue time, and everything else
    depends only on the inputs, so a re-run produces identical bytes.
    """
    created = study.created_local
    model = study.model
    terms = load_terminology()
    headers = [source_header(headers[image.sop_instance_uid]) for image in study.images]
    study_uids = {str(h.StudyInstanceUID) for h in headers}
    if study_uids != {study.study_uid}:
        raise ValueError(f"source headers name studies {sorted(study_uids)}, not {study.study_uid}")
    study_uid = study.study_uid
    source_uids = [str(ds.SOPInstanceUID) for ds in headers]

    algorithm = algorithm_identification(model)
    groups = [
        _finding_group(header, finding, model, algorithm, terms)
        for header, image in zip(headers, study.images)
        for finding in image.findings
    ]
    report = MeasurementReport(
        observation_context=_observation_context(model, manufacturer),
        procedure_reported=procedure_coding(
            terms, [str(h.get("ViewPosition", "") or h.SOPInstanceUID) for h in headers]
        ).dicom(),
        imaging_measurements=groups,
        title=title or IMAGING_MEASUREMENT_REPORT,
    )
    root_items = report[0].ContentSequence
    # highdicom's own library splits images into one group per modality, but
    # OHIF reads only the first group; ours keeps them together (and does
    # not crash on CR/DX headers without orientation or imager spacing).
    root_items.insert(len(root_items) - 1, _image_library(headers))
    root_items.append(_report_comments(model))

    sr = Comprehensive3DSR(
        evidence=headers,
        content=report,
        series_instance_uid=uids.series_uid(study_uid, model.ref, "sr"),
        series_number=series_number,
        sop_instance_uid=uids.sr_instance_uid(source_uids, model.ref, study.version),
        instance_number=study.version,  # later runs sort after earlier ones
        manufacturer=manufacturer,
        is_complete=True,  # every scored image has all 14 findings
        is_final=False,  # PreliminaryFlag PRELIMINARY: awaiting a radiologist
        is_verified=False,  # VerificationFlag UNVERIFIED (IHE AIR)
        previous_versions=predecessors or None,
        series_description=series_description(SR_SERIES_BASE, model, " (TID 1500)"),
        manufacturer_model_name=model.name[:64],
        software_versions=model.version[:64],
        content_date=DA(created.date()),
        content_time=TM(created.time()),
        specific_character_set="ISO_IR 192",  # the caveat's em dash is not Latin-1
    )
    sr.InstanceCreationDate = DA(created.date())
    sr.InstanceCreationTime = TM(created.time())
    sr.ContributingEquipmentSequence = contributing_equipment(
        headers, model, manufacturer=manufacturer, contributed_at=created
    )
    _drop_invalid_optional_patient_study(sr)
    return sr


def algorithm_identification(model: ModelInfo) -> AlgorithmIdentification:
    """TID 4019 for the model; an ensemble names every member as an Algorithm
    Parameter (111002) "member: NAME@VERSION", so the SR says which networks voted.
    A single model has no parameters (its SR is unchanged)."""
    parameters = [f"member: {member.ref}"[:64] for member in model.members] or None
    return AlgorithmIdentification(name=model.name, version=model.version, parameters=parameters)


def scoord_polyline(region: Region, rows: int, columns: int) -> np.ndarray:
    """Closed SCOORD POLYLINE (column, row) for `region` in DICOM image coordinates.

    PS3.3 C.18.6.1.1: (0.0, 0.0) is the top-left *corner* of the top-left
    pixel and pixel centres lie at half-integers. `Region.polygon` is in array
    index space (pixel centre at integers, as skimage contours produce), so
    each vertex moves by +0.5. Clipped to [0, columns] x [0, rows].
    A degenerate outline falls back to the bounding box, whose
    inclusive-exclusive integer edges are already pixel-corner positions.
    """
    points = np.asarray(region.polygon, dtype=np.float64).reshape(-1, 2) + 0.5
    if len(np.unique(np.round(points, 3), axis=0)) < 3:
        x1, y1, x2, y2 = region.bbox
        points = np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2]], dtype=np.float64)
    points[:, 0] = np.clip(points[:, 0], 0.0, float(columns))
    points[:, 1] = np.clip(points[:, 1], 0.0, float(rows))
    if not np.array_equal(points[0], points[-1]):
        points = np.vstack([points, points[:1]])
    return points.astype(np.float32)


def tracking_uid(source_sop_uid: str, model_ref: str, label: str) -> str:
    """Same image, model and label -> same UID, so a re-run tracks the same finding."""
    return uids.derived_uid("sr-tracking", source_sop_uid, model_ref, label)


# Type 2 patient/study attributes highdicom reads from the source without a
# default; a header lacking one (common on older CR) would crash the build.
_TYPE2_PATIENT_STUDY = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
    "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber",
)
_SEX_WORDS = {"MALE": "M", "FEMALE": "F", "OTHER": "O"}


def source_header(ds: Dataset) -> Dataset:
    """A deep copy of the source header, without pixels, fit to build outputs from.

    Nothing here can touch the caller's dataset. Type 2 patient/study values
    that are missing or malformed become empty ("unknown"), which is valid,
    instead of making the SR or SC unbuildable. The SC builder uses it too.
    """
    header = Dataset()
    for element in ds:
        if element.tag not in _PIXEL_TAGS:
            header.add(copy.deepcopy(element))
    sex = str(header.get("PatientSex") or "").strip().upper()
    header.PatientSex = sex if sex in ("M", "F", "O") else _SEX_WORDS.get(sex, "")
    for keyword in _TYPE2_PATIENT_STUDY:
        value = header.get(keyword)
        if value is None or not _valid(header[keyword].VR, value):
            setattr(header, keyword, "")
    return header


def _valid(vr: str, value) -> bool:
    try:
        validate_value(vr, value, pydicom_config.RAISE)
        if vr == "DA" and value:
            DA(value)  # the pattern alone accepts "00000000"
        if vr == "TM" and value:
            TM(value)
    except ValueError:
        return False
    return True


def _observation_context(model: ModelInfo, manufacturer: str) -> ObservationContext:
    device = DeviceObserverIdentifyingAttributes(
        uid=device_uid(model),
        name=DEVICE_NAME,
        manufacturer_name=manufacturer,
        model_name=model.name,
    )
    return ObservationContext(observer_device_context=ObserverContext(codes.DCM.Device, device))


def _finding_group(
    header: Dataset,
    finding: Finding,
    model: ModelInfo,
    algorithm: AlgorithmIdentification,
    terms: Terminology,
) -> PlanarROIMeasurementsAndQualitativeEvaluations | MeasurementsAndQualitativeEvaluations:
    codes_ = terms.finding(finding.label)
    concept = codes_.dicom.dicom()
    sop_uid = str(header.SOPInstanceUID)
    common = dict(
        tracking_identifier=TrackingIdentifier(
            uid=tracking_uid(sop_uid, model.ref, finding.label),
            identifier=f"{codes_.display} (SOP ...{sop_uid[-12:]})",
        ),
        finding_type=concept,
        algorithm_id=algorithm,
        qualitative_evaluations=[
            QualitativeEvaluation(concept, terms.sr["present" if finding.positive else "absent"].dicom())
        ],
        # Each NUM carries the algorithm too: besides being valid TID 300,
        # it gives the NUM a ContentSequence, without which several OHIF
        # releases crash on non-geometric groups.
        measurements=[
            Measurement(codes.DCM.Probability, _fraction(finding.probability), UNITLESS, algorithm_id=algorithm),
            Measurement(codes.DCM.ThresholdValue, _fraction(finding.threshold), UNITLESS, algorithm_id=algorithm),
        ],
    )
    if finding.positive and finding.regions:
        # TID 1410 holds one region; the largest one stands for the finding
        # (the SC heatmap outlines all of them).
        region = max(finding.regions, key=lambda r: r.area_px)
        group = PlanarROIMeasurementsAndQualitativeEvaluations(
            referenced_region=ImageRegion(
                graphic_type=GraphicTypeValues.POLYLINE,
                graphic_data=scoord_polyline(region, int(header.Rows), int(header.Columns)),
                source_image=SourceImageForRegion.from_source_image(header),
            ),
            **common,
        )
    else:
        group = MeasurementsAndQualitativeEvaluations(
            source_images=[SourceImageForMeasurementGroup.from_source_image(header)],
            **common,
        )
    if model.caveat:
        group[0].ContentSequence.append(_comment(model.caveat))
    return group


def _fraction(value: float) -> float:
    """A model float32 has ~7 significant digits; six decimals keep all of
    them and spare readers a Numeric Value like "0.12000000000000"."""
    return round(float(value), 6)


def _comment(text: str) -> TextContentItem:
    return TextContentItem(name=codes.DCM.Comment, value=text, relationship_type=RelationshipTypeValues.CONTAINS)


def _report_comments(model: ModelInfo) -> ContainerContentItem:
    """TID 1500 row 12: report-level text a reader sees whatever the viewer."""
    container = ContainerContentItem(
        name=QUALITATIVE_EVALUATIONS, relationship_type=RelationshipTypeValues.CONTAINS
    )
    notes = []
    if model.caveat:
        notes.append(_comment(f"{model.caveat}. These results come from demonstration weights."))
    notes.append(
        _comment(
            f"AI-generated by Carina (model {model.name}, version {model.version}); "
            "not reviewed by a radiologist. Probabilities are model outputs, not calibrated risks."
        )
    )
    if model.members:
        notes.append(_comment(
            "Ensemble: probabilities are the mean of its members' and heatmaps the mean of their "
            "activation maps; members: " + ", ".join(member.ref for member in model.members) + "."
        ))
    container.ContentSequence = notes
    return container


def _image_library(headers: list[Dataset]) -> ContainerContentItem:
    """TID 1600 Image Library, one group holding every source image."""
    entries = []
    for header in headers:
        entry = ImageContentItem(
            name=CodedConcept("260753009", "SCT", "Source"),
            referenced_sop_class_uid=header.SOPClassUID,
            referenced_sop_instance_uid=header.SOPInstanceUID,
            relationship_type=RelationshipTypeValues.CONTAINS,
        )
        entry.ContentSequence = _library_descriptors(header)
        entries.append(entry)
    group = ContainerContentItem(name=codes.DCM.ImageLibraryGroup, relationship_type=RelationshipTypeValues.CONTAINS)
    group.ContentSequence = entries
    library = ContainerContentItem(name=codes.DCM.ImageLibrary, relationship_type=RelationshipTypeValues.CONTAINS)
    library.ContentSequence = [group]
    return library


def _library_descriptors(header: Dataset) -> list:
    """TID 1602/1603 descriptors the header actually supports.

    Every TID 1603 row is user-optional, so an orientation or spacing the
    header lacks is left out rather than invented (highdicom's version reads
    PatientOrientation and ImagerPixelSpacing unconditionally and crashes).
    Projection spacing: ImagerPixelSpacing, else PixelSpacing.
    """
    acq = RelationshipTypeValues.HAS_ACQ_CONTEXT
    pixels = CodedConcept("{pixels}", "UCUM", "Pixels")
    items: list = []
    modality = _modality_code(str(header.get("Modality", "")))
    if modality is not None:
        items.append(CodeContentItem(name=codes.DCM.Modality, value=modality, relationship_type=acq))
    if "FrameOfReferenceUID" in header:
        items.append(UIDRefContentItem(codes.DCM.FrameOfReferenceUID, header.FrameOfReferenceUID, acq))
    items.append(NumContentItem(codes.DCM.PixelDataRows, int(header.Rows), pixels, relationship_type=acq))
    items.append(NumContentItem(codes.DCM.PixelDataColumns, int(header.Columns), pixels, relationship_type=acq))
    orientation = [str(v) for v in (header.get("PatientOrientation") or []) if str(v)]
    if len(orientation) == 2:
        items.append(TextContentItem(codes.DCM.PatientOrientationRow, orientation[0], acq))
        items.append(TextContentItem(codes.DCM.PatientOrientationColumn, orientation[1], acq))
    spacing = header.get("ImagerPixelSpacing") or header.get("PixelSpacing")
    if spacing is not None and len(spacing) == 2:
        mm = codes.UCUM.Millimeter
        items.append(NumContentItem(codes.DCM.HorizontalPixelSpacing, float(spacing[1]), mm, relationship_type=acq))
        items.append(NumContentItem(codes.DCM.VerticalPixelSpacing, float(spacing[0]), mm, relationship_type=acq))
    return items


def _modality_code(modality: str) -> Code | None:
    """CID 29 concept for a Modality value (the header's, not its SOP class:
    a CR saved as Secondary Capture is still a CR)."""
    for name in codes.cid29.dir():
        code = getattr(codes.cid29, name)
        if code.value == modality:
            return code
    return None


def _drop_invalid_optional_patient_study(sr: Dataset) -> None:
    """Remove Type 3 patient/study attributes whose copied value is invalid.

    highdicom copies the whole Patient and Patient Study modules from the
    first source. Modalities do send malformed optional values (e.g. Patient's
    Age "62" instead of "062Y"); passing one on would make our SR fail
    validation for data we did not produce. Type 1/2 values are left alone.
    """
    module_map = get_module_attribute_map()
    for module in ("patient", "patient-study", "general-study", "clinical-trial-subject", "clinical-trial-study"):
        for attribute in module_map.get(module, []):
            keyword = attribute["keyword"]
            if attribute["path"] or attribute["type"] != "3" or keyword not in sr:
                continue
            element = sr[keyword]
            if element.VR == "SQ" or element.value is None:
                continue
            values = element.value if element.VM > 1 else [element.value]
            try:
                for value in values:
                    validate_value(element.VR, value, pydicom_config.RAISE)
            except ValueError:
                del sr[keyword]
