"""The study's AI findings as a DICOM Comprehensive 3D SR, TID 1500 Measurement Report.

One SR per study. Every scored image's 14 ChestX-ray14 findings are in it,
each with a deterministic Tracking Unique Identifier, its concept from
fhir/terminology.json, Present/Absent (SCT, from the terminology), the
model's Probability (DCM 122157) and the Threshold Value (DCM 122411) the
verdict used, both UCUM "1", and the algorithm (TID 4019). Where a finding
sits depends on whether it has an image region, because OHIF 3.13 and
Cornerstone3D read the two places differently (checked by running their code,
tests/js/ohif_sr_check.mjs):

- A positive finding with a hot region is a TID 1501 Measurement Group under
  Imaging Measurements: Finding, algorithm, then NUM Area (SCT 42798000) of
  the region INFERRED FROM its SCOORD POLYLINE (SELECTED FROM the source
  image), NUM Probability and Threshold Value, the Present evaluation, and a
  Comment naming the finding. OHIF turns every group into a measurement and
  its load() throws on a group without coordinates; a group with a SCOORD at
  its top level is labelled only from its NUMs; one whose SCOORD hangs under
  a NUM is labelled with its Comments first. Cornerstone3D's
  MeasurementReport.generateToolState takes the SCOORD from the group's
  first NUM (hence Area first: the value it reads as the contour's area) and
  picks its tool adapter by the Tracking Identifier, so that starts with
  Cornerstone's PlanarFreehandROI identifier; the label is the first Comment.
- Every other finding (all negatives, and positives without a region) is a
  TID 1500 row 13 qualitative evaluation in the report's Qualitative
  Evaluations container: CODE finding = Present/Absent, with its tracking
  identifiers, algorithm, Probability and Threshold Value and the source
  image as children. Neither viewer reads that container, so neither breaks.
  With no region at all, Imaging Measurements stays as an empty container
  (dcmtk's TID 1500 writer does the same), which both readers accept.

Each source image's Image Library entry names the GSPS that outlines its
findings, when one was written (`presentation_states`), and the evidence
lists it. Text in the content tree is ASCII (the demo caveat with a hyphen),
because dcmjs, which OHIF reads files with, decodes nested text as Latin-1;
Specific Character Set is declared only when a value needs it (e.g. a
patient name), see node/outputs/text.py.

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
    ContentSequence,
    CoordinatesForMeasurement,
    DeviceObserverIdentifyingAttributes,
    GraphicTypeValues,
    ImageContentItem,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    NumContentItem,
    ObservationContext,
    ObserverContext,
    QualitativeEvaluation,
    RelationshipTypeValues,
    SourceImageForMeasurement,
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

from inference.types import Finding, ModelInfo
from node.outputs import uids
from node.outputs.equipment import (
    DEVICE_NAME,
    MANUFACTURER,
    contributing_equipment,
    device_uid,
    series_description,
)
from node.outputs.regions import drawable, largest, outline
from node.outputs.text import UTF8, declare_character_set, plain_caveat
from node.scored_study import ScoredStudy
from node.terminology import Terminology, load_terminology, procedure_coding

SR_SERIES_NUMBER = 9901
SR_SERIES_BASE = "Carina AI findings"
# OHIF-compatible TID 1500 root (see module docstring).
IMAGING_MEASUREMENT_REPORT = codes.DCM.ImagingMeasurementReport
# TID 1500 row 12 container for report-level text; dcmtk's TID 1500 uses the same code.
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")
UNITLESS = codes.UCUM.NoUnits  # probabilities and thresholds are fractions 0..1
PIXELS = CodedConcept("{pixels}", "UCUM", "Pixels")
# Cornerstone3D's SR adapters pick the tool that hydrates a measurement group
# by its Tracking Identifier (a prefix match); this one reads a closed
# POLYLINE as a freehand contour. The finding follows it for people.
CORNERSTONE_FREEHAND_ROI = "Cornerstone3DTools@^0.1.0:PlanarFreehandROI"

_PIXEL_TAGS = (0x7FE00008, 0x7FE00009, 0x7FE00010)


def build_sr(
    study: ScoredStudy,
    headers: Mapping[str, Dataset],
    predecessors: list[Dataset] | None = None,
    *,
    manufacturer: str = MANUFACTURER,
    series_number: int = SR_SERIES_NUMBER,
    title: Code | None = None,
    presentation_states: Mapping[str, Dataset] | None = None,
) -> Comprehensive3DSR:
    """TID 1500 SR over all scored images of one study version.

    `headers` are the scored images' source headers by SOP Instance UID
    (pixels are not needed); `predecessors` the SRs this one supersedes
    (PS3.3 C.17.2.1 Predecessor Documents Sequence); `presentation_states`
    the GSPS written for a source image, by its SOP Instance UID: its Image
    Library entry references it (the Image Reference Macro's Referenced SOP
    Sequence, PS3.3 C.18.4) and the evidence lists it. Content and Instance
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
    findings = [(header, finding) for header, image in zip(headers, study.images) for finding in image.findings]
    report = _measurement_report(
        observation_context=_observation_context(model, manufacturer),
        procedure_reported=procedure_coding(
            terms, [str(h.get("ViewPosition", "") or h.SOPInstanceUID) for h in headers]
        ).dicom(),
        imaging_measurements=[
            _region_group(header, finding, model, algorithm, terms)
            for header, finding in findings
            if drawable(finding)
        ],
        title=title or IMAGING_MEASUREMENT_REPORT,
    )
    root_items = report[0].ContentSequence
    # highdicom's own library splits images into one group per modality, but
    # OHIF reads only the first group; ours keeps them together (and does
    # not crash on CR/DX headers without orientation or imager spacing).
    states = dict(presentation_states or {})
    root_items.insert(len(root_items) - 1, _image_library(headers, states))
    evaluations = [
        _evaluation(header, finding, model, algorithm, terms) for header, finding in findings if not drawable(finding)
    ]
    root_items.append(_qualitative_evaluations(model, evaluations))

    sr = _sr_document(
        report[0],
        # The sources first: highdicom takes the patient and study from evidence[0].
        evidence=[*headers, *(states[uid] for uid in source_uids if uid in states)],
        series_instance_uid=uids.series_uid(study_uid, model.ref, "sr"),
        series_number=series_number,
        sop_instance_uid=uids.sr_instance_uid(source_uids, model.ref, study.version, *study.output_uid_qualifiers()),
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
        specific_character_set=UTF8,  # narrowed to what the values need below
    )
    sr.InstanceCreationDate = DA(created.date())
    sr.InstanceCreationTime = TM(created.time())
    sr.ContributingEquipmentSequence = contributing_equipment(
        headers, model, manufacturer=manufacturer, contributed_at=created
    )
    drop_invalid_optional_patient_study(sr)
    declare_character_set(sr)
    return sr


