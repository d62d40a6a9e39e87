"""The AI's regions as a DICOM Segmentation: an overlay a viewer can switch on and off.

One BINARY SEG per scored image that has a drawable finding (positive, with
a region): one segment per such finding, its pixels the finding's region
polygons filled at the source resolution (`regions.mask`), the same outlines
the SR, GSPS and SCs draw. BINARY because OHIF does not display FRACTIONAL
SEG (OHIF#1346). Each segment carries the finding's concept from
fhir/terminology.json as its Segmented Property Type, the model as its
algorithm, and the SR's Tracking UID for the finding, so a reader can match
a segment with its SR measurement group.

A chest radiograph rarely has a Frame of Reference. highdicom then writes a
SEG whose frames are tied to the source's pixels by the Derivation Image
functional group only (PS3.3 A.51.5.1), without a plane orientation.
Cornerstone3D's SEG adapter (what OHIF 3.13 loads a SEG with) reads the
orientation unconditionally and throws ("reading 'ImageOrientationPatient'"),
so such a SEG also gets a shared Plane Orientation: the source's Image
Orientation (Patient) if it has one, else rows along +x and columns along +y,
which is what OHIF assumes for an image without one, so the adapter finds
the SEG in the source's plane. dciodvfy accepts it (and then no longer asks
for Patient Orientation, which is set anyway). A source with a complete
plane geometry (Frame of Reference, orientation, position, spacing and
thickness) gets highdicom's own spatial SEG instead.
"""
from __future__ import annotations

import copy
import datetime as dt

import highdicom as hd
import numpy as np
from highdicom.seg import SegmentAlgorithmTypeValues, SegmentDescription, Segmentation, SegmentationTypeValues
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pydicom.valuerep import DA, TM

from inference.types import Finding, ModelInfo
from node.outputs import uids
from node.outputs.equipment import MANUFACTURER, contributing_equipment, device_uid, series_description
from node.outputs.regions import drawable_findings, mask
from node.outputs.sr import drop_invalid_optional_patient_study, source_header, tracking_uid
from node.outputs.text import declare_character_set, plain, plain_caveat
from node.scored_study import ScoredImage, ScoredStudy
from node.terminology import Terminology, load_terminology

SEG_SERIES_NUMBER = 9903
SEG_SERIES_BASE = "Carina AI regions"
# What OHIF's metadata provider assumes for an image without Image Orientation (Patient).
DEFAULT_ORIENTATION = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
_PLANE = ("FrameOfReferenceUID", "ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing", "SliceThickness")


def build_segmentation(
    header: Dataset,
    image: ScoredImage,
    study: ScoredStudy,
    *,
    manufacturer: str = MANUFACTURER,
    series_number: int = SEG_SERIES_NUMBER,
    instance_number: int = 1,
) -> Segmentation | None:
    """The SEG of one scored image, or None when it has no drawable finding.

    `header` is the source image's header (pixels are not needed). Dates,
    times and every UID are functions of the study, so a re-run writes the
    same bytes.
    """
    findings = drawable_findings(image.findings)
    if not findings:
        return None
    model, created, terms = study.model, study.created_local, load_terminology()
    header = source_header(header)
    rows, columns = int(header.Rows), int(header.Columns)
    pixels = np.stack([mask(f, rows, columns) for f in findings], axis=-1)[np.newaxis]
    spatial = all(k in header for k in _PLANE)
    source = header if spatial else _without_frame_of_reference(header)
    sop_uid = uids.seg_instance_uid(str(header.SOPInstanceUID), model.ref,
                                    *study.output_uid_qualifiers(str(header.SOPInstanceUID)))
    caveat = plain_caveat(model)

    seg = Segmentation(
        source_images=[source],
        pixel_array=pixels,
        segmentation_type=SegmentationTypeValues.BINARY,
        segment_descriptions=[
            _segment(number, finding, header, model, terms)
            for number, finding in enumerate(findings, start=1)
        ],
        series_instance_uid=uids.series_uid(str(header.StudyInstanceUID), model.ref, "seg"),
        series_number=series_number,
        sop_instance_uid=sop_uid,
        instance_number=instance_number,
        manufacturer=manufacturer,
        manufacturer_model_name=model.name[:64],
        software_versions=model.version[:64],
        device_serial_number=device_uid(model),  # the Device UID names this model's weights
        content_label="CARINA_AI",
        content_description=(f"AI regions - {caveat}" if caveat else "AI regions")[:64],
        transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description=series_description(SEG_SERIES_BASE, model, " (SEG)"),
        content_date=DA(created.date()),
        content_time=TM(created.time()),
        specific_character_set="ISO_IR 192",
    )
    if not spatial:
        orientation = header.get("ImageOrientationPatient") or DEFAULT_ORIENTATION
        plane = Dataset()
        plane.ImageOrientationPatient = [float(v) for v in orientation]
        seg.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence = [plane]
    _make_deterministic(seg, sop_uid, created)
    seg.PatientOrientation = _patient_orientation(header)
    if header.get("BodyPartExamined"):
        seg.BodyPartExamined = header.BodyPartExamined
    seg.ImageComments = "; ".join(
        [f"AI regions of {', '.join(terms.finding(f.label).display for f in findings)}"] + ([caveat] if caveat else [])
    )[:10240]
    seg.ContributingEquipmentSequence = contributing_equipment(
        [header], model, manufacturer=manufacturer, contributed_at=created
    )
    drop_invalid_optional_patient_study(seg)
    declare_character_set(seg)
    return seg


