"""The AI's outlines as a Grayscale Softcopy Presentation State: layers a classic PACS can toggle.

One GSPS per scored image that has a drawable finding (positive, with a
region). Each such finding is one graphic layer: the closed outline of every
region (PIXEL units, the SR's SCOORD geometry, `regions.outline`) and one
text label at its largest region naming the finding, the model's probability
and, for demo weights, the caveat, so the caveat shows whatever layers are on.
Layers follow CHESTXRAY14 order; each outline carries the SR's Tracking UID
for the finding.

A presentation state replaces the image's own grey-scale pipeline when it is
applied, so it repeats it: highdicom copies the source's Modality LUT
(rescale) and VOI (window or VOI LUT), and a MONOCHROME1 source gets
Presentation LUT Shape INVERSE (IDENTITY would show it as a negative).
One GSPS per image, because Presentation LUT Shape is one value per object
and a study may mix MONOCHROME1 and MONOCHROME2 images.

The SR references each image's GSPS from its Image Library entry
(`build_sr(presentation_states=...)`).
"""
from __future__ import annotations

import highdicom as hd
from highdicom.pr import (
    AnnotationUnitsValues,
    GraphicAnnotation,
    GraphicLayer,
    GraphicObject,
    GraphicTypeValues,
    GrayscaleSoftcopyPresentationState,
    TextObject,
)
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pydicom.valuerep import DA, TM

from inference.types import Finding, ModelInfo
from node.outputs import uids
from node.outputs.equipment import MANUFACTURER, contributing_equipment, device_uid, series_description
from node.outputs.regions import drawable_findings, largest, outline
from node.outputs.sr import drop_invalid_optional_patient_study, source_header, tracking_uid
from node.outputs.text import declare_character_set, plain, plain_caveat
from node.scored_study import ScoredImage, ScoredStudy
from node.terminology import load_terminology

GSPS_SERIES_NUMBER = 9904
GSPS_SERIES_BASE = "Carina AI overlays"
# The colour the SCs outline in, so every output shows the AI the same way.
OUTLINE_COLOR = hd.color.CIELabColor.from_rgb(0, 255, 0)


def build_presentation_state(
    header: Dataset,
    image: ScoredImage,
    study: ScoredStudy,
    *,
    manufacturer: str = MANUFACTURER,
    series_number: int = GSPS_SERIES_NUMBER,
    instance_number: int = 1,
) -> GrayscaleSoftcopyPresentationState | None:
    """The GSPS of one scored image, or None when it has no drawable finding.

    `header` is the source image's header (pixels are not needed). Dates,
    times and UIDs are functions of the study, so a re-run writes the same bytes.
    """
    findings = drawable_findings(image.findings)
    if not findings:
        return None
    model, created = study.model, study.created_local
    header = source_header(header)
    layers = [_layer(order, finding) for order, finding in enumerate(findings, start=1)]
    caveat = plain_caveat(model)
    gsps = GrayscaleSoftcopyPresentationState(
        referenced_images=[header],
        series_instance_uid=uids.series_uid(str(header.StudyInstanceUID), model.ref, "gsps"),
        series_number=series_number,
        sop_instance_uid=uids.gsps_instance_uid(str(header.SOPInstanceUID), model.ref,
                                                *study.output_uid_qualifiers(str(header.SOPInstanceUID))),
        instance_number=instance_number,
        manufacturer=manufacturer,
        manufacturer_model_name=model.name[:64],
        software_versions=model.version[:64],
        device_serial_number=device_uid(model),
        content_label="CARINA_AI",
        content_description=(f"AI findings - {caveat}" if caveat else "AI findings")[:64],
        graphic_layers=layers,
        graphic_annotations=[
            _annotation(header, finding, layer, model) for finding, layer in zip(findings, layers)
        ],
        presentation_lut_transformation=hd.PresentationLUTTransformation(
            presentation_lut_shape=hd.PresentationLUTShapeValues.INVERSE
            if header.get("PhotometricInterpretation") == "MONOCHROME1"
            else hd.PresentationLUTShapeValues.IDENTITY
        ),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description=series_description(GSPS_SERIES_BASE, model, " (GSPS)"),
        specific_character_set="ISO_IR 192",
    )
    gsps.PresentationCreationDate = gsps.InstanceCreationDate = DA(created.date())
    gsps.PresentationCreationTime = gsps.InstanceCreationTime = TM(created.time())
    for keyword, value in (("SeriesDate", DA(created.date())), ("SeriesTime", TM(created.time()))):
        if keyword in gsps:
            setattr(gsps, keyword, value)
    # General Series Laterality (Type 2C) is for paired body parts: naming the
    # (unpaired) chest makes it not required; a source's own R/L is kept.
    if header.get("BodyPartExamined"):
        gsps.BodyPartExamined = header.BodyPartExamined
    laterality = str(header.get("Laterality") or "")
    if laterality in ("R", "L"):
        gsps.Laterality = laterality
    elif not header.get("BodyPartExamined"):
        gsps.Laterality = ""  # unknown body part: laterality unknown
    drop_invalid_optional_patient_study(gsps)
    gsps.ContributingEquipmentSequence = contributing_equipment(
        [header], model, manufacturer=manufacturer, contributed_at=created
    )
    declare_character_set(gsps)
    return gsps


def layer_name(finding: Finding) -> str:
    """Graphic Layer (CS, 16 characters): the model label in capitals, e.g. PNEUMOTHORAX."""
    return finding.label.upper()[:16]


def _layer(order: int, finding: Finding) -> GraphicLayer:
    display = plain(load_terminology().finding(finding.label).display)
    layer = GraphicLayer(
        layer_name=layer_name(finding),
        order=order,
        description=f"Carina AI: {display}"[:64],
        display_color=OUTLINE_COLOR,
    )
    # Grey-scale displays (most reading-room monitors) draw the layer in white.
    layer.GraphicLayerRecommendedDisplayGrayscaleValue = 0xFFFF
    return layer


def _annotation(header: Dataset, finding: Finding, layer: GraphicLayer, model: ModelInfo) -> GraphicAnnotation:
    rows, columns = int(header.Rows), int(header.Columns)
    sop_uid = str(header.SOPInstanceUID)
    display = plain(load_terminology().finding(finding.label).display)
    tracking = tracking_uid(sop_uid, model.ref, finding.label)
    outlines = [
        GraphicObject(
            graphic_type=GraphicTypeValues.POLYLINE,
            graphic_data=outline(region, rows, columns),
            units=AnnotationUnitsValues.PIXEL,
            tracking_id=f"{display} (SOP ...{sop_uid[-12:]})"[:64],
            tracking_uid=tracking,
        )
        for region in finding.regions
    ]
    x1, y1, _, _ = largest(finding).bbox
    caveat = plain_caveat(model)
    label = TextObject(
        text_value=f"{display} (AI {finding.probability:.2f})" + (f" - {caveat}" if caveat else ""),
        units=AnnotationUnitsValues.PIXEL,
        anchor_point=(float(x1), float(y1)),
        anchor_point_visible=False,
    )
    return GraphicAnnotation(
        referenced_images=[header], graphic_layer=layer, graphic_objects=outlines, text_objects=[label]
    )
