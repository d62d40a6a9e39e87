"""TID 1500 SR builder: validity (dciodvfy, dsrdump, highdicom read-back),
content, UIDs, determinism and the demo caveat."""
from __future__ import annotations

import copy
import datetime as dt
import re
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from highdicom.sr import srread
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian

from dicom_factory import SIIM_MONO1, make_dx
from inference.types import (
    CHESTXRAY14,
    DEMO_WARNING,
    DecodedImage,
    Finding,
    Heatmaps,
    ImageResult,
    ModelInfo,
    Region,
)
from node.outputs import uids
from node.outputs.regions import outline
from node.outputs.text import plain
from node.outputs.sr import CORNERSTONE_FREEHAND_ROI, build_sr, tracking_uid
from node.terminology import load_terminology
from peers import dciodvfy_errors, dsrdump, require_tool
from scored_factory import ISSUED, headers, scored_study

DEMO = ModelInfo("densenet121-res224-all", "demo-seed0", demo=True)
REAL = ModelInfo("densenet121-res224-all", "2024.1", demo=False, weights_sha256="ab" * 32)
PLAIN_WARNING = plain(DEMO_WARNING)


def sr_of(sources, model: ModelInfo, version: int, predecessors=None, *, issued: dt.datetime = ISSUED, **options):
    """build_sr over [(source, ImageResult)] as the encode stage calls it."""
    study = scored_study(sources, version=version, model=model, issued=issued)
    return build_sr(study, headers(sources), predecessors, **options)

# dciodvfy warnings we accept, each explained:
KNOWN_DCIODVFY_WARNINGS = (
    # dicom3tools 20220618 predates Device UID in the Contributing Equipment
    # Sequence, which IHE AIR requires; it then calls the SOP class "extended".
    "Attribute is not present in standard DICOM IOD - (0x0018,0x1002) UI Device UID",
    "Dicom dataset contains attributes not present in standard DICOM IOD - this is a Standard Extended SOP Class",
    # Properties of the sources' own patient/study data (empty Study ID or
    # Study Time, a single-component patient name), copied as they are.
    "Missing attribute or value that would be needed to build DICOMDIR - Study ",
    "Retired Person Name form",
)
# dcmtk 3.6.7's VR checker cannot check UTF-8 text; a tool limitation, not content.
KNOWN_DSRDUMP_WARNING = "W: The VR checker does not support this Specific Character Set: ISO_IR 192"


# --- synthetic model results -------------------------------------------------

def decoded(ds: Dataset) -> DecodedImage:
    """Test-only stand-in for inference's decoder: stored values, MONOCHROME1 inverted."""
    pixels = ds.pixel_array.astype(np.float32)
    maxval = float(2 ** int(ds.BitsStored) - 1)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        pixels = maxval - pixels
    return DecodedImage(pixels=pixels, maxval=maxval, source_shape=pixels.shape)


def box_region(x0: float, y0: float, width: float, height: float) -> Region:
    """Closed rectangle in array-index coordinates (pixel centres at integers)."""
    polygon = np.array(
        [[x0, y0], [x0 + width, y0], [x0 + width, y0 + height], [x0, y0 + height], [x0, y0]], dtype=np.float64
    )
    bbox = (int(x0), int(y0), int(x0 + width) + 1, int(y0 + height) + 1)
    return Region(polygon=polygon, bbox=bbox, area_px=int((width + 1) * (height + 1)))


