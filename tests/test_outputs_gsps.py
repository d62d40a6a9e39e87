"""GSPS builder: validity (dciodvfy, dcmtk's dcmpschk), one graphic layer per
drawn finding as dcmtk's presentation-state engine reads it, a grey-scale
pipeline that shows the image as the image itself does, determinism and the
demo caveat."""
from __future__ import annotations

import datetime as dt
import re
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicom_factory import make_dx, png_pixels
from inference.types import DEMO_WARNING
from node.outputs import uids
from node.outputs.gsps import build_presentation_state, layer_name
from node.outputs.regions import outline
from node.outputs.sr import tracking_uid
from node.outputs.text import plain
from node.terminology import load_terminology
from peers import require_tool
from scored_factory import scored_study
from test_outputs_seg import shifted_clock
from test_outputs_sr import DEMO, REAL, assert_valid_dicom, box_region, make_result, siim, sloppy_dx, write

GSPS_CLASS = "1.2.840.10008.5.1.4.1.1.11.1"


def gsps_of(source, result, model=REAL, **options):
    study = scored_study([(source, result)], model=model)
    return build_presentation_state(source, study.images[0], study, **options)


def dcmpschk(path: Path) -> str:
    """dcmtk's presentation state checker; its verdict is the last line."""
    proc = subprocess.run([require_tool("dcmpschk"), str(path)], capture_output=True, text=True, timeout=60)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "Test passed." in out and "E:" not in out, out
    return out


def dcmp2pgm(image: Path, out: Path, state: Path | None = None) -> tuple[bytes, str]:
    """Render `image` through `state` (or the image's own pipeline) with dcmtk; PGM bytes and the -v log."""
    args = [require_tool("dcmp2pgm"), "-v"] + (["-p", str(state)] if state else []) + [str(image), str(out)]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out.read_bytes(), proc.stdout + proc.stderr


@pytest.mark.parametrize("source", ["dx", "cr_jpeg_mono1", "sloppy"])
def test_gsps_passes_dciodvfy_and_dcmpschk(tmp_path, source):
    ds = {"dx": make_dx, "cr_jpeg_mono1": siim, "sloppy": sloppy_dx}[source]()
    for model in (REAL, DEMO):
        path = write(gsps_of(ds, make_result(ds, model), model), tmp_path / f"{source}-{model.version}.dcm")
        assert_valid_dicom(path)
        dcmpschk(path)
        back = pydicom.dcmread(path)
        assert back.SOPClassUID == GSPS_CLASS and back.Modality == "PR"
        assert back.StudyInstanceUID == ds.StudyInstanceUID and back.PatientID == ds.PatientID
        [series] = back.ReferencedSeriesSequence
        assert series.SeriesInstanceUID == ds.SeriesInstanceUID
        assert series.ReferencedImageSequence[0].ReferencedSOPInstanceUID == ds.SOPInstanceUID


def test_one_layer_per_drawn_finding_with_its_outlines_and_label():
    ds = make_dx()
    rows, cols = int(ds.Rows), int(ds.Columns)
    two = (box_region(100, 100, 9, 9), box_region(150, 120, 4, 19))
    result = make_result(ds, REAL, positives={"Pneumothorax": 0.91, "Pleural_Thickening": 0.7, "Mass": 0.8, "Nodule": 0.6},
                         regions={"Mass": two, "Nodule": ()})  # Nodule: positive, no region: not drawn
    gsps = gsps_of(ds, result)
    drawn = [f for f in result.findings if f.positive and f.regions]
    assert [layer.GraphicLayer for layer in gsps.GraphicLayerSequence] == ["PNEUMOTHORAX", "PLEURAL_THICKENI", "MASS"]
    assert [int(layer.GraphicLayerOrder) for layer in gsps.GraphicLayerSequence] == [1, 2, 3]
    assert [a.GraphicLayer for a in gsps.GraphicAnnotationSequence] == [layer_name(f) for f in drawn]
    for annotation, finding in zip(gsps.GraphicAnnotationSequence, drawn):
        display = load_terminology().finding(finding.label).display
        assert annotation.ReferencedImageSequence[0].ReferencedSOPInstanceUID == ds.SOPInstanceUID
        objects = annotation.GraphicObjectSequence
        assert len(objects) == len(finding.regions)
        for graphic, region in zip(objects, finding.regions):
            assert (graphic.GraphicType, graphic.GraphicAnnotationUnits, graphic.GraphicFilled) == ("POLYLINE", "PIXEL", "N")
            # the SR's SCOORD outline, point for point
            assert np.allclose(np.asarray(graphic.GraphicData).reshape(-1, 2), outline(region, rows, cols))
            assert graphic.TrackingUID == tracking_uid(ds.SOPInstanceUID, REAL.ref, finding.label)
        [text] = annotation.TextObjectSequence
        assert text.UnformattedTextValue == f"{display} (AI {finding.probability:.2f})"
        assert text.AnchorPointAnnotationUnits == "PIXEL"
    assert gsps.SOPInstanceUID == uids.gsps_instance_uid(ds.SOPInstanceUID, REAL.ref)
    assert gsps.SeriesInstanceUID == uids.series_uid(ds.StudyInstanceUID, REAL.ref, "gsps")
    assert (gsps.SeriesNumber, gsps.SeriesDescription) == (9904, "Carina AI overlays (GSPS)")


