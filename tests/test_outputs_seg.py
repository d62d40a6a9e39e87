"""DICOM SEG builder: validity (dciodvfy), segments, pixels, codes, determinism
and the demo caveat. What Cornerstone3D's SEG adapter makes of it is
tests/test_ohif_seg.py."""
from __future__ import annotations

import datetime as dt
import types

import highdicom
import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from dicom_factory import make_dx
from inference.types import DEMO_WARNING
from node.outputs import uids
from node.outputs.regions import mask
from node.outputs.seg import DEFAULT_ORIENTATION, build_segmentation
from node.outputs.sr import tracking_uid
from node.outputs.text import plain
from node.terminology import load_terminology
from scored_factory import scored_study
from test_outputs_sr import DEMO, REAL, assert_valid_dicom, box_region, make_result, siim, sloppy_dx, write

SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"


def seg_of(source, result, model=REAL, **options):
    study = scored_study([(source, result)], model=model)
    return build_segmentation(source, study.images[0], study, **options)


def with_frame_of_reference(ds):
    ds.FrameOfReferenceUID = generate_uid()
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    ds.ImagePositionPatient = [0, 0, 0]
    ds.PixelSpacing = list(ds.ImagerPixelSpacing)
    ds.SliceThickness = 1
    return ds


def segment_pixels(seg) -> dict[int, int]:
    """Pixels per segment number, read back from the stored frames."""
    frames = seg.pixel_array.reshape(int(seg.NumberOfFrames), int(seg.Rows), int(seg.Columns))
    numbers = [f.SegmentIdentificationSequence[0].ReferencedSegmentNumber for f in seg.PerFrameFunctionalGroupsSequence]
    return {number: int(frame.sum()) for number, frame in zip(numbers, frames)}


@pytest.mark.parametrize("source", ["dx", "cr_jpeg_mono1", "dx_with_frame_of_reference", "sloppy"])
def test_seg_passes_dciodvfy(tmp_path, source):
    ds = {"dx": make_dx, "cr_jpeg_mono1": siim, "sloppy": sloppy_dx,
          "dx_with_frame_of_reference": lambda: with_frame_of_reference(make_dx())}[source]()
    for model in (REAL, DEMO):
        seg = seg_of(ds, make_result(ds, model), model)
        path = write(seg, tmp_path / f"{source}-{model.version}.dcm")
        assert_valid_dicom(path)  # 0 errors, only explained warnings
        back = pydicom.dcmread(path)
        assert back.SOPClassUID == SEG_CLASS and back.SegmentationType == "BINARY"
        assert back.StudyInstanceUID == ds.StudyInstanceUID and back.PatientID == ds.PatientID
        [source_ref] = back.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0].SourceImageSequence
        assert source_ref.ReferencedSOPInstanceUID == ds.SOPInstanceUID


def test_one_segment_per_drawn_finding_coded_from_the_terminology():
    ds = make_dx()
    result = make_result(ds, REAL, positives={"Pneumothorax": 0.9, "Effusion": 0.7, "Mass": 0.8},
                         regions={"Mass": ()})  # positive without a region: nothing to segment
    seg = seg_of(ds, result)
    terms = load_terminology()
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["Pneumothorax", "Pleural effusion"]
    for number, (segment, label) in enumerate(zip(seg.SegmentSequence, ["Pneumothorax", "Effusion"]), start=1):
        concept = terms.finding(label).dicom
        assert segment.SegmentNumber == number
        kind = segment.SegmentedPropertyTypeCodeSequence[0]
        assert (kind.CodeValue, kind.CodingSchemeDesignator) == (concept.code, concept.scheme)
        category = segment.SegmentedPropertyCategoryCodeSequence[0]
        assert (category.CodeValue, category.CodingSchemeDesignator) == ("49755003", "SCT")
        assert segment.SegmentAlgorithmType == "AUTOMATIC" and segment.SegmentAlgorithmName == REAL.name
        algorithm = segment.SegmentationAlgorithmIdentificationSequence[0]
        assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == (REAL.name, REAL.version)
        assert algorithm.AlgorithmFamilyCodeSequence[0].CodeValue == "123110"
        # the SR's tracking UID: segment and SR measurement group are one finding
        assert segment.TrackingUID == tracking_uid(ds.SOPInstanceUID, REAL.ref, label)
        assert "DEMO" not in segment.SegmentDescription
    assert seg.SOPInstanceUID == uids.seg_instance_uid(ds.SOPInstanceUID, REAL.ref)
    assert seg.SeriesInstanceUID == uids.series_uid(ds.StudyInstanceUID, REAL.ref, "seg")
    assert (seg.SeriesNumber, seg.SeriesDescription, seg.Modality) == (9903, "Carina AI regions (SEG)", "SEG")


