"""Heatmap Secondary Captures: what the model looked at, for viewers that show nothing else.

Per source image: one RGB SC per positive finding (its class activation map)
and one summary SC (all positives' maps combined by pixelwise maximum, every
outline drawn, the findings listed in the banner). Each is the radiograph in
grey, the map blended in a jet-like colormap, the hot region(s) outlined, and
a caption band added above the image (see `banner`).
"""
from __future__ import annotations

import copy
import datetime as dt
import functools

import numpy as np
from highdicom.sc import SCImage
from PIL import Image, ImageDraw
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian
from pydicom.valuerep import DA, TM

from inference.types import CHESTXRAY14, DecodedImage, Finding, Heatmaps, ModelInfo
from node.outputs import uids
from node.outputs.banner import BannerLine, finding_banner, render_banner, summary_banner
from node.outputs.equipment import MANUFACTURER, contributing_equipment, series_description
from node.outputs.sr import source_header
from node.scored_study import ScoredImage, ScoredStudy
from node.terminology import load_terminology

SC_SERIES_NUMBER = 9902
SC_SERIES_BASE = "Carina AI heatmaps"
MAX_SIDE = 2048  # longest side of the rendered image; larger sources are downscaled
HEAT_OPACITY = 0.55  # at full activation; cold areas stay plain grey
OUTLINE = (0, 255, 0)


def display_rendition(image: DecodedImage, max_side: int = MAX_SIDE) -> np.ndarray:
    """The 8-bit grey picture the heatmap SCs are drawn on: the decoded source
    (VOI applied, MONOCHROME1 inverted) downscaled so its longest side is at
    most `max_side`. The infer stage keeps it, so a source is decoded once."""
    grey = image.display_uint8()
    shape = _rendered_shape(grey.shape, max_side)
    if shape != grey.shape:
        grey = np.asarray(Image.fromarray(grey).resize(shape[::-1], Image.Resampling.LANCZOS))
    return grey


def fit_rendition(display: np.ndarray, source_shape: tuple[int, ...], max_side: int) -> np.ndarray:
    """The display rendition at the size SCs of at most `max_side` are drawn at:
    infer keeps one rendition (at MAX_SIDE, for the reading app and the report);
    the SCs may be configured smaller (`outputs.sc.max_side`)."""
    shape = _rendered_shape(tuple(source_shape), max_side)
    if tuple(display.shape) == shape:
        return display
    # reducing_gap: a box reduction first, then Lanczos over the last factor (several times faster).
    return np.asarray(Image.fromarray(display).resize(shape[::-1], Image.Resampling.LANCZOS, reducing_gap=3.0))


def build_heatmap_captures(
    header: Dataset,
    image: ScoredImage,
    display: np.ndarray,
    study: ScoredStudy,
    *,
    manufacturer: str = MANUFACTURER,
    series_number: int = SC_SERIES_NUMBER,
    first_instance_number: int = 1,
    max_side: int = MAX_SIDE,
) -> list[SCImage]:
    """The summary SC first, then one per positive finding in CHESTXRAY14 order.

    `header` is the source image's header and `display` its `display_rendition`.
    All SCs of a study share one series, so when a study has several source
    images pass distinct `first_instance_number`s to keep Instance Numbers
    unique. Dates and times are the study's issue time: a re-run writes the same bytes.
    """
    model = study.model
    header = source_header(header)
    source_shape = tuple(image.heatmaps.source_shape)
    scale = min(1.0, max_side / max(source_shape))
    if tuple(display.shape) != _rendered_shape(source_shape, max_side):
        raise ValueError(f"display rendition {display.shape} does not fit a {source_shape} source at {max_side}")
    grey = display
    heatmaps = _rescaled(image.heatmaps, scale, grey.shape)

    positives = image.positives
    # Each positive's map once, at the rendered size: its own SC and the summary share it.
    heats = {f.label: _upsampled(heatmaps, CHESTXRAY14.index(f.label)) for f in positives}
    if positives:
        summary_heat = np.max(list(heats.values()), axis=0)
    else:
        summary_heat = None  # no positive: colouring a negative map would suggest a finding
    pictures: list[tuple[str, np.ndarray, list[BannerLine], tuple[Finding, ...]]] = [
        ("summary", summary_heat, summary_banner(image.findings, model), positives)
    ]
    for finding in positives:
        pictures.append((finding.label, heats[finding.label], finding_banner(finding, model), (finding,)))

    captures: list[SCImage] = []
    qualifiers = study.output_uid_qualifiers(str(header.SOPInstanceUID))
    for offset, (kind, heat, lines, outlined) in enumerate(pictures):
        picture = _compose(grey, heat, outlined, scale, lines)
        if captures:
            # The SCs of one source differ only in their picture and what names
            # it: copy the first rather than have highdicom build and check the
            # same header again (the same bytes, a fraction of the time).
            captures.append(_sibling(captures[0], header, picture, model, kind, lines, scale,
                                     instance_number=first_instance_number + offset, uid_qualifiers=qualifiers))
            continue
        captures.append(
            _secondary_capture(
                header, picture, model, kind, lines, scale,
                manufacturer=manufacturer,
                series_number=series_number,
                instance_number=first_instance_number + offset,
                created=study.created_local,
                uid_qualifiers=qualifiers,
            )
        )
    return captures


