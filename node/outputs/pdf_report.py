"""The printable report: one study version as a one- or two-page PDF (reportlab).

For the readers who see neither an SR nor an overlay: a referring physician,
the EHR's document viewer, a PACS that shows an Encapsulated PDF and nothing
of an SR, the patient's paper file. It carries the patient and study
identification, the triage priority, the 14 study-level findings (probability,
operating point, result, severity), the summary heatmap of each scored image
(the same picture as the summary SC, drawn from the display rendition the
infer stage kept), the model (name, version, weights SHA-256, Device UID) and
the AI disclaimer. With demo weights every page's header says
`DEMO WEIGHTS — NOT FOR CLINICAL USE`. An amended version says so and names
the version it supersedes.

The bytes depend only on the `ScoredStudy`, the renditions and the font files:
reportlab's invariant mode drops the wall clock and the random document ID,
the PDF's dates are the study's issue time, and the heatmaps are JPEG-encoded
by the pinned Pillow. So a re-run of encode writes the same file, and the
Encapsulated PDF in the PACS stays one object.

Text is set in DejaVu Sans (Debian's fonts-dejavu-core, `outputs.report_pdf.font_dir`),
embedded as a subset; a character the font lacks (a patient name in a script
DejaVu does not cover) is printed as its ASCII base letter or "?", never as an
empty box.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import io
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np
from PIL import Image as PILImage
from reportlab import rl_config
from reportlab.lib import colors
from reportlab.lib.enums import TA_LEFT
from reportlab.lib.pagesizes import A4
from reportlab.lib.styles import ParagraphStyle
from reportlab.lib.units import mm
from reportlab.pdfbase import pdfmetrics
from reportlab.pdfbase.ttfonts import TTFont
from reportlab.platypus import Image, KeepTogether, Paragraph, SimpleDocTemplate, Spacer, Table, TableStyle

from inference.types import DEMO_WARNING
from node.outputs import uids
from node.outputs.equipment import device_uid
from node.outputs.names import PersonName
from node.outputs.sc import fit_rendition, summary_overlay
from node.scored_study import ScoredStudy
from node.terminology import load_terminology

# Streams are written binary (Flate, and the heatmaps' JPEG as they are), not
# also ASCII85-armoured: without reportlab's optional C accelerator the armour
# is pure Python, a quarter of the report's CPU, and it makes the file ~20 %
# larger. PDF has allowed binary streams since 1.0; this module is the only
# user of reportlab in the process, so the global setting is its alone.
rl_config.useA85 = 0

TITLE = "Carina AI chest X-ray report"
DISCLAIMER = (
    "This report was produced by artificial-intelligence software (Carina) from the images listed above. "
    "It has not been reviewed by a radiologist and is not a diagnosis. A finding is reported positive when the "
    "model's probability reaches its operating point; severity grades the model's confidence, not the disease. "
    "The heatmaps show where the model looked, not the extent of any disease. The radiologist's report is the "
    "report of record."
)
HEATMAP_MAX_SIDE = 900  # pixels of the longest side embedded: sharp at print size, small enough for FHIR
HEATMAP_JPEG_QUALITY = 82
PAGE_MARGIN = 16 * mm
HEADER_HEIGHT = 16 * mm
RED = colors.Color(0.67, 0.0, 0.0)


@dataclass(frozen=True)
class Predecessor:
    """The report version an amended one supersedes."""

    version: int
    issued: dt.datetime
    document_uid: str  # its Encapsulated PDF's SOP Instance UID


def report_document_uid(scored: ScoredStudy) -> str:
    """The SOP Instance UID of a version's Encapsulated PDF (also printed on the report)."""
    return uids.pdf_instance_uid([img.sop_instance_uid for img in scored.facts.images], scored.model.ref,
                                 scored.version, *scored.output_uid_qualifiers())


def predecessor_of(previous: ScoredStudy) -> Predecessor:
    return Predecessor(previous.version, previous.issued, report_document_uid(previous))


# --- fonts ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Fonts:
    regular: str
    bold: str
    glyphs: frozenset[int]  # code points the regular face can draw