def make_result(
    ds: Dataset,
    model: ModelInfo,
    positives: dict[str, float] | None = None,
    regions: dict[str, tuple[Region, ...]] | None = None,
) -> ImageResult:
    """14 findings; `positives` label -> probability (threshold 0.5), with a
    box region (unless `regions` says otherwise) and a hot 7x7 map patch."""
    positives = {"Pneumothorax": 0.91, "Effusion": 0.73} if positives is None else positives
    regions = regions or {}
    rows, cols = int(ds.Rows), int(ds.Columns)
    maps = np.zeros((14, 7, 7), dtype=np.float32)
    findings = []
    for index, label in enumerate(CHESTXRAY14):
        positive = label in positives
        probability = positives[label] if positive else round(0.05 + 0.02 * index, 2)
        found: tuple[Region, ...] = ()
        if positive:
            maps[index, 2:5, 1 + index % 4 : 3 + index % 4] = 1.0
            found = regions.get(label, (box_region(cols * 0.25, rows * 0.3, cols * 0.2, rows * 0.15),))
        findings.append(Finding(label, probability, 0.5, positive, found))
    side = min(rows, cols)
    heatmaps = Heatmaps(maps=maps, crop=((rows - side) // 2, (cols - side) // 2, side), source_shape=(rows, cols))
    return ImageResult(findings=tuple(findings), heatmaps=heatmaps, image=decoded(ds), model=model)


def siim() -> Dataset:
    return pydicom.dcmread(SIIM_MONO1)


def write(obj: Dataset, path: Path) -> Path:
    obj.save_as(path, enforce_file_format=True)
    return path


def assert_valid_dicom(path: Path) -> None:
    assert dciodvfy_errors(path) == []
    proc = subprocess.run([require_tool("dciodvfy"), str(path)], capture_output=True, text=True, timeout=120)
    warnings = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("Warning")]
    unexpected = [w for w in warnings if not any(k in w for k in KNOWN_DCIODVFY_WARNINGS)]
    assert unexpected == []


def dsrdump_checked(path: Path) -> str:
    proc = subprocess.run([require_tool("dsrdump"), str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    complaints = [line for line in proc.stderr.splitlines() if line.strip() and line.strip() != KNOWN_DSRDUMP_WARNING]
    assert complaints == []
    return dsrdump(path)


def groups_of(sr: Dataset) -> list[Dataset]:
    """Measurement groups under Imaging Measurements (the drawable findings)."""
    measurements = [i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "126010"]
    assert len(measurements) == 1
    return list(measurements[0].get("ContentSequence", []))


def evaluations_of(sr: Dataset) -> list[Dataset]:
    """TID 1500 row 13 CODE evaluations in the report's Qualitative Evaluations container."""
    [container] = [i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "C0034375"]
    return [i for i in container.ContentSequence if i.ValueType == "CODE"]


def region_of(group: Dataset) -> Dataset:
    """The group's SCOORD: under its first NUM, where Cornerstone3D looks for it."""
    first_num = next(i for i in group.ContentSequence if i.ValueType == "NUM")
    [scoord] = [i for i in first_num.ContentSequence if i.ValueType == "SCOORD"]
    return scoord


def tracking_uids(sr: Dataset) -> list[str]:
    return [item(g, "112040")[0].UID for g in [*groups_of(sr), *evaluations_of(sr)]]


def item(group: Dataset, code_value: str, value_type: str | None = None) -> list[Dataset]:
    return [
        i
        for i in group.ContentSequence
        if i.ConceptNameCodeSequence[0].CodeValue == code_value and (value_type is None or i.ValueType == value_type)
    ]


# --- validity ------------------------------------------------------------------

@pytest.mark.parametrize(
    "kind, model",
    [("siim_mono1", DEMO), ("dx16", REAL), ("dx16_mono1", DEMO), ("two_images", REAL)],
)
def test_sr_passes_dciodvfy_dsrdump_and_highdicom(tmp_path, kind, model):
    if kind == "siim_mono1":
        sources = [siim()]
    elif kind == "dx16":
        sources = [make_dx()]
    elif kind == "dx16_mono1":
        sources = [make_dx(photometric="MONOCHROME1")]
    else:
        first = make_dx(view_position="PA")
        sources = [first, make_dx(view_position="AP", study_uid=first.StudyInstanceUID)]
    sr = sr_of([(ds, make_result(ds, model)) for ds in sources], model, 1)
    path = write(sr, tmp_path / "sr.dcm")

    assert_valid_dicom(path)
    dump = dsrdump_checked(path)
    assert "Imaging Measurement Report" in dump
    back = srread(path)
    # two positive findings with a region per image are TID 1501 groups (the
    # SCOORD hangs under a NUM); the other 12 are qualitative evaluations
    assert len(back.content.get_planar_roi_measurement_groups()) == 0
    assert len(back.content.get_image_measurement_groups()) == 2 * len(sources)
    assert len(evaluations_of(pydicom.dcmread(path))) == 12 * len(sources)
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == ExplicitVRLittleEndian


def test_sr_references_each_images_presentation_state(tmp_path):
    """The GSPS that outlines an image's findings is named in that image's
    Image Library entry (Image Reference Macro, Referenced SOP Sequence) and
    listed as evidence; dcmtk reads it as the image's presentation state."""
    from node.outputs.gsps import build_presentation_state

    first = make_dx(view_position="PA")
    second = make_dx(view_position="AP", study_uid=first.StudyInstanceUID)
    sources = [(first, make_result(first, REAL)), (second, make_result(second, REAL, positives={}))]
    study = scored_study(sources, model=REAL)
    state = build_presentation_state(first, study.images[0], study)
    assert build_presentation_state(second, study.images[1], study) is None  # nothing drawn on it
    sr = build_sr(study, headers(sources), presentation_states={first.SOPInstanceUID: state})
    path = write(sr, tmp_path / "sr.dcm")
    assert_valid_dicom(path)
    assert "(DX image,),(GSPS,)" in dsrdump_checked(path)

    [library] = [i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "111028"]
    entries = {e.ReferencedSOPSequence[0].ReferencedSOPInstanceUID: e.ReferencedSOPSequence[0]
               for e in library.ContentSequence[0].ContentSequence}
    [reference] = entries[first.SOPInstanceUID].ReferencedSOPSequence
    assert (reference.ReferencedSOPClassUID, reference.ReferencedSOPInstanceUID) == (state.SOPClassUID, state.SOPInstanceUID)
    assert "ReferencedSOPSequence" not in entries[second.SOPInstanceUID]
    evidence = {(item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID)
                for series in sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
                for item in series.ReferencedSOPSequence}
    assert evidence == {(first.SOPClassUID, first.SOPInstanceUID), (second.SOPClassUID, second.SOPInstanceUID),
                        (state.SOPClassUID, state.SOPInstanceUID)}
    # without GSPS the SR names no presentation state
    plain_sr = build_sr(study, headers(sources))
    assert "(GSPS,)" not in dsrdump_checked(write(plain_sr, tmp_path / "plain.dcm"))


# --- header, UIDs, equipment --------------------------------------------------------

def test_sr_header_uids_and_flags():
    ds = make_dx(patient_id="PID-7", patient_name="Doe^Jane")
    sr = sr_of([(ds, make_result(ds, REAL))], REAL, 3)

    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert sr.StudyInstanceUID == ds.StudyInstanceUID
    assert (sr.PatientID, str(sr.PatientName), sr.PatientBirthDate, sr.PatientSex) == ("PID-7", "Doe^Jane", "19600101", "F")
    assert sr.AccessionNumber == ds.AccessionNumber
    assert sr.SeriesInstanceUID == uids.series_uid(ds.StudyInstanceUID, REAL.ref, "sr")
    assert sr.SOPInstanceUID == uids.sr_instance_uid([ds.SOPInstanceUID], REAL.ref, 3)
    assert sr.SeriesInstanceUID != ds.SeriesInstanceUID
    assert sr.SeriesNumber == 9901 and sr.InstanceNumber == 3
    assert sr.Modality == "SR"
    assert sr.SeriesDescription == "Carina AI findings (TID 1500)"
    assert (sr.VerificationFlag, sr.CompletionFlag, sr.PreliminaryFlag) == ("UNVERIFIED", "COMPLETE", "PRELIMINARY")
    assert sr.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert sr.Manufacturer == "Carina" and sr.ManufacturerModelName == REAL.name and sr.SoftwareVersions == REAL.version
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.StudyInstanceUID == ds.StudyInstanceUID
    assert evidence.ReferencedSeriesSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == ds.SOPInstanceUID

    algorithm = sr.ContributingEquipmentSequence[-1]
    purpose = algorithm.PurposeOfReferenceCodeSequence[0]
    assert (purpose.CodeValue, purpose.CodingSchemeDesignator, purpose.CodeMeaning) == (
        "Newcode1", "99IHE", "Processing Algorithm")
    assert algorithm.Manufacturer == "Carina"
    assert algorithm.ManufacturerModelName == REAL.name and algorithm.SoftwareVersions == REAL.version
    assert algorithm.DeviceUID == uids.device_uid(REAL.name, REAL.version, REAL.weights_sha256)
    # the source's acquisition device comes first (the factory names a manufacturer)
    assert sr.ContributingEquipmentSequence[0].Manufacturer == "Carina Test Factory"


def test_sr_rejects_mixed_studies_and_wrong_finding_order():
    a, b = make_dx(), make_dx()
    with pytest.raises(ValueError, match="studies"):
        sr_of([(a, make_result(a, REAL)), (b, make_result(b, REAL))], REAL, 1)
    result = make_result(a, REAL)
    shuffled = ImageResult(
        findings=tuple(reversed(result.findings)), heatmaps=result.heatmaps, image=result.image, model=REAL
    )
    with pytest.raises(ValueError, match="CHESTXRAY14"):
        sr_of([(a, shuffled)], REAL, 1)
    with pytest.raises(ValueError):
        sr_of([], REAL, 1)


def test_content_referencing_an_instance_outside_the_evidence_cannot_be_built():
    """build_sr hands highdicom's SR constructor the root container and attaches
    the content tree itself (node/outputs/sr.py, `_sr_document`), so it makes the
    check the constructor made on the tree: every referenced instance is evidence."""
    from pydicom.uid import generate_uid

    from node.outputs.sr import _sr_document

    ds = make_dx()
    sr = sr_of([(ds, make_result(ds, REAL))], REAL, 1)
    [root] = sr.content  # the tree as built, highdicom's view of it
    assert root.ContentSequence is sr.ContentSequence
    stranger = make_dx(study_uid=ds.StudyInstanceUID)
    with pytest.raises(ValueError, match=str(ds.SOPInstanceUID)):
        _sr_document(root, evidence=[stranger], series_instance_uid=generate_uid(), series_number=1,
                     sop_instance_uid=generate_uid(), instance_number=1)


# --- content tree -------------------------------------------------------------

def test_sr_content_tree_codes_and_observer():
    terms = load_terminology()
    ds = make_dx()
    sr = sr_of([(ds, make_result(ds, DEMO))], DEMO, 1)

    root = sr.ConceptNameCodeSequence[0]
    assert (root.CodeValue, root.CodingSchemeDesignator) == ("126000", "DCM")  # what OHIF opens
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"

    procedure = [i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "121058"]
    expected = terms.sr["procedure"]
    assert [(p.ConceptCodeSequence[0].CodeValue, p.ConceptCodeSequence[0].CodingSchemeDesignator) for p in procedure] == [
        (expected.code, expected.scheme)]

    context = {i.ConceptNameCodeSequence[0].CodeValue: i for i in sr.ContentSequence if i.RelationshipType == "HAS OBS CONTEXT"}
    assert context["121005"].ConceptCodeSequence[0].CodeValue == "121007"  # observer type: device
    assert context["121012"].UID == uids.device_uid(DEMO.name, DEMO.version, DEMO.weights_sha256)
    assert context["121013"].TextValue == "Carina"
    assert context["121015"].TextValue == DEMO.name

    library = [i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "111028"]
    assert len(library) == 1 and len(library[0].ContentSequence) == 1  # one group: OHIF reads only the first
    entries = library[0].ContentSequence[0].ContentSequence
    assert [e.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for e in entries] == [ds.SOPInstanceUID]


def test_sr_title_can_be_the_terminology_loinc_code(tmp_path):
    ds = make_dx()
    loinc = load_terminology().report["sr_title"]
    sr = sr_of([(ds, make_result(ds, REAL))], REAL, 1, title=loinc.dicom())
    root = sr.ConceptNameCodeSequence[0]
    assert (root.CodeValue, root.CodingSchemeDesignator) == ("18748-4", "LN")
    path = write(sr, tmp_path / "loinc.dcm")
    assert_valid_dicom(path)
    dsrdump_checked(path)


def test_sr_every_finding_once_in_label_order():
    terms = load_terminology()
    ds = make_dx()
    result = make_result(ds, REAL, positives={"Cardiomegaly": 0.8, "Mass": 0.7})
    sr = sr_of([(ds, result)], REAL, 1)
    groups, evaluations = groups_of(sr), evaluations_of(sr)
    assert len(groups) == 2 and len(evaluations) == 12

    def name_code(i: Dataset) -> str:
        return i.ConceptNameCodeSequence[0].CodeValue

    tracking_uids_seen = set()
    drawable = iter(groups)
    region_less = iter(evaluations)
    for finding in result.findings:
        codes_ = terms.finding(finding.label)
        concept = codes_.dicom
        verdict = terms.sr["present" if finding.positive else "absent"]
        if finding.positive:
            group = next(drawable)
            assert group.ContentTemplateSequence[0].TemplateIdentifier == "1501"
            [finding_item] = item(group, "121071", "CODE")
            assert (finding_item.ConceptCodeSequence[0].CodeValue, finding_item.ConceptCodeSequence[0].CodingSchemeDesignator) == (
                concept.code, concept.scheme)
            [evaluation] = item(group, concept.code, "CODE")  # concept name = the finding itself
            assert evaluation.ConceptCodeSequence[0].CodeValue == verdict.code
            # Area first: Cornerstone3D takes the SCOORD from the first NUM
            nums = [i for i in group.ContentSequence if i.ValueType == "NUM"]
            assert [name_code(n) for n in nums] == ["42798000", "122157", "122411"]
            region = region_of(group)
            assert (region.RelationshipType, region.GraphicType) == ("INFERRED FROM", "POLYLINE")
            assert name_code(region) == "111030"
            [source] = region.ContentSequence
            assert source.RelationshipType == "SELECTED FROM"
            assert source.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == ds.SOPInstanceUID
            # OHIF labels a NUM only when it has no children (or has the SCOORD)
            assert "ContentSequence" not in nums[1] and "ContentSequence" not in nums[2]
            [probability], [threshold] = nums[1:2], nums[2:3]
            # the first Comment is the label OHIF and Cornerstone3D show
            assert [i.TextValue for i in item(group, "121106", "TEXT")] == [codes_.display]
            names = {name_code(i): i for i in group.ContentSequence if i.ValueType == "TEXT"}
            assert names["112039"].TextValue.startswith(f"{CORNERSTONE_FREEHAND_ROI}:{codes_.display} (SOP ...")
            assert names["111001"].TextValue == REAL.name and names["111003"].TextValue == REAL.version
            [tracking] = item(group, "112040", "UIDREF")
        else:
            evaluation = next(region_less)
            assert (name_code(evaluation), evaluation.ConceptNameCodeSequence[0].CodingSchemeDesignator) == (
                concept.code, concept.scheme)
            assert evaluation.ConceptCodeSequence[0].CodeValue == verdict.code
            assert evaluation.RelationshipType == "CONTAINS"
            [probability] = item(evaluation, "122157", "NUM")
            [threshold] = item(evaluation, "122411", "NUM")
            assert probability.RelationshipType == threshold.RelationshipType == "HAS PROPERTIES"
            [source] = [i for i in evaluation.ContentSequence if i.ValueType == "IMAGE"]
            assert source.RelationshipType == "INFERRED FROM"
            assert source.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == ds.SOPInstanceUID
            names = {name_code(i): i for i in evaluation.ContentSequence if i.ValueType == "TEXT"}
            assert names["112039"].TextValue == f"{codes_.display} (SOP ...{ds.SOPInstanceUID[-12:]})"
            assert names["111001"].TextValue == REAL.name and names["111003"].TextValue == REAL.version
            assert item(evaluation, "111030") == []
            [tracking] = item(evaluation, "112040", "UIDREF")
        assert float(probability.MeasuredValueSequence[0].NumericValue) == pytest.approx(finding.probability)
        unit = probability.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0]
        assert (unit.CodeValue, unit.CodingSchemeDesignator) == ("1", "UCUM")
        assert float(threshold.MeasuredValueSequence[0].NumericValue) == pytest.approx(0.5)
        assert tracking.UID == tracking_uid(ds.SOPInstanceUID, REAL.ref, finding.label)
        tracking_uids_seen.add(tracking.UID)
    assert len(tracking_uids_seen) == 14


def test_positive_without_region_is_a_qualitative_evaluation():
    ds = make_dx()
    result = make_result(ds, REAL, positives={"Mass": 0.9}, regions={"Mass": ()})
    sr = sr_of([(ds, result)], REAL, 1)
    assert groups_of(sr) == []
    mass_code = load_terminology().finding("Mass").dicom.code
    [mass] = [e for e in evaluations_of(sr) if e.ConceptNameCodeSequence[0].CodeValue == mass_code]
    assert mass.ConceptCodeSequence[0].CodeValue == "52101004"  # Present


def test_sr_without_regions_keeps_an_empty_imaging_measurements_container(tmp_path):
    # Row 6 stays, without a Content Sequence (an empty one is a Type 1C error):
    # OHIF and Cornerstone3D read it as "no measurements" and a missing one
    # makes Cornerstone3D throw.
    ds = make_dx()
    sr = sr_of([(ds, make_result(ds, REAL, positives={}))], REAL, 1)
    [container] = [i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "126010"]
    assert "ContentSequence" not in container
    assert len(evaluations_of(sr)) == 14
    path = write(sr, tmp_path / "normal.dcm")
    assert_valid_dicom(path)
    dsrdump_checked(path)


@pytest.mark.parametrize(
    "spacing, expected, unit",
    [
        ({"ImagerPixelSpacing": [0.2, 0.1]}, 11 * 7 * 0.2 * 0.1, "mm2"),
        ({"PixelSpacing": [0.5, 0.5]}, 11 * 7 * 0.25, "mm2"),
        ({}, 11 * 7, "{pixels}"),
    ],
)
def test_region_area_is_the_outline_area(spacing, expected, unit):
    ds = make_dx()
    for keyword in ("ImagerPixelSpacing", "PixelSpacing"):
        ds.pop(keyword, None)
    for keyword, value in spacing.items():
        setattr(ds, keyword, value)
    box = box_region(4, 6, 11, 7)  # an 11 x 7 outline between pixel centres
    result = make_result(ds, REAL, positives={"Nodule": 0.8}, regions={"Nodule": (box,)})
    [group] = groups_of(sr_of([(ds, result)], REAL, 1))
    [area] = item(group, "42798000", "NUM")
    value = area.MeasuredValueSequence[0]
    assert float(value.NumericValue) == pytest.approx(expected, abs=0.01)
    assert value.MeasurementUnitsCodeSequence[0].CodeValue == unit


# --- SCOORD geometry ----------------------------------------------------------------

def test_scoord_uses_pixel_corner_origin_and_stays_inside_the_image():
    # index-space polygon: pixel (0,0) centre at 0.0 -> DICOM 0.5; vertices
    # beyond the matrix are clipped to [0, Columns] x [0, Rows].
    region = Region(polygon=np.array([[0.0, 0.0], [9.0, 0.0], [12.0, 7.0], [0.0, 7.0]]), bbox=(0, 0, 10, 8), area_px=70)
    points = outline(region, rows=8, columns=10)
    assert points.dtype == np.float32
    assert points[0].tolist() == [0.5, 0.5]
    assert points[1].tolist() == [9.5, 0.5]
    assert points[2].tolist() == [10.0, 7.5]  # x clipped at Columns
    assert points[-1].tolist() == points[0].tolist()  # closed
    degenerate = Region(polygon=np.array([[3.0, 3.0], [3.0, 3.0]]), bbox=(3, 3, 4, 4), area_px=1)
    assert outline(degenerate, 8, 10).tolist() == [[3, 3], [4, 3], [4, 4], [3, 4], [3, 3]]


def test_sr_scoords_lie_within_their_source_image():
    ds = siim()
    rows, cols = int(ds.Rows), int(ds.Columns)
    too_big = box_region(cols * 0.8, rows * 0.8, cols * 0.5, rows * 0.5)  # runs off the bottom-right
    result = make_result(ds, DEMO, positives={"Nodule": 0.6}, regions={"Nodule": (box_region(10, 10, 5, 5), too_big)})
    [group] = groups_of(sr_of([(ds, result)], DEMO, 1))
    region = region_of(group)
    points = np.asarray(region.GraphicData, dtype=np.float64).reshape(-1, 2)
    assert (points[:, 0] >= 0).all() and (points[:, 0] <= cols).all()
    assert (points[:, 1] >= 0).all() and (points[:, 1] <= rows).all()
    assert points[:, 0].max() == cols  # the largest region was chosen, and clipped
    assert points[0].tolist() == points[-1].tolist()


# --- CR/DX headers ---------------------------------------------------------------

def test_sr_copes_with_cr_headers_without_touching_them():
    ds = siim()  # no PatientOrientation values, PixelSpacing only, Patient's Age "62"
    before = copy.deepcopy(ds)
    sr = sr_of([(ds, make_result(ds, DEMO))], DEMO, 1)
    assert ds == before
    assert "PixelData" in ds

    library = [i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "111028"][0]
    descriptors = {
        d.ConceptNameCodeSequence[0].CodeValue: d for d in library.ContentSequence[0].ContentSequence[0].ContentSequence
    }
    assert "111044" not in descriptors  # no orientation invented
    assert float(descriptors["111026"].MeasuredValueSequence[0].NumericValue) == pytest.approx(0.168)
    assert descriptors["121139"].ConceptCodeSequence[0].CodeValue == "CR"  # Modality, not SOP class
    assert "PatientAge" not in sr  # the invalid "62" is not passed on


def sloppy_dx() -> Dataset:
    """A header with the Type 2 gaps and oddities real modalities send."""
    ds = make_dx()
    del ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName, ds.StudyTime
    ds.PatientSex = "Male"
    ds.PatientBirthDate = "00000000"
    return ds


def test_sr_builds_valid_objects_from_sloppy_headers(tmp_path):
    ds = sloppy_dx()
    before = copy.deepcopy(ds)
    sr = sr_of([(ds, make_result(ds, REAL))], REAL, 1)
    assert ds == before
    assert (sr.PatientSex, sr.PatientBirthDate, sr.StudyID, sr.AccessionNumber) == ("M", "", "", "")
    assert_valid_dicom(write(sr, tmp_path / "sr.dcm"))


def test_sr_keeps_valid_optional_patient_data():
    ds = make_dx()
    ds.PatientAge = "066Y"
    sr = sr_of([(ds, make_result(ds, REAL))], REAL, 1)
    assert sr.PatientAge == "066Y"


# --- determinism, predecessors ---------------------------------------------------------

def _bytes(sr: Dataset, path: Path) -> bytes:
    sr.save_as(path, enforce_file_format=True)
    return path.read_bytes()


def test_sr_is_deterministic(tmp_path):
    ds = make_dx()
    sources = [(ds, make_result(ds, DEMO))]
    first = _bytes(sr_of(sources, DEMO, 2), tmp_path / "a.dcm")
    second = _bytes(sr_of(sources, DEMO, 2), tmp_path / "b.dcm")
    assert first == second

    # issued at another time, only the creation date/time values differ
    timeless = []
    for name, issued in (("c.dcm", ISSUED), ("d.dcm", ISSUED + dt.timedelta(hours=5, microseconds=1))):
        back = pydicom.dcmread(write(sr_of(sources, DEMO, 2, issued=issued), tmp_path / name))
        for keyword in ("ContentDate", "ContentTime", "InstanceCreationDate", "InstanceCreationTime"):
            del back[keyword]
        for equipment in back.ContributingEquipmentSequence:
            equipment.pop("ContributionDateTime", None)
        timeless.append(back)
    assert timeless[0] == timeless[1]
    assert timeless[0].SOPInstanceUID == uids.sr_instance_uid([ds.SOPInstanceUID], DEMO.ref, 2)


def test_rerun_supersedes_predecessor(tmp_path):
    ds = make_dx()
    sources = [(ds, make_result(ds, REAL))]
    first = pydicom.dcmread(write(sr_of(sources, REAL, 1), tmp_path / "v1.dcm"), stop_before_pixels=True)
    second = sr_of(sources, REAL, 2, predecessors=[first])
    path = write(second, tmp_path / "v2.dcm")

    assert second.SOPInstanceUID != first.SOPInstanceUID
    assert second.SeriesInstanceUID == first.SeriesInstanceUID
    [study] = second.PredecessorDocumentsSequence
    assert study.StudyInstanceUID == ds.StudyInstanceUID
    [series] = study.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == first.SeriesInstanceUID
    assert series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == first.SOPInstanceUID
    assert "PredecessorDocumentsSequence" not in first
    assert_valid_dicom(path)
    # same image, same model: the findings keep their tracking UIDs across runs
    assert len(tracking_uids(first)) == 14
    assert tracking_uids(first) == tracking_uids(second)


# --- demo caveat ---------------------------------------------------------------------

def test_demo_caveat_is_unmissable_in_the_sr(tmp_path):
    ds = make_dx()
    demo = sr_of([(ds, make_result(ds, DEMO))], DEMO, 1)
    dump = dsrdump_checked(write(demo, tmp_path / "demo.dcm"))

    assert demo.SeriesDescription == f"Carina AI findings - {PLAIN_WARNING}"
    assert len(demo.SeriesDescription) <= 64
    assert "DEMO WEIGHTS" in dump  # series line and comments, as any SR viewer shows them
    comments = [
        i.TextValue
        for i in demo.ContentSequence[-1].ContentSequence
        if i.ConceptNameCodeSequence[0].CodeValue == "121106"
    ]
    assert demo.ContentSequence[-1].ConceptNameCodeSequence[0].CodeValue == "C0034375"
    # Content items carry the caveat in ASCII: dcmjs (OHIF) decodes nested
    # text as Latin-1, so the em dash would come out garbled there.
    assert PLAIN_WARNING == "DEMO WEIGHTS - NOT FOR CLINICAL USE"
    assert any(PLAIN_WARNING in c for c in comments)
    assert groups_of(demo)
    for group in groups_of(demo):
        # after the label comment, which names the finding
        assert [i.TextValue for i in item(group, "121106", "TEXT")][1:] == [PLAIN_WARNING]

    real = sr_of([(ds, make_result(ds, REAL))], REAL, 1)
    text = re.sub(r"\s+", " ", str(real))
    assert "DEMO" not in text
    assert all(len(item(group, "121106")) == 1 for group in groups_of(real))


def test_sr_declares_utf8_only_when_a_value_needs_it(tmp_path):
    ascii_source = make_dx()
    del ascii_source.SpecificCharacterSet
    real = sr_of([(ascii_source, make_result(ascii_source, REAL))], REAL, 1)
    assert "SpecificCharacterSet" not in real  # default repertoire: every value is ASCII
    # the demo caveat is written in ASCII everywhere in the SR
    demo = sr_of([(ascii_source, make_result(ascii_source, DEMO))], DEMO, 1)
    assert "SpecificCharacterSet" not in demo
    accented = make_dx(patient_name="Müller^Zoë")
    named = sr_of([(accented, make_result(accented, REAL))], REAL, 1)
    assert named.SpecificCharacterSet == "ISO_IR 192"
    path = write(named, tmp_path / "named.dcm")
    assert str(pydicom.dcmread(path).PatientName) == "Müller^Zoë"
    for sr in (real, demo, named):
        text = [e.value for e in sr.iterall() if e.VR in ("ST", "LT", "UT", "LO", "SH") and isinstance(e.value, str)]
        assert all(v.isascii() for v in text)
        assert_valid_dicom(write(sr, tmp_path / "sr.dcm"))


def test_probability_is_written_tidily():
    ds = make_dx()
    result = make_result(ds, REAL, positives={"Edema": 0.12000000000000001})
    [edema] = groups_of(sr_of([(ds, result)], REAL, 1))
    assert item(edema, "122157")[0].MeasuredValueSequence[0].NumericValue.original_string == "0.12"
    assert codes.DCM.Probability.value == "122157"