def _sibling(first: SCImage, header: Dataset, picture: np.ndarray, model: ModelInfo, kind: str,
             lines: list[BannerLine], scale: float, *, instance_number: int, uid_qualifiers: tuple[str, ...]) -> SCImage:
    """Another SC of the same source: `first`'s header with this picture, UID, number and captions."""
    sc = copy.deepcopy(first)
    sop_uid = uids.sc_instance_uid(header.SOPInstanceUID, model.ref, kind, *uid_qualifiers)
    sc.SOPInstanceUID = sop_uid
    sc.file_meta.MediaStorageSOPInstanceUID = sop_uid
    sc.InstanceNumber = instance_number
    sc.Rows, sc.Columns = picture.shape[0], picture.shape[1]
    sc.PixelData = np.ascontiguousarray(picture, dtype=np.uint8).tobytes()
    sc.ImageComments = " / ".join(line.text for line in lines)[:10240]
    sc.DerivationDescription = _derivation(kind, scale)
    return sc


def _rendered_shape(shape: tuple[int, ...], max_side: int) -> tuple[int, int]:
    scale = min(1.0, max_side / max(shape))
    return (max(1, round(shape[0] * scale)), max(1, round(shape[1] * scale)))


def jet(values: np.ndarray) -> np.ndarray:
    """uint8 RGB of `values` in 0..1 through a jet-like ramp (blue, cyan, yellow, red)."""
    v = np.clip(values, 0.0, 1.0)[..., None]
    red = np.clip(1.5 - np.abs(4.0 * v - 3.0), 0.0, 1.0)
    green = np.clip(1.5 - np.abs(4.0 * v - 2.0), 0.0, 1.0)
    blue = np.clip(1.5 - np.abs(4.0 * v - 1.0), 0.0, 1.0)
    return np.rint(np.concatenate([red, green, blue], axis=-1) * 255.0).astype(np.uint8)


@functools.lru_cache(maxsize=1)
def _blend_table() -> np.ndarray:
    """uint8 [grey 256, heat level 256, RGB]: the grey blended with the jet colour
    of the heat level at HEAT_OPACITY x heat (cold stays plain grey)."""
    heat = np.arange(256, dtype=np.float32) / 255.0
    alpha = (HEAT_OPACITY * heat)[None, :, None]
    grey = np.arange(256, dtype=np.float32)[:, None, None]
    colours = jet(heat).astype(np.float32)[None, :, :]
    return np.rint(grey * (1.0 - alpha) + colours * alpha).astype(np.uint8)


def _upsampled(heatmaps: Heatmaps, index: int) -> np.ndarray:
    """`Heatmaps.at_source` with Pillow's bilinear filter: the same half-pixel
    interpolation with edge clamping as scikit-image's order-1 resize there
    (equal to ~1e-7 on 0..1 maps), several times faster at 1-2k pixels."""
    row0, col0, side = heatmaps.crop
    full = np.zeros(heatmaps.source_shape, dtype=np.float32)
    small = Image.fromarray(np.ascontiguousarray(heatmaps.maps[index], dtype=np.float32), mode="F")
    full[row0 : row0 + side, col0 : col0 + side] = np.asarray(small.resize((side, side), Image.Resampling.BILINEAR))
    return full


def _rescaled(heatmaps: Heatmaps, scale: float, shape: tuple[int, int]) -> Heatmaps:
    """The same maps with the crop geometry scaled, so `at_source` upsamples the
    7x7 maps straight to the rendered size instead of to a 4k source first."""
    if scale == 1.0:
        return heatmaps
    row0, col0, side = heatmaps.crop
    crop = (round(row0 * scale), round(col0 * scale), max(1, round(side * scale)))
    return Heatmaps(maps=heatmaps.maps, crop=crop, source_shape=shape)


def summary_overlay(image: ScoredImage, display: np.ndarray, *, max_side: int = MAX_SIDE) -> np.ndarray:
    """The summary SC's picture without its caption band: the display rendition
    with the positive findings' maps (pixelwise maximum) blended in and their
    regions outlined; plain grey when nothing is positive. The printable
    report (node/outputs/pdf_report.py) shows it, drawn from the same
    rendition, so the source is not decoded again."""
    source_shape = tuple(image.heatmaps.source_shape)
    scale = min(1.0, max_side / max(source_shape))
    if tuple(display.shape) != _rendered_shape(source_shape, max_side):
        raise ValueError(f"display rendition {display.shape} does not fit a {source_shape} source at {max_side}")
    heatmaps = _rescaled(image.heatmaps, scale, display.shape)
    positives = image.positives
    heat = (np.max([_upsampled(heatmaps, CHESTXRAY14.index(f.label)) for f in positives], axis=0)
            if positives else None)
    return np.asarray(_overlay(display, heat, positives, scale))