@lru_cache(maxsize=4)
def _fonts(font_dir: Path) -> _Fonts:
    """DejaVu Sans and Sans Bold from `font_dir`, registered with reportlab under
    names unique to the directory (a process may render with two directories)."""
    tag = hashlib.sha256(str(font_dir).encode()).hexdigest()[:8]
    regular, bold = f"CarinaSans-{tag}", f"CarinaSans-Bold-{tag}"
    face = TTFont(regular, str(font_dir / "DejaVuSans.ttf"))
    pdfmetrics.registerFont(face)
    pdfmetrics.registerFont(TTFont(bold, str(font_dir / "DejaVuSans-Bold.ttf")))
    pdfmetrics.registerFontFamily(regular, normal=regular, bold=bold, italic=regular, boldItalic=bold)
    return _Fonts(regular, bold, frozenset(face.face.charToGlyph))


def printable(text: str, glyphs: frozenset[int]) -> str:
    """`text` with every character the font cannot draw replaced by its ASCII base letter, or "?"."""
    out = []
    for char in text:
        if ord(char) in glyphs or char in "\n\t":
            out.append(char)
        else:
            base = unicodedata.normalize("NFKD", char).encode("ascii", "ignore").decode()
            out.append(base or "?")
    return "".join(out)


# --- the document -----------------------------------------------------------------------


def render_report_pdf(scored: ScoredStudy, displays: dict[str, np.ndarray], *, font_dir: Path,
                      predecessor: Predecessor | None = None) -> bytes:
    """The PDF bytes of one study version. `displays` maps each scored image's SOP
    Instance UID to its display rendition (node/outputs/sc.py `display_rendition`)."""
    fonts = _fonts(Path(font_dir))
    styles = _Styles(fonts)
    text = lambda value: escape(printable(str(value), fonts.glyphs))  # noqa: E731

    story: list = [Paragraph(text(TITLE), styles.title)]
    story.append(Paragraph(text(_status_line(scored, predecessor)),
                           styles.warning if predecessor else styles.body))
    story.append(Spacer(0, 2 * mm))
    story.append(_identification(scored, styles, text))
    story.append(Spacer(0, 3 * mm))
    story.append(_triage(scored, styles, text))
    story.append(Spacer(0, 3 * mm))
    story.append(Paragraph("Findings (study level: the most probable scored image per finding)", styles.heading))
    story.append(_findings(scored, styles, text))
    story.append(Spacer(0, 3 * mm))
    story.append(KeepTogether([Paragraph("Summary heatmaps", styles.heading), _heatmaps(scored, displays, styles, text)]))
    story.append(Spacer(0, 3 * mm))
    story.append(KeepTogether([Paragraph("Model", styles.heading), _model(scored, styles, text)]))
    story.append(Spacer(0, 3 * mm))
    story.append(KeepTogether([Paragraph("Disclaimer", styles.heading), Paragraph(text(DISCLAIMER), styles.body)]))

    buffer = io.BytesIO()
    doc = SimpleDocTemplate(
        buffer, pagesize=A4, leftMargin=PAGE_MARGIN, rightMargin=PAGE_MARGIN,
        topMargin=PAGE_MARGIN + HEADER_HEIGHT, bottomMargin=PAGE_MARGIN,
        title=printable(f"{TITLE}, version {scored.version}", fonts.glyphs),
        author="Carina", subject="AI findings; not reviewed by a radiologist",
        creator="Carina", producer="Carina (reportlab)",
        invariant=1,  # no wall-clock date, no random document ID
        # Every font the pages use is embedded; reportlab's initial Helvetica would not be.
        initialFontName=fonts.regular,
    )
    page = _Page(scored, fonts)
    doc.build(story, onFirstPage=page, onLaterPages=page, canvasmaker=_canvas_at(scored.issued))
    return buffer.getvalue()


