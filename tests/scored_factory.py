"""ScoredStudy values for tests that call the output builders directly.

The pipeline builds its ScoredStudy in node/pipeline/infer.py; tests that
exercise one builder make the same value here from source datasets and the
model results they choose.
"""
from __future__ import annotations

import datetime as dt

from node.config import TriageSettings
from node.report import ReportStatus, Triage, assess_triage, strongest_findings
from node.scored_study import ScoredImage, ScoredStudy
from node.study_facts import StudyFacts

ISSUED = dt.datetime(2026, 11, 21, 10, 0, 0, tzinfo=dt.timezone.utc)


def scored_study(
    sources,
    *,
    version: int = 1,
    calling_ae: str = "MODALITY",
    triage: Triage | None = None,
    triage_settings: TriageSettings | None = None,
    issued: dt.datetime = ISSUED,
    model=None,
) -> ScoredStudy:
    """`sources` is [(source dataset, ImageResult)]; triage defaults to what the
    configured rule (default settings) says about these findings."""
    images = tuple(ScoredImage(str(ds.SOPInstanceUID), r.findings, r.heatmaps) for ds, r in sources)
    if triage is None:
        strongest = strongest_findings({image.sop_instance_uid: image.findings for image in images})
        triage = assess_triage(triage_settings or TriageSettings(), strongest)
    return ScoredStudy(
        calling_ae=calling_ae,
        facts=StudyFacts.from_datasets([ds for ds, _ in sources]),
        images=images,
        model=model or sources[0][1].model,
        triage=triage,
        version=version,
        status=ReportStatus.for_version(version),
        issued=issued,
    )


def headers(sources) -> dict:
    """Source headers by SOP Instance UID, as the encode stage hands them to build_sr."""
    return {str(ds.SOPInstanceUID): ds for ds, _ in sources}


def scored_from_findings(datasets, findings_by_image: dict, model, **options) -> ScoredStudy:
    """A ScoredStudy for builders that never look at heatmaps (FHIR, HL7): the
    given findings per SOP Instance UID, with all-cold maps."""
    shapes = {str(ds.SOPInstanceUID): (int(ds.Rows), int(ds.Columns)) for ds in datasets}
    return scored_from_facts(StudyFacts.from_datasets(list(datasets)), findings_by_image, model, shapes=shapes, **options)


def scored_from_facts(
    facts: StudyFacts,
    findings_by_image: dict,
    model,
    *,
    shapes: dict | None = None,
    version: int = 1,
    status: str | None = None,
    calling_ae: str = "MODALITY",
    triage: Triage | None = None,
    issued: dt.datetime = ISSUED,
) -> ScoredStudy:
    import numpy as np

    from inference.types import Heatmaps

    images = []
    for sop_uid, findings in findings_by_image.items():
        rows, cols = (shapes or {}).get(str(sop_uid), (32, 32))
        side = min(rows, cols)
        maps = Heatmaps(np.zeros((14, 7, 7), np.float32), ((rows - side) // 2, (cols - side) // 2, side), (rows, cols))
        images.append(ScoredImage(str(sop_uid), tuple(findings), maps))
    if triage is None:
        triage = assess_triage(TriageSettings(), strongest_findings({i.sop_instance_uid: i.findings for i in images}))
    return ScoredStudy(
        calling_ae=calling_ae,
        facts=facts,
        images=tuple(images),
        model=model,
        triage=triage,
        version=version,
        status=status or ReportStatus.for_version(version),
        issued=issued,
    )
