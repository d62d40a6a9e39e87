"""Heatmap Secondary Capture builder: validity, identity, rendering and the burned-in caveat."""
from __future__ import annotations

import copy
import datetime as dt

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.uid import ExplicitVRLittleEndian

from dicom_factory import make_dx, png_pixels
from inference.types import CHESTXRAY14, DEMO_WARNING
from node.outputs import uids
from node.outputs.banner import (
    WARNING_BACKGROUND,
    BannerLine,
    caption_font,
    drawable,
    finding_banner,
    has_glyph,
    render_banner,
    summary_banner,
)
from node.outputs.sc import build_heatmap_captures, display_rendition, jet
from node.outputs.text import plain
from scored_factory import ISSUED, scored_study
from test_outputs_sr import DEMO, REAL, assert_valid_dicom, make_result, siim, sloppy_dx, write


def captures_of(source, result, model, *, issued: dt.datetime = ISSUED, **options):
    """build_heatmap_captures as the encode stage calls it for one source image."""
    study = scored_study([(source, result)], model=model, issued=issued)
    return build_heatmap_captures(source, study.images[0], display_rendition(result.image), study, **options)


def image_part(sc, source_rows: int) -> np.ndarray:
    """The rendered radiograph below the caption band."""
    return sc.pixel_array[-source_rows:]


def band(sc, source_rows: int) -> np.ndarray:
    return sc.pixel_array[: int(sc.Rows) - source_rows]


@pytest.mark.parametrize("kind", ["siim_mono1", "dx16", "dx16_mono1"])
def test_captures_pass_dciodvfy(tmp_path, kind):
    source = {"siim_mono1": siim, "dx16": make_dx, "dx16_mono1": lambda: make_dx(photometric="MONOCHROME1")}[kind]()
    model = DEMO if kind != "dx16" else REAL
    captures = captures_of(source, make_result(source, model), model)
    assert len(captures) == 3  # summary + 2 positives
    for sc in captures:
        path = write(sc, tmp_path / f"{sc.SOPInstanceUID}.dcm")
        assert_valid_dicom(path)
        back = pydicom.dcmread(path)
        assert back.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert back.PhotometricInterpretation == "RGB" and back.SamplesPerPixel == 3
        assert back.pixel_array.shape == (back.Rows, back.Columns, 3)


def test_capture_identity_and_references():
    source = make_dx()
    result = make_result(source, REAL)
    captures = captures_of(source, result, REAL, first_instance_number=11)
    kinds = ["summary", "Pneumothorax", "Effusion"]  # summary first, then CHESTXRAY14 order
    assert [sc.SOPInstanceUID for sc in captures] == [
        uids.sc_instance_uid(source.SOPInstanceUID, REAL.ref, kind) for kind in kinds
    ]
    assert [sc.InstanceNumber for sc in captures] == [11, 12, 13]
    for sc in captures:
        assert sc.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
        assert sc.SeriesInstanceUID == uids.series_uid(source.StudyInstanceUID, REAL.ref, "sc")
        assert sc.SeriesNumber == 9902
        assert sc.SeriesDescription == "Carina AI heatmaps"
        assert sc.StudyInstanceUID == source.StudyInstanceUID
        assert (sc.PatientID, sc.PatientName, sc.AccessionNumber) == (
            source.PatientID, source.PatientName, source.AccessionNumber)
        assert sc.BurnedInAnnotation == "YES"
        assert sc.ImageLaterality == "U" and "Laterality" not in sc
        assert list(sc.PatientOrientation) == list(source.PatientOrientation)
        [reference] = sc.SourceImageSequence
        assert reference.ReferencedSOPInstanceUID == source.SOPInstanceUID
        assert reference.ReferencedSOPClassUID == source.SOPClassUID
        assert reference.PurposeOfReferenceCodeSequence[0].CodeValue == "121322"
        algorithm = sc.ContributingEquipmentSequence[-1]
        assert algorithm.PurposeOfReferenceCodeSequence[0].CodeValue == "Newcode1"
        assert algorithm.DeviceUID == uids.device_uid(REAL.name, REAL.version, REAL.weights_sha256)
        assert algorithm.SoftwareVersions == REAL.version
        assert "AI-GENERATED" in sc.ImageComments
    assert "Pneumothorax" in captures[1].ImageComments and "Pneumothorax" in captures[1].DerivationDescription


def test_cr_source_without_orientation_gets_an_empty_one_and_is_not_touched():
    source = siim()
    before = copy.deepcopy(source)
    [summary, *_] = captures_of(source, make_result(source, DEMO), DEMO)
    assert source == before
    assert summary.PatientOrientation == ""
    assert summary.ImageLaterality == "U"


def test_captures_from_sloppy_headers_are_valid(tmp_path):
    source = sloppy_dx()
    for sc in captures_of(source, make_result(source, REAL), REAL):
        assert sc.PatientSex == "M"
        assert_valid_dicom(write(sc, tmp_path / f"{sc.InstanceNumber}.dcm"))