def _segment(number: int, finding: Finding, header: Dataset, model: ModelInfo, terms: Terminology) -> SegmentDescription:
    codes_ = terms.finding(finding.label)
    sop_uid = str(header.SOPInstanceUID)
    segment = SegmentDescription(
        segment_number=number,
        segment_label=plain(codes_.display)[:64],
        segmented_property_category=terms.seg["category"].dicom(),
        segmented_property_type=codes_.dicom.dicom(),
        algorithm_type=SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name=model.name[:64], version=model.version[:64], family=terms.seg["algorithm_family"].dicom()
        ),
        # The SR's Tracking UID for this finding on this image: the segment and
        # the SR measurement group are one finding.
        tracking_uid=tracking_uid(sop_uid, model.ref, finding.label),
        tracking_id=f"{plain(codes_.display)} (SOP ...{sop_uid[-12:]})"[:64],
    )
    caveat = plain_caveat(model)
    # Segment Description (ST) is nested, so ASCII (node/outputs/text.py).
    segment.SegmentDescription = (
        f"{plain(codes_.display)}: AI probability {finding.probability:.2f} "
        f"(operating point {finding.threshold:.2f})" + (f"; {caveat}" if caveat else "")
    )
    return segment


def _without_frame_of_reference(header: Dataset) -> Dataset:
    """The header as highdicom's non-spatial path needs it: no partial plane geometry."""
    source = copy.copy(header)
    for keyword in ("FrameOfReferenceUID", "ImagePositionPatient", "ImageOrientationPatient", "PositionReferenceIndicator"):
        if keyword in source:
            delattr(source, keyword)
    return source


def _patient_orientation(header: Dataset) -> list[str] | str:
    orientation = [str(v) for v in (header.get("PatientOrientation") or []) if str(v)]
    return orientation if len(orientation) == 2 else ""  # Type 2: empty means unknown


def _make_deterministic(seg: Segmentation, sop_uid: str, created: dt.datetime) -> None:
    """Replace what highdicom takes from the clock or a random source."""
    for item in seg.DimensionIndexSequence:
        item.DimensionOrganizationUID = uids.derived_uid("seg-dimensions", sop_uid)
    seg.DimensionOrganizationSequence[0].DimensionOrganizationUID = uids.derived_uid("seg-dimensions", sop_uid)
    seg.InstanceCreationDate = DA(created.date())
    seg.InstanceCreationTime = TM(created.time())
    for keyword, value in (("SeriesDate", DA(created.date())), ("SeriesTime", TM(created.time()))):
        if keyword in seg:
            setattr(seg, keyword, value)
