"""Issue 9: Carina's DICOM SEG, loaded by Cornerstone3D's SEG adapter (the
version OHIF 3.13 pins), headless in Node.

tests/js/seg_check.mjs loads a SEG against its source image(s) and reports
the segments and the labelmap pixels per segment. The bar: Carina's SEG (as
the encode stage writes it, for a DX and a CR without a Frame of Reference)
loads without an error, has one segment per positive finding with a region,
labelled with the finding, on its source image, with exactly the pixels of
the finding's regions. The first test checks the harness itself on a
hand-made SEG whose geometry is known."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from dicom_factory import SIIM_MONO1, make_dx, small_chest_pixels, write
from highdicom.seg import SegmentAlgorithmTypeValues, SegmentDescription, Segmentation, SegmentationTypeValues
from ohif_js import run
from pipeline_rig import DEMO, PipelineRig, image_result
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid
from scored_factory import scored_study
from sqlalchemy import select
from test_outputs_sr import box_region, make_result

from node import results
from node.db import Output
from node.outputs.regions import drawable_findings, mask
from node.outputs.seg import build_segmentation
from node.terminology import load_terminology

FOUR_POSITIVES = {"Pneumothorax": 0.91, "Effusion": 0.73, "Cardiomegaly": 0.66, "Mass": 0.58}


def test_cornerstone_seg_adapter_reads_segments_and_pixels(tmp_path):
    ds = make_dx(small_chest_pixels(64))
    # Cornerstone3D's SEG adapter compares the SEG's plane orientation with the
    # image's, so this source carries a patient frame of reference.
    ds.FrameOfReferenceUID = generate_uid()
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [0, 0, 0]
    ds.PixelSpacing = list(ds.ImagerPixelSpacing)
    ds.SliceThickness = 1
    mask = np.zeros((1, ds.Rows, ds.Columns, 2), dtype=bool)
    mask[0, 10:20, 10:30, 0] = True  # 200 pixels
    mask[0, 40:50, 5:15, 1] = True  # 100 pixels
    algorithm = hd.AlgorithmIdentificationSequence(
        name="test", version="1", family=codes.cid7162.ArtificialIntelligence
    )
    segments = [
        SegmentDescription(
            segment_number=number,
            segment_label=label,
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=codes.SCT.Lesion,
            algorithm_type=SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
        )
        for number, label in ((1, "Pneumothorax"), (2, "Mass"))
    ]
    seg = Segmentation(
        source_images=[ds],
        pixel_array=mask,
        segmentation_type=SegmentationTypeValues.BINARY,
        segment_descriptions=segments,
        series_instance_uid=hd.UID(),
        series_number=99,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="Carina",
        manufacturer_model_name="test",
        software_versions="1",
        device_serial_number="1",
    )
    seg_path = tmp_path / "seg.dcm"
    seg.save_as(seg_path)

    result = run("seg_check.mjs", seg_path, write(ds, tmp_path / "dx.dcm"))
    assert result["threw"] is False, result["error"]
    assert [(s["segmentNumber"], s["label"]) for s in result["segments"]] == [(1, "Pneumothorax"), (2, "Mass")]
    [labelmap] = result["labelmaps"]
    assert labelmap["referencedSOPInstanceUID"] == ds.SOPInstanceUID
    assert (labelmap["rows"], labelmap["columns"]) == (ds.Rows, ds.Columns)
    assert labelmap["pixelsPerSegment"] == {"1": 200, "2": 100}


def check_carina_seg(seg_path: Path, source: Path, scored_image) -> dict:
    """Run the adapter on a Carina SEG; what it reads must be the drawn findings
    of `scored_image`, each with exactly its regions' pixels."""
    result = run("seg_check.mjs", seg_path, source)
    assert result["threw"] is False, result["error"]
    assert result["warnings"] == []
    drawn = drawable_findings(scored_image.findings)
    terms = load_terminology()
    assert [(s["segmentNumber"], s["label"]) for s in result["segments"]] == [
        (number, terms.finding(f.label).display) for number, f in enumerate(drawn, start=1)
    ]
    assert [s["type"] for s in result["segments"]] == [terms.finding(f.label).dicom.display for f in drawn]
    header = pydicom.dcmread(source, stop_before_pixels=True)
    pixels: Counter = Counter()
    for labelmap in result["labelmaps"]:  # overlapping segments come as several layers
        assert labelmap["referencedSOPInstanceUID"] == header.SOPInstanceUID
        assert (labelmap["rows"], labelmap["columns"]) == (header.Rows, header.Columns)
        pixels.update({int(k): v for k, v in labelmap["pixelsPerSegment"].items()})
    expected = {n: int(mask(f, int(header.Rows), int(header.Columns)).sum()) for n, f in enumerate(drawn, start=1)}
    assert dict(pixels) == expected
    assert all(count > 0 for count in expected.values())
    return result


def test_cornerstone_loads_the_encoded_seg_of_a_four_positive_study(tmp_path):
    rig = PipelineRig(tmp_path)
    try:
        study_id, ds = rig.add_study(FOUR_POSITIVES)
        rig.encode(study_id)
        with rig.db.session() as s:
            [seg_path] = s.scalars(select(Output.path).where(Output.study_id == study_id, Output.kind == "seg")).all()
            scored = results.load(s, study_id, 1)
        source = rig.ctx.instances_dir / f"{ds.SOPInstanceUID}.dcm"
        result = check_carina_seg(Path(seg_path), source, scored.images[0])
        assert len(result["segments"]) == 4
        assert result["overlappingSegments"] is True  # the four boxes coincide: one layer each
    finally:
        rig.close()


def test_cornerstone_loads_carina_seg_of_a_jpeg_cr_with_a_region_less_positive(tmp_path):
    # The SIIM sample: CR (as SC), JPEG Baseline, MONOCHROME1, no orientation, no Frame of Reference.
    ds = pydicom.dcmread(SIIM_MONO1)
    source = tmp_path / "cr.dcm"
    source.write_bytes(SIIM_MONO1.read_bytes())
    two = (box_region(100, 100, 59, 49), box_region(600, 500, 79, 99))
    result = make_result(ds, DEMO, positives={"Pneumothorax": 0.9, "Nodule": 0.7, "Mass": 0.8},
                         regions={"Nodule": (), "Mass": two})
    study = scored_study([(ds, result)], model=DEMO)
    seg = build_segmentation(ds, study.images[0], study)
    checked = check_carina_seg(write(seg, tmp_path / "seg.dcm"), source, study.images[0])
    assert [s["label"] for s in checked["segments"]] == ["Pneumothorax", "Mass"]  # Nodule has no region


def test_cornerstone_loads_carina_seg_of_one_image_of_two(tmp_path):
    pa = make_dx(small_chest_pixels(96), view_position="PA")
    ap = make_dx(small_chest_pixels(96), view_position="AP", study_uid=pa.StudyInstanceUID)
    sources = [(pa, image_result(pa, {"Effusion": 0.8})), (ap, image_result(ap, {"Pneumothorax": 0.9, "Mass": 0.7}))]
    study = scored_study(sources, model=DEMO)
    seg = build_segmentation(ap, study.images[1], study, instance_number=2)
    check_carina_seg(write(seg, tmp_path / "seg.dcm"), write(ap, tmp_path / "ap.dcm"), study.images[1])
