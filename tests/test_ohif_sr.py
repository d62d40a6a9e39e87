"""Issue 9: Carina's TID 1500 SR, opened by OHIF 3.13's own SR code and
Cornerstone3D's SR adapter (the versions OHIF pins), headless in Node.

tests/js/ohif_sr_check.mjs runs the SR SOP class handler of
@ohif/extension-cornerstone-dicom-sr (getDisplaySetsFromSeries, then load()
with the source images' display sets active) and reports the DICOMSRDisplay
annotations load() adds: what the SR viewport draws. It also runs
MeasurementReport.generateToolState, which OHIF's hydration calls. The bar:
load() does not throw, and exactly the positive findings that have a region
are drawn, on their own source image, labelled with the finding, and hydrate
into as many tool states.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_factory import SIIM_MONO1, make_dx, small_chest_pixels, write
from ohif_js import run
from pipeline_rig import DEMO, PipelineRig, image_result
from scored_factory import headers, scored_study
from sqlalchemy import select

from node.db import Output
from node.outputs.sr import build_sr
from node.terminology import load_terminology

def sr_of(sources):
    """build_sr over [(source, ImageResult)] as the encode stage calls it."""
    return build_sr(scored_study(sources, model=DEMO), headers(sources))


FOUR_POSITIVES = {"Pneumothorax": 0.91, "Effusion": 0.73, "Cardiomegaly": 0.66, "Mass": 0.58}


def sr_regions(path: Path) -> dict[str, dict]:
    """Per Tracking Unique Identifier, what the SR says should be drawn: the
    label (first Comment), the image the SCOORD is SELECTED FROM, its points."""
    sr = pydicom.dcmread(path)
    [measurements] = [i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "126010"]
    regions = {}
    for group in measurements.get("ContentSequence", []):
        by_code = {i.ConceptNameCodeSequence[0].CodeValue: i for i in reversed(group.ContentSequence)}
        first_num = next(i for i in group.ContentSequence if i.ValueType == "NUM")
        [scoord] = [i for i in first_num.ContentSequence if i.ValueType == "SCOORD"]
        regions[by_code["112040"].UID] = {
            "label": by_code["121106"].TextValue,  # reversed: the first Comment wins
            "sop": scoord.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID,
            "points": np.asarray(scoord.GraphicData, dtype=np.float64).reshape(-1, 2),
        }
    return regions


def check_ohif(sr_path: Path, images: list[Path], expected: dict[str, set[str]]) -> dict:
    """Run OHIF's SR code; `expected` maps each source SOP Instance UID to the
    finding labels that must be drawn on it. Returns the harness JSON."""
    result = run("ohif_sr_check.mjs", sr_path, *images)
    ohif, cs3d = result["ohif"], result["cornerstone3d"]
    count = sum(len(labels) for labels in expected.values())

    assert [d["isImagingMeasurementReport"] for d in ohif["displaySets"]] == [True]
    assert ohif["loadThrew"] is False, ohif["loadError"]
    assert ohif["measurementCount"] == count
    drawn = [a for a in ohif["drawn"] if a["fromThisSR"] and a["onActiveDisplaySet"]]
    assert len(drawn) == len(ohif["drawn"]) == count
    drawn_labels = {sop: set() for sop in expected}
    regions = sr_regions(sr_path)
    for annotation in drawn:
        label = annotation["textLines"][0].removesuffix(": ")
        drawn_labels.setdefault(annotation["referencedSOPInstanceUID"], set()).add(label)
        region = regions[annotation["trackingUniqueIdentifier"]]
        assert (label, annotation["referencedSOPInstanceUID"]) == (region["label"], region["sop"])
        assert annotation["graphicType"] == "POLYLINE"
        # drawn where the SCOORD says (image -> world -> image round trip)
        assert np.asarray(annotation["imagePoints"]) == pytest.approx(region["points"], abs=1e-2)
    assert drawn_labels == expected
    assert ohif["isRehydratable"] is (count > 0)

    assert cs3d["threw"] is False, cs3d["error"]
    states = cs3d["toolStates"]
    assert len(states) == count
    assert {s["toolType"] for s in states} <= {"PlanarFreehandROI"}
    hydrated = {sop: set() for sop in expected}
    for state in states:
        hydrated.setdefault(state["referencedSOPInstanceUID"], set()).add(state["label"])
        region = regions[state["trackingUniqueIdentifier"]]
        assert state["label"] == region["label"]
        assert state["closed"] is True and state["pointCount"] == len(region["points"]) - 1
    assert hydrated == expected
    # neither library complained (e.g. "skipping annotation", "Unable to generate tool state")
    assert result["warnings"] == []
    return result


def display(label: str) -> str:
    return load_terminology().finding(label).display


def test_ohif_draws_the_four_positive_findings_of_an_encoded_study(tmp_path):
    # The study: 4 positive findings, 10 negatives, through the real encode stage.
    rig = PipelineRig(tmp_path)
    try:
        study_id, ds = rig.add_study(FOUR_POSITIVES)
        rig.encode(study_id)
        with rig.db.session() as s:
            [sr_path] = s.scalars(select(Output.path).where(Output.study_id == study_id, Output.kind == "sr")).all()
        source = rig.ctx.instances_dir / f"{ds.SOPInstanceUID}.dcm"
        check_ohif(Path(sr_path), [source], {ds.SOPInstanceUID: {display(label) for label in FOUR_POSITIVES}})
    finally:
        rig.close()


def test_ohif_draws_regions_on_their_own_image_and_skips_region_less_findings(tmp_path):
    pa = make_dx(small_chest_pixels(96), view_position="PA")
    ap = make_dx(small_chest_pixels(96), view_position="AP", study_uid=pa.StudyInstanceUID)
    pa_result = image_result(pa, {"Pneumothorax": 0.91, "Effusion": 0.73, "Cardiomegaly": 0.8})
    # a positive finding whose heatmap gave no region: kept in the SR, not drawn
    pa_result = dataclasses.replace(
        pa_result,
        findings=tuple(
            dataclasses.replace(f, regions=()) if f.label == "Cardiomegaly" else f for f in pa_result.findings
        ),
    )
    ap_result = image_result(ap, {"Mass": 0.7, "Nodule": 0.6})
    sr = sr_of([(pa, pa_result), (ap, ap_result)])
    sr_path = write(sr, tmp_path / "sr.dcm")
    images = [write(pa, tmp_path / "pa.dcm"), write(ap, tmp_path / "ap.dcm")]

    check_ohif(
        sr_path,
        images,
        {
            pa.SOPInstanceUID: {display("Pneumothorax"), display("Effusion")},
            ap.SOPInstanceUID: {display("Mass"), display("Nodule")},
        },
    )
    # Cardiomegaly is still reported: Present on the PA, Absent on the AP, in
    # the report's qualitative evaluations
    [container] = [i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "C0034375"]
    cardiomegaly = load_terminology().finding("Cardiomegaly").dicom.code
    verdicts = {
        next(c for c in i.ContentSequence if c.ValueType == "IMAGE").ReferencedSOPSequence[0].ReferencedSOPInstanceUID:
        i.ConceptCodeSequence[0].CodeMeaning
        for i in container.ContentSequence
        if i.ValueType == "CODE" and i.ConceptNameCodeSequence[0].CodeValue == cardiomegaly
    }
    assert verdicts == {pa.SOPInstanceUID: "Present", ap.SOPInstanceUID: "Absent"}


def test_ohif_opens_the_sr_of_a_normal_study(tmp_path):
    ds = make_dx(small_chest_pixels(96))
    sr = sr_of([(ds, image_result(ds, {}))])
    result = check_ohif(write(sr, tmp_path / "sr.dcm"), [write(ds, tmp_path / "dx.dcm")], {ds.SOPInstanceUID: set()})
    assert result["ohif"]["drawn"] == [] and result["cornerstone3d"]["toolStates"] == []


def test_ohif_draws_on_a_jpeg_cr_without_orientation(tmp_path):
    # The SIIM sample: CR, JPEG Baseline, MONOCHROME1, PixelSpacing only, no PatientOrientation values.
    ds = pydicom.dcmread(SIIM_MONO1)
    sr = sr_of([(ds, image_result(ds, {"Pneumothorax": 0.9, "Nodule": 0.7}))])
    source = tmp_path / "cr.dcm"
    source.write_bytes(SIIM_MONO1.read_bytes())
    expected = {ds.SOPInstanceUID: {display("Pneumothorax"), display("Nodule")}}
    check_ohif(write(sr, tmp_path / "sr.dcm"), [source], expected)