def _sr_document(root: ContainerContentItem, *, evidence: list[Dataset], **attributes) -> Comprehensive3DSR:
    """highdicom's Comprehensive3DSR (PS3.3 A.35.13) around `root`, the content
    tree as built, without the three passes its constructor makes over that
    tree: a deep copy, a re-parse of the copy into highdicom items, and a
    search of the copy for referenced instances. For a four-finding report
    they were about 70% of building it and the largest CPU cost of the
    encode stage in bench/e2e.py's burst. The constructor is given the root
    container without its children, which are attached as built afterwards;
    the written bytes are the same (tests/test_golden_outputs.py). The one
    check the search made, that every instance the content references is in
    the evidence (so that it is listed in the Current Requested Procedure
    Evidence Sequence, PS3.3 C.17.2.3), is kept here."""
    missing = _referenced_instances(root.ContentSequence) - {str(ds.SOPInstanceUID) for ds in evidence}
    if missing:
        raise ValueError(f"the content references instances not in the evidence: {sorted(missing)}")
    bare_root = Dataset()
    for element in root:
        if element.keyword != "ContentSequence":
            bare_root.add(element)
    bare_root.ContentSequence = []  # highdicom's search wants one
    sr = Comprehensive3DSR(evidence=evidence, content=bare_root, **attributes)
    sr.ContentSequence = root.ContentSequence
    sr._content = ContentSequence([root], is_root=True)  # what `sr.content` reads, as highdicom sets it
    return sr


def _referenced_instances(items) -> set[str]:
    """SOP Instance UIDs of every IMAGE and COMPOSITE content item in the tree
    (PS3.3 C.17.3.3.1, Referenced SOP Sequence)."""
    found: set[str] = set()
    for item in items:
        if item.get("ValueType") in ("IMAGE", "COMPOSITE"):
            found.update(str(ref.ReferencedSOPInstanceUID) for ref in item.ReferencedSOPSequence)
        if "ContentSequence" in item:
            found |= _referenced_instances(item.ContentSequence)
    return found