def _canvas_at(issued: dt.datetime):
    """A reportlab canvas whose document dates are `issued` (UTC), not 2000-01-01."""
    from reportlab.pdfgen.canvas import Canvas

    stamp = issued.astimezone(dt.timezone.utc)

    class _Stamp:
        t = stamp.timestamp()
        YMDhms = (stamp.year, stamp.month, stamp.day, stamp.hour, stamp.minute, stamp.second)
        dhh = dmm = 0
        tzname = "UTC"

    class _Canvas(Canvas):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._doc._timeStamp = _Stamp()

    return _Canvas


class _Styles:
    def __init__(self, fonts: _Fonts):
        base = dict(fontName=fonts.regular, fontSize=9, leading=11.5, alignment=TA_LEFT)
        self.fonts = fonts
        self.body = ParagraphStyle("body", **base)
        self.small = ParagraphStyle("small", **{**base, "fontSize": 7.5, "leading": 9.5})
        self.cell = ParagraphStyle("cell", **{**base, "fontSize": 8.5, "leading": 10.5})
        self.title = ParagraphStyle("title", **{**base, "fontName": fonts.bold, "fontSize": 15, "leading": 19})
        self.heading = ParagraphStyle("heading", **{**base, "fontName": fonts.bold, "fontSize": 10.5,
                                                    "leading": 14, "spaceBefore": 1 * mm, "spaceAfter": 1 * mm})
        self.warning = ParagraphStyle("warning", **{**base, "fontName": fonts.bold, "textColor": RED})


def _utc(instant: dt.datetime) -> str:
    return instant.astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _dicom_date(value: str) -> str:
    value = (value or "").strip()
    if len(value) == 8 and value.isdigit():
        return f"{value[:4]}-{value[4:6]}-{value[6:]}"
    return value or "—"


def _dicom_time(value: str) -> str:
    value = (value or "").replace(":", "").strip()
    if len(value) >= 4 and value[:4].isdigit():
        return f"{value[:2]}:{value[2:4]}"
    return ""


def _status_line(scored: ScoredStudy, predecessor: Predecessor | None) -> str:
    if predecessor is None:
        return (f"Preliminary AI report, version {scored.version}, issued {_utc(scored.issued)}. "
                "Not reviewed by a radiologist.")
    return (f"AMENDED REPORT — version {scored.version}, issued {_utc(scored.issued)}. It supersedes version "
            f"{predecessor.version} issued {_utc(predecessor.issued)} (document {predecessor.document_uid}), "
            "because the study changed after that report.")


def _grid(rows: list[list], widths: list[float], font: str, *, header: bool = False, zebra: bool = False) -> Table:
    table = Table(rows, colWidths=widths, hAlign="LEFT")
    style = [
        ("FONTNAME", (0, 0), (-1, -1), font),  # reportlab's default cell font, Helvetica, is not embedded
        ("VALIGN", (0, 0), (-1, -1), "TOP"),
        ("LEFTPADDING", (0, 0), (-1, -1), 3),
        ("RIGHTPADDING", (0, 0), (-1, -1), 3),
        ("TOPPADDING", (0, 0), (-1, -1), 1.5),
        ("BOTTOMPADDING", (0, 0), (-1, -1), 1.5),
        ("LINEBELOW", (0, 0), (-1, -1), 0.25, colors.lightgrey),
    ]
    if header:
        style += [("BACKGROUND", (0, 0), (-1, 0), colors.Color(0.9, 0.9, 0.9)),
                  ("LINEBELOW", (0, 0), (-1, 0), 0.6, colors.grey)]
    if zebra:
        style += [("ROWBACKGROUNDS", (0, 1), (-1, -1), [colors.white, colors.Color(0.97, 0.97, 0.97)])]
    table.setStyle(TableStyle(style))
    return table