def test_no_drawn_finding_gives_no_seg():
    ds = make_dx()
    assert seg_of(ds, make_result(ds, REAL, positives={})) is None
    assert seg_of(ds, make_result(ds, REAL, positives={"Nodule": 0.8}, regions={"Nodule": ()})) is None


def test_segment_pixels_are_the_region_polygons_at_source_resolution():
    ds = make_dx()
    rows, cols = int(ds.Rows), int(ds.Columns)
    box = box_region(10, 20, 30, 15)  # a 30 x 15 outline between pixel centres: 31 x 16 pixels
    two = (box_region(100, 100, 9, 9), box_region(150, 120, 4, 19))  # 100 + 100 pixels, apart
    result = make_result(ds, REAL, positives={"Nodule": 0.8, "Mass": 0.9}, regions={"Nodule": (box,), "Mass": two})
    seg = seg_of(ds, result)
    assert (int(seg.Rows), int(seg.Columns)) == (rows, cols)
    # Mass comes after Nodule in CHESTXRAY14 order
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["Nodule", "Mass"]
    assert segment_pixels(seg) == {1: 31 * 16, 2: 200}
    nodule = seg.pixel_array.reshape(-1, rows, cols)[0].astype(bool)
    assert np.array_equal(nodule, mask(result.findings[11], rows, cols))
    assert nodule[20:36, 10:41].all() and nodule.sum() == 31 * 16


def test_a_source_without_frame_of_reference_gets_the_plane_orientation_viewers_assume():
    ds = make_dx()
    seg = seg_of(ds, make_result(ds, REAL))
    assert "FrameOfReferenceUID" not in seg
    shared = seg.SharedFunctionalGroupsSequence[0]
    assert [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient] == list(DEFAULT_ORIENTATION)
    assert list(seg.PatientOrientation) == list(ds.PatientOrientation)

    spatial = with_frame_of_reference(make_dx())
    seg = seg_of(spatial, make_result(spatial, REAL))
    assert seg.FrameOfReferenceUID == spatial.FrameOfReferenceUID
    orientation = seg.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient
    assert [float(v) for v in orientation] == [1, 0, 0, 0, 0, -1]


def test_demo_caveat_is_in_the_seg_in_ascii():
    ds = make_dx()
    seg = seg_of(ds, make_result(ds, DEMO), DEMO)
    caveat = plain(DEMO_WARNING)
    assert seg.SeriesDescription == f"Carina AI regions - {caveat}"
    assert caveat in seg.ContentDescription and caveat in seg.ImageComments
    assert all(s.SegmentDescription.endswith(caveat) for s in seg.SegmentSequence)
    assert all(str(e.value).isascii() for e in seg.iterall() if e.VR in ("LO", "ST", "LT", "UT", "SH"))
    assert "SpecificCharacterSet" not in seg  # nothing needs more than ASCII


def shifted_clock(monkeypatch, when: dt.datetime) -> None:
    """Make highdicom's wall clock read `when`, so a value taken from it would show."""
    fake = types.ModuleType("datetime")
    fake.__dict__.update(dt.__dict__)

    class Clock(dt.datetime):
        @classmethod
        def now(cls, tz=None):
            return when

    fake.datetime = Clock
    for module in (highdicom.base, highdicom.pr.content):
        monkeypatch.setattr(module, "datetime", fake)


def test_seg_is_deterministic(tmp_path, monkeypatch):
    ds = make_dx()
    result = make_result(ds, DEMO, positives={"Pneumothorax": 0.9, "Mass": 0.8})
    written = []
    for index, when in enumerate((dt.datetime(2030, 1, 1, 8), dt.datetime(2031, 6, 2, 17, 5, 9))):
        shifted_clock(monkeypatch, when)
        written.append(write(seg_of(ds, result, DEMO), tmp_path / f"{index}.dcm").read_bytes())
    assert written[0] == written[1]
    assert b"20300101" not in written[0] and b"20310602" not in written[0]  # neither clock date