def algorithm_identification(model: ModelInfo) -> AlgorithmIdentification:
    """TID 4019 for the model; an ensemble names every member as an Algorithm
    Parameter (111002) "member: NAME@VERSION", so the SR says which networks voted.
    A single model has no parameters (its SR is unchanged)."""
    parameters = [f"member: {member.ref}"[:64] for member in model.members] or None
    return AlgorithmIdentification(name=model.name, version=model.version, parameters=parameters)


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


def _measurement_report(imaging_measurements: list, **kwargs) -> MeasurementReport:
    """TID 1500 root; Imaging Measurements stays (empty) when nothing is drawable.

    highdicom insists on at least one group, so the empty case is built with
    a placeholder group that is then removed, leaving a container without a
    Content Sequence (an empty one is a Type 1C error). That is what dcmtk's
    own TID 1500 writer leaves when only qualitative evaluations exist, and
    OHIF and Cornerstone3D read it as "no measurements"; Cornerstone3D throws
    when the container is missing altogether. (highdicom's reader, in turn,
    raises on such a container when asked for its groups.)
    """
    if imaging_measurements:
        return MeasurementReport(imaging_measurements=imaging_measurements, **kwargs)
    placeholder = MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(uid=uids.derived_uid("sr-placeholder"), identifier="removed")
    )
    report = MeasurementReport(imaging_measurements=[placeholder], **kwargs)
    [container] = [i for i in report[0].ContentSequence if i.name == codes.DCM.ImagingMeasurements]
    del container.ContentSequence
    return report


def _tracking_text(display: str, sop_uid: str) -> str:
    return f"{display} (SOP ...{sop_uid[-12:]})"


def _region_group(
    header: Dataset,
    finding: Finding,
    model: ModelInfo,
    algorithm: AlgorithmIdentification,
    terms: Terminology,
) -> MeasurementsAndQualitativeEvaluations:
    """TID 1501 group of a drawable finding, shaped for OHIF and Cornerstone3D (module docstring)."""
    codes_ = terms.finding(finding.label)
    concept = codes_.dicom.dicom()
    sop_uid = str(header.SOPInstanceUID)
    # One region per finding: the largest stands for it (the SC heatmap
    # outlines all of them).
    points = outline(largest(finding), int(header.Rows), int(header.Columns))
    area, area_unit = _outline_area(points, header)
    group = MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(
            uid=tracking_uid(sop_uid, model.ref, finding.label),
            identifier=f"{CORNERSTONE_FREEHAND_ROI}:{_tracking_text(codes_.display, sop_uid)}",
        ),
        finding_type=concept,
        algorithm_id=algorithm,
        measurements=[
            Measurement(
                codes.SCT.Area,
                area,
                area_unit,
                referenced_coordinates=[
                    CoordinatesForMeasurement(
                        graphic_type=GraphicTypeValues.POLYLINE,
                        graphic_data=points,
                        source_image=SourceImageForRegion.from_source_image(header),
                        purpose=codes.DCM.ImageRegion,
                    )
                ],
            ),
            # No children: OHIF labels a NUM only if it has none or has the SCOORD.
            Measurement(codes.DCM.Probability, _fraction(finding.probability), UNITLESS),
            Measurement(codes.DCM.ThresholdValue, _fraction(finding.threshold), UNITLESS),
        ],
        qualitative_evaluations=[QualitativeEvaluation(concept, terms.sr["present"].dicom())],
    )
    # The first Comment is the label both viewers show for the region.
    group[0].ContentSequence.append(_comment(codes_.display))
    if model.caveat:
        group[0].ContentSequence.append(_comment(plain_caveat(model)))
    return group


def _outline_area(outline: np.ndarray, header: Dataset) -> tuple[float, Code | CodedConcept]:
    """Area enclosed by the closed outline (shoelace), in mm² when the header
    gives a pixel spacing (ImagerPixelSpacing, else PixelSpacing), else in pixels."""
    x, y = outline[:, 0].astype(np.float64), outline[:, 1].astype(np.float64)
    pixels = abs(float(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1]))) / 2.0
    spacing = header.get("ImagerPixelSpacing") or header.get("PixelSpacing")
    if spacing is not None and len(spacing) == 2:
        return round(pixels * float(spacing[0]) * float(spacing[1]), 2), codes.UCUM.SquareMillimeter
    return round(pixels, 2), PIXELS