def test_dcmtk_reads_the_layers_a_pacs_toggles(tmp_path):
    ds = make_dx(png_pixels()[::4, ::4].copy())
    result = make_result(ds, REAL, positives={"Effusion": 0.7, "Mass": 0.8},
                         regions={"Mass": (box_region(40, 40, 9, 9), box_region(100, 120, 4, 19))})
    state = write(gsps_of(ds, result), tmp_path / "gsps.dcm")
    _, log = dcmp2pgm(write(ds, tmp_path / "dx.dcm"), tmp_path / "out.pgm", state)
    layers = re.findall(r"Graphic Layer #\d+ \[([A-Z_ ]+)\]", log)
    assert layers == ["EFFUSION", "MASS"]
    assert re.findall(r"Number of graphic objects: (\d+)", log) == ["1", "2"]
    assert "Pleural effusion (AI 0.70)" in log and "Recomm. display value: gray 0xffff" in log


@pytest.mark.parametrize(
    "photometric, bits, rescale",
    [("MONOCHROME2", 16, None), ("MONOCHROME1", 12, None), ("MONOCHROME2", 12, (-1024.0, 2.0))],
)
def test_the_gsps_shows_the_image_as_the_image_itself_does(tmp_path, photometric, bits, rescale):
    """A presentation state replaces the image's grey-scale pipeline; rendered
    by dcmtk through ours, the radiograph looks exactly as it does alone."""
    ds = make_dx(png_pixels()[::4, ::4].copy(), photometric=photometric, bits_stored=bits, rescale=rescale)
    image = write(ds, tmp_path / "source.dcm")
    state_ds = gsps_of(ds, make_result(ds, REAL))
    state = write(state_ds, tmp_path / "gsps.dcm")
    alone, _ = dcmp2pgm(image, tmp_path / "alone.pgm")
    through, _ = dcmp2pgm(image, tmp_path / "through.pgm", state)
    assert through == alone
    if photometric == "MONOCHROME1":
        assert state_ds.PresentationLUTShape == "INVERSE"
        state_ds.PresentationLUTShape = "IDENTITY"  # what a naive GSPS does: the radiograph as a negative
        negative, _ = dcmp2pgm(image, tmp_path / "negative.pgm", write(state_ds, tmp_path / "identity.dcm"))
        assert negative != alone


def test_no_drawn_finding_gives_no_gsps():
    ds = make_dx()
    assert gsps_of(ds, make_result(ds, REAL, positives={})) is None


def test_demo_caveat_is_on_every_label_in_ascii():
    ds = make_dx()
    gsps = gsps_of(ds, make_result(ds, DEMO, positives={"Pneumothorax": 0.9, "Mass": 0.8}), DEMO)
    caveat = plain(DEMO_WARNING)
    labels = [a.TextObjectSequence[0].UnformattedTextValue for a in gsps.GraphicAnnotationSequence]
    assert len(labels) == 2 and all(label.endswith(f" - {caveat}") for label in labels)
    assert gsps.SeriesDescription == f"Carina AI overlays - {caveat}" and caveat in gsps.ContentDescription
    assert "SpecificCharacterSet" not in gsps


def test_gsps_is_deterministic(tmp_path, monkeypatch):
    ds = make_dx()
    result = make_result(ds, DEMO)
    written = []
    for index, when in enumerate((dt.datetime(2030, 1, 1, 8), dt.datetime(2031, 6, 2, 17, 5, 9))):
        shifted_clock(monkeypatch, when)
        written.append(write(gsps_of(ds, result, DEMO), tmp_path / f"{index}.dcm").read_bytes())
    assert written[0] == written[1]
    assert b"20300101" not in written[0] and b"20310602" not in written[0]  # neither clock date