def test_demo_caveat_is_burned_into_the_banner():
    source = make_dx()
    demo = captures_of(source, make_result(source, DEMO), DEMO)
    real = captures_of(source, make_result(source, REAL), REAL)
    rows = int(source.Rows)

    for demo_sc, real_sc in zip(demo, real):
        # the radiograph and its overlay are identical; only the band above differs
        assert np.array_equal(image_part(demo_sc, rows), image_part(real_sc, rows))
        demo_band, real_band = band(demo_sc, rows), band(real_sc, rows)
        assert demo_band.shape[0] > real_band.shape[0] > 0
        red = np.all(demo_band == WARNING_BACKGROUND, axis=-1)
        assert red.sum() > demo_band.shape[1] * 5  # a full-width red strip
        assert not np.all(real_band == WARNING_BACKGROUND, axis=-1).any()
        assert DEMO_WARNING in demo_sc.ImageComments and "DEMO" not in real_sc.ImageComments

    assert demo[0].SeriesDescription == f"Carina AI heatmaps - {plain(DEMO_WARNING)}"
    assert len(demo[0].SeriesDescription) <= 64

    result = make_result(source, DEMO)
    for lines in (summary_banner(result.findings, DEMO), finding_banner(result.positives[0], DEMO)):
        texts = [line.text for line in lines]
        assert DEMO_WARNING in texts
        assert any("AI-GENERATED" in t and DEMO.name in t and DEMO.version in t for t in texts)
    pneumothorax = [line.text for line in finding_banner(result.positives[0], DEMO)]
    assert "Pneumothorax: probability 0.91 (above operating threshold 0.50)" in pneumothorax
    assert not any("DEMO" in line.text for line in summary_banner(make_result(source, REAL).findings, REAL))


def test_banner_text_only_uses_glyphs_the_font_has_or_draws_the_dash():
    font = caption_font(1024)
    # The caveat keeps its em dash: the renderer draws it as a bar.
    assert drawable(DEMO_WARNING, font) == DEMO_WARNING
    text = drawable("Pleural effusion … ≥ 0.5", font)
    assert all(char.isascii() or has_glyph(font, char) for char in text)
    assert not has_glyph(font, "\uffff")
    assert has_glyph(font, "A")


def test_em_dash_is_drawn_not_boxed():
    with_dash = render_banner([BannerLine("A \u2014 B")], 600)
    with_hyphen = render_banner([BannerLine("A - B")], 600)
    with_box = render_banner([BannerLine("A \uffff B")], 600)
    assert with_dash.shape == with_hyphen.shape
    # Wider than a hyphen (a real dash), and not the font's missing-glyph box.
    assert (with_dash > 128).sum() > (with_hyphen > 128).sum()
    assert not np.array_equal(with_dash, with_box)


def test_banner_wraps_long_lines_and_scales_with_width():
    long_line = [BannerLine("word " * 60)]
    narrow, wide = render_banner(long_line, 400), render_banner(long_line, 1600)
    assert narrow.shape[1] == 400 and wide.shape[1] == 1600
    assert narrow.shape[0] > render_banner([BannerLine("word")], 400).shape[0]  # wrapped onto more lines
    assert caption_font(1600).size > caption_font(400).size


def test_overlay_keeps_anatomy_grey_where_the_map_is_cold():
    source = make_dx()
    result = make_result(source, REAL)
    [_, pneumothorax, _] = captures_of(source, result, REAL)
    grey = result.image.display_uint8()
    picture = image_part(pneumothorax, grey.shape[0])
    heat = result.heatmaps.at_source(CHESTXRAY14.index("Pneumothorax"))
    cold = heat == 0
    x1, y1, x2, y2 = result.positives[0].regions[0].bbox
    cold[max(0, y1 - 5) : y2 + 5, max(0, x1 - 5) : x2 + 5] = False  # leave the outline out
    assert cold.sum() > grey.size // 4
    assert np.array_equal(picture[cold], np.repeat(grey[..., None], 3, axis=-1)[cold])
    hot = heat > 0.9
    assert hot.any() and (picture[hot][:, 0].astype(int) - picture[hot][:, 2].astype(int)).mean() > 20  # reddish
    outline = picture[y1, x1 + (x2 - x1) // 2]
    assert outline.tolist() == [0, 255, 0]  # the region's top edge is drawn in green


def test_no_positive_gives_only_a_plain_summary():
    source = make_dx()
    result = make_result(source, REAL, positives={})
    [summary] = captures_of(source, result, REAL)
    picture = image_part(summary, int(source.Rows))
    assert np.array_equal(picture[..., 0], picture[..., 1]) and np.array_equal(picture[..., 1], picture[..., 2])
    assert "No finding above its operating threshold" in summary.ImageComments


def test_large_sources_are_downscaled():
    big = np.asarray(Image.fromarray(png_pixels()).resize((2600, 3100)))  # width x height
    source = make_dx(big)
    captures = captures_of(source, make_result(source, REAL), REAL)
    for sc in captures:
        assert int(sc.Columns) == round(2600 * 2048 / 3100)  # longest side (rows) now 2048
        assert 2048 < int(sc.Rows) < 2048 + 400  # the image plus the caption band
        assert "downscaled" in sc.DerivationDescription


def test_jet_ramp_endpoints():
    ramp = jet(np.array([0.0, 0.5, 1.0]))
    assert ramp[0].tolist() == [0, 0, 128] and ramp[2].tolist() == [128, 0, 0]
    assert ramp[1][1] == 255  # green at mid-scale


def test_captures_are_deterministic(tmp_path):
    source = siim()
    result = make_result(source, DEMO)
    first = captures_of(source, result, DEMO)
    second = captures_of(source, result, DEMO)
    for a, b in zip(first, second):
        assert write(a, tmp_path / "a.dcm").read_bytes() == write(b, tmp_path / "b.dcm").read_bytes()