def _evaluation(
    header: Dataset,
    finding: Finding,
    model: ModelInfo,
    algorithm: AlgorithmIdentification,
    terms: Terminology,
) -> CodeContentItem:
    """TID 1500 row 13 evaluation of a finding without a region (TID 1500 is
    extensible; the children carry what the group would have)."""
    codes_ = terms.finding(finding.label)
    sop_uid = str(header.SOPInstanceUID)
    evaluation = CodeContentItem(
        name=codes_.dicom.dicom(),
        value=terms.sr["present" if finding.positive else "absent"].dicom(),
        relationship_type=RelationshipTypeValues.CONTAINS,
    )
    tracking = TrackingIdentifier(
        uid=tracking_uid(sop_uid, model.ref, finding.label),
        identifier=_tracking_text(codes_.display, sop_uid),
    )
    properties = RelationshipTypeValues.HAS_PROPERTIES
    evaluation.ContentSequence = [
        *tracking,
        *algorithm,
        NumContentItem(codes.DCM.Probability, _fraction(finding.probability), UNITLESS, relationship_type=properties),
        NumContentItem(codes.DCM.ThresholdValue, _fraction(finding.threshold), UNITLESS, relationship_type=properties),
        SourceImageForMeasurement.from_source_image(header),
    ]
    return evaluation


def _fraction(value: float) -> float:
    """A model float32 has ~7 significant digits; six decimals keep all of
    them and spare readers a Numeric Value like "0.12000000000000"."""
    return round(float(value), 6)


def _comment(text: str) -> TextContentItem:
    return TextContentItem(name=codes.DCM.Comment, value=text, relationship_type=RelationshipTypeValues.CONTAINS)


def _qualitative_evaluations(model: ModelInfo, evaluations: list[CodeContentItem]) -> ContainerContentItem:
    """TID 1500 rows 12-14: the evaluations of findings without a region, then
    report-level text a reader sees whatever the viewer."""
    container = ContainerContentItem(
        name=QUALITATIVE_EVALUATIONS, relationship_type=RelationshipTypeValues.CONTAINS
    )
    notes = []
    if model.caveat:
        notes.append(_comment(f"{plain_caveat(model)}. These results come from demonstration weights."))
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
    container.ContentSequence = [*evaluations, *notes]
    return container


def _image_library(headers: list[Dataset], presentation_states: Mapping[str, Dataset]) -> ContainerContentItem:
    """TID 1600 Image Library, one group holding every source image, each
    naming the presentation state (GSPS) that draws the AI's outlines on it."""
    entries = []
    for header in headers:
        entry = ImageContentItem(
            name=CodedConcept("260753009", "SCT", "Source"),
            referenced_sop_class_uid=header.SOPClassUID,
            referenced_sop_instance_uid=header.SOPInstanceUID,
            relationship_type=RelationshipTypeValues.CONTAINS,
        )
        state = presentation_states.get(str(header.SOPInstanceUID))
        if state is not None:
            reference = Dataset()
            reference.ReferencedSOPClassUID = state.SOPClassUID
            reference.ReferencedSOPInstanceUID = state.SOPInstanceUID
            entry.ReferencedSOPSequence[0].ReferencedSOPSequence = [reference]
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


def drop_invalid_optional_patient_study(obj: Dataset) -> None:
    """Remove Type 3 patient/study attributes whose copied value is invalid.

    highdicom copies the whole Patient and Patient Study modules from the
    first source into the SR, SEG and GSPS. Modalities do send malformed
    optional values (e.g. Patient's Age "62" instead of "062Y"); passing one
    on would make our object fail validation for data we did not produce.
    Type 1/2 values are left alone.
    """
    module_map = get_module_attribute_map()
    for module in ("patient", "patient-study", "general-study", "clinical-trial-subject", "clinical-trial-study"):
        for attribute in module_map.get(module, []):
            keyword = attribute["keyword"]
            if attribute["path"] or attribute["type"] != "3" or keyword not in obj:
                continue
            element = obj[keyword]
            if element.VR == "SQ" or element.value is None:
                continue
            values = element.value if element.VM > 1 else [element.value]
            try:
                for value in values:
                    validate_value(element.VR, value, pydicom_config.RAISE)
            except ValueError:
                del obj[keyword]