def _identification(scored: ScoredStudy, styles: _Styles, text) -> Table:
    facts = scored.facts
    name = PersonName.from_dicom(facts.patient_name)
    shown_name = ", ".join(part for part in (name.family, " ".join(p for p in (name.given, name.middle) if p)) if part)
    sex = {"M": "male", "F": "female", "O": "other"}.get(facts.patient_sex.upper(), facts.patient_sex or "—")
    when = " ".join(part for part in (_dicom_date(facts.study_date), _dicom_time(facts.study_time)) if part)
    views = ", ".join(f"{img.modality or '?'} {img.view_position or 'view unknown'}" for img in facts.images)
    pairs = [
        ("Patient", shown_name or "—"), ("Patient ID", facts.patient_id or "—"),
        ("Birth date", _dicom_date(facts.patient_birth_date)), ("Sex", sex),
        ("Study date", when or "—"), ("Accession", facts.accession_number or "—"),
        ("Study", facts.study_description or "—"), ("Images scored", f"{len(facts.images)}: {views}"),
    ]
    rows = []
    for index in range(0, len(pairs), 2):
        row = []
        for label, value in pairs[index:index + 2]:
            row += [Paragraph(f"<b>{text(label)}</b>", styles.cell), Paragraph(text(value), styles.cell)]
        rows.append(row)
    rows.append([Paragraph("<b>Study UID</b>", styles.cell), Paragraph(text(facts.study_uid), styles.small), Spacer(0, 0), Spacer(0, 0)])
    table = _grid(rows, [24 * mm, 61 * mm, 24 * mm, 69 * mm], styles.fonts.regular)
    table.setStyle(TableStyle([("SPAN", (1, len(rows) - 1), (3, len(rows) - 1))]))
    return table


def _triage(scored: ScoredStudy, styles: _Styles, text) -> Paragraph:
    triage = scored.triage
    if triage.stat:
        return Paragraph(f"<b>Triage priority: STAT</b> — {text(triage.reason)}", styles.warning)
    return Paragraph(f"<b>Triage priority: routine</b> — {text(triage.reason or 'no critical AI finding')}",
                     styles.body)


def _findings(scored: ScoredStudy, styles: _Styles, text) -> Table:
    terms = load_terminology()
    header = ["Finding", "Probability", "Operating point", "Result", "Severity"]
    rows: list[list] = [[Paragraph(f"<b>{text(h)}</b>", styles.cell) for h in header]]
    bold_rows = []
    for label, (_, finding) in scored.strongest.items():
        display = terms.finding(label).display
        critical = " (critical)" if label in scored.triage.critical else ""
        cells = [
            f"{display}{critical}",
            f"{finding.probability:.2f}",
            f"{finding.threshold:.2f}",
            "positive" if finding.positive else "negative",
            finding.severity or "—",
        ]
        if finding.positive:
            bold_rows.append(len(rows))
            rows.append([Paragraph(f"<b>{text(c)}</b>", styles.cell) for c in cells])
        else:
            rows.append([Paragraph(text(c), styles.cell) for c in cells])
    table = _grid(rows, [62 * mm, 26 * mm, 32 * mm, 28 * mm, 30 * mm], styles.fonts.regular, header=True, zebra=True)
    table.setStyle(TableStyle([("BACKGROUND", (0, r), (-1, r), colors.Color(1.0, 0.93, 0.85)) for r in bold_rows]))
    return table


def _heatmap_flowable(picture: np.ndarray, width: float) -> Image:
    shown = PILImage.fromarray(picture)
    scale = min(1.0, HEATMAP_MAX_SIDE / max(shown.size))
    if scale < 1.0:
        shown = shown.resize((max(1, round(shown.width * scale)), max(1, round(shown.height * scale))),
                             PILImage.Resampling.LANCZOS)
    jpeg = io.BytesIO()
    shown.save(jpeg, format="JPEG", quality=HEATMAP_JPEG_QUALITY, optimize=False, progressive=False)
    jpeg.seek(0)
    height = width * shown.height / shown.width
    max_height = 72 * mm  # so a one-image report keeps its heatmap on the first page
    if height > max_height:
        width, height = width * max_height / height, max_height
    return Image(jpeg, width=width, height=height)


