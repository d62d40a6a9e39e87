"""The SEG side of the OHIF harness: tests/js/seg_check.mjs loads a DICOM SEG
through Cornerstone3D's SEG adapter (the version OHIF 3.13 pins) against its
source image and reports segments and labelmap pixels. Checked here on a
BINARY SEG whose geometry is known, so the SEG output can rely on it."""
from __future__ import annotations

import highdicom as hd
import numpy as np
from dicom_factory import make_dx, small_chest_pixels, write
from highdicom.seg import SegmentAlgorithmTypeValues, SegmentDescription, Segmentation, SegmentationTypeValues
from ohif_js import run
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid


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