def _compose(
    grey: np.ndarray,
    heat: np.ndarray | None,
    outlined: tuple[Finding, ...],
    scale: float,
    lines: list[BannerLine],
) -> np.ndarray:
    picture = _overlay(grey, heat, outlined, scale)
    banner = render_banner(lines, picture.size[0])
    return np.concatenate([banner, np.asarray(picture)], axis=0)


def _overlay(
    grey: np.ndarray,
    heat: np.ndarray | None,
    outlined: tuple[Finding, ...],
    scale: float,
) -> Image.Image:
    if heat is None:
        rgb = np.repeat(grey[..., None], 3, axis=-1)
    else:
        # One lookup per pixel in a (grey, heat) table instead of float
        # arithmetic over the whole picture: the heat is quantised to 256 levels
        # (finer than the 8-bit colours it becomes).
        # np.take over the flattened table: the same values as indexing
        # table[grey, level], about 4x faster (one index array, not two).
        level = np.rint(np.clip(heat, 0.0, 1.0) * 255.0).astype(np.uint8)
        rgb = np.take(_blend_table().reshape(-1, 3), (grey.astype(np.uint16) << 8) | level, axis=0)
    picture = Image.fromarray(np.ascontiguousarray(rgb))
    draw = ImageDraw.Draw(picture)
    width = max(2, round(max(picture.size) / 400))
    for finding in outlined:
        for region in finding.regions:
            # Polygon vertices are array-index positions (pixel centres at
            # integers); map centres through the downscale.
            points = (np.asarray(region.polygon, dtype=np.float64) + 0.5) * scale - 0.5
            draw.line([tuple(p) for p in points.tolist()], fill=OUTLINE, width=width, joint="curve")
    return picture


def _secondary_capture(
    header: Dataset,
    image: np.ndarray,
    model: ModelInfo,
    kind: str,
    lines: list[BannerLine],
    scale: float,
    *,
    manufacturer: str,
    series_number: int,
    instance_number: int,
    created: dt.datetime,
    uid_qualifiers: tuple[str, ...] = (),
) -> SCImage:
    orientation = [str(v) for v in (header.get("PatientOrientation") or []) if str(v)]
    sc = SCImage.from_ref_dataset(
        header,
        image,
        "RGB",
        8,
        "PATIENT",
        series_instance_uid=uids.series_uid(header.StudyInstanceUID, model.ref, "sc"),
        series_number=series_number,
        sop_instance_uid=uids.sc_instance_uid(header.SOPInstanceUID, model.ref, kind, *uid_qualifiers),
        instance_number=instance_number,
        manufacturer=manufacturer,
        # highdicom insists on an orientation for PATIENT images; a header
        # without one gets an empty (Type 2, "unknown") value below.
        patient_orientation=tuple(orientation) if len(orientation) == 2 else ("L", "F"),
        laterality=_series_laterality(header),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description=series_description(SC_SERIES_BASE, model),
        manufacturer_model_name=model.name[:64],
        software_versions=model.version[:64],
        content_date=DA(created.date()),
        content_time=TM(created.time()),
        specific_character_set="ISO_IR 192",  # the caveat's em dash is not Latin-1
    )
    if len(orientation) != 2:
        sc.PatientOrientation = ""
    # A chest is unpaired: Image Laterality "U" satisfies General Series'
    # Laterality condition, whose enumerated values (R, L) have no "unpaired".
    if "Laterality" not in sc:
        sc.ImageLaterality = str(header.get("ImageLaterality") or "U")
    if header.get("BodyPartExamined"):
        sc.BodyPartExamined = header.BodyPartExamined
    sc.ConversionType = "WSD"  # rendered by a workstation, not digitised from film or video
    sc.BurnedInAnnotation = "YES"
    sc.ImageComments = " / ".join(line.text for line in lines)[:10240]
    sc.DerivationDescription = _derivation(kind, scale)
    sc.SourceImageSequence = [_source_reference(header)]
    sc.InstanceCreationDate = sc.DateOfSecondaryCapture = DA(created.date())
    sc.InstanceCreationTime = sc.TimeOfSecondaryCapture = TM(created.time())
    sc.ContributingEquipmentSequence = contributing_equipment(
        [header], model, manufacturer=manufacturer, contributed_at=created
    )
    return sc


def _series_laterality(source: Dataset) -> str | None:
    laterality = str(source.get("Laterality") or "")
    return laterality if laterality in ("R", "L") else None


def _derivation(kind: str, scale: float) -> str:
    what = (
        "maximum of the positive findings' class activation maps"
        if kind == "summary"
        else f"class activation map for {load_terminology().finding(kind).display}"
    )
    text = (
        f"Source rendered to 8-bit grey (VOI applied), {what} blended in a jet colormap, "
        "hot regions outlined, caption band added above the image"
    )
    if scale < 1.0:
        text += f"; downscaled by {scale:.3f}"
    return text[:1024]


def _source_reference(source: Dataset) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    purpose = Dataset()
    code = codes.DCM.SourceImageForImageProcessingOperation
    purpose.CodeValue, purpose.CodingSchemeDesignator, purpose.CodeMeaning = code.value, code.scheme_designator, code.meaning
    item.PurposeOfReferenceCodeSequence = [purpose]
    return item