def _heatmaps(scored: ScoredStudy, displays: dict[str, np.ndarray], styles: _Styles, text) -> Table:
    usable = 178 * mm
    per_row = 2 if len(scored.images) > 1 else 1
    width = (usable - 4 * mm * (per_row - 1)) / per_row if per_row > 1 else 110 * mm
    cells = []
    for image in scored.images:
        source = scored.source(image.sop_instance_uid)
        positives = ", ".join(load_terminology().finding(f.label).display for f in image.positives) or "none"
        caption = (f"{source.modality or '?'} {source.view_position or 'view unknown'}: outlined where the model "
                   f"looked for its positive findings ({positives}). Image {source.sop_instance_uid}")
        # Drawn at the size it is embedded at, not at the SCs' 2048 and then
        # reduced: a quarter of the pixels to blend for a 2k source.
        display = fit_rendition(displays[image.sop_instance_uid], image.heatmaps.source_shape, HEATMAP_MAX_SIDE)
        picture = summary_overlay(image, display, max_side=HEATMAP_MAX_SIDE)
        cells.append([_heatmap_flowable(picture, width), Paragraph(text(caption), styles.small)])
    rows = [cells[i:i + per_row] for i in range(0, len(cells), per_row)]
    if len(rows[-1]) < per_row:
        rows[-1] = rows[-1] + [Spacer(0, 0)] * (per_row - len(rows[-1]))
    table = Table(rows, colWidths=[width + (4 * mm if per_row > 1 else 0)] * per_row, hAlign="LEFT")
    table.setStyle(TableStyle([("VALIGN", (0, 0), (-1, -1), "TOP"), ("LEFTPADDING", (0, 0), (-1, -1), 0),
                               ("FONTNAME", (0, 0), (-1, -1), styles.fonts.regular)]))
    return table


def _model(scored: ScoredStudy, styles: _Styles, text) -> Table:
    model = scored.model
    rows = [
        ("Model", model.name), ("Version", model.version),
        ("Weights SHA-256", model.weights_sha256 or "— (demo weights: generated, not imported)"),
        ("Device UID", device_uid(model)),
        ("Report", f"version {scored.version}, {scored.status}, document {report_document_uid(scored)}"),
    ]
    if model.demo:
        rows.insert(0, ("Weights", f"{DEMO_WARNING}: deterministic demonstration weights, not a validated model"))
    table = _grid([[Paragraph(f"<b>{text(k)}</b>", styles.cell), Paragraph(text(v), styles.cell)] for k, v in rows],
                  [30 * mm, 148 * mm], styles.fonts.regular)
    return table


class _Page:
    """Draws each page's header (title, demo marking) and footer (page number, version)."""

    def __init__(self, scored: ScoredStudy, fonts: _Fonts):
        self.scored, self.fonts = scored, fonts

    def __call__(self, canvas, doc) -> None:
        width, height = A4
        top = height - PAGE_MARGIN
        canvas.saveState()
        canvas.setFont(self.fonts.bold, 9)
        canvas.setFillColor(colors.black)
        canvas.drawString(PAGE_MARGIN, top - 4 * mm, "Carina — AI-generated report")
        canvas.setFont(self.fonts.regular, 8)
        canvas.drawRightString(width - PAGE_MARGIN, top - 4 * mm,
                               f"Report version {self.scored.version} · {_utc(self.scored.issued)}")
        if self.scored.model.demo:
            canvas.setFillColor(RED)
            canvas.rect(PAGE_MARGIN, top - 12.5 * mm, width - 2 * PAGE_MARGIN, 6.5 * mm, stroke=0, fill=1)
            canvas.setFillColor(colors.white)
            canvas.setFont(self.fonts.bold, 11)
            canvas.drawCentredString(width / 2, top - 10.5 * mm, DEMO_WARNING)
        else:
            canvas.setStrokeColor(colors.grey)
            canvas.line(PAGE_MARGIN, top - 7 * mm, width - PAGE_MARGIN, top - 7 * mm)
        canvas.setFillColor(colors.grey)
        canvas.setFont(self.fonts.regular, 7)
        canvas.drawString(PAGE_MARGIN, PAGE_MARGIN / 2,
                          "AI-generated; not reviewed by a radiologist; not a diagnosis.")
        canvas.drawRightString(width - PAGE_MARGIN, PAGE_MARGIN / 2, f"Page {doc.page}")
        canvas.restoreState()
