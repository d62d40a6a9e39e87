"""Regenerate fhir/examples/chest-xray-two-views-bundle.json from the real builder.

    .venv/bin/python fhir/examples/generate_example.py [OUTPUT]

Headers are synthetic (fixed UIDs, fake patient); findings are made up; the
model is flagged demo, so every caveat appears. Times are rendered in UTC so
the file does not depend on the machine's time zone.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
os.environ["TZ"] = "UTC"
time.tzset()
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
from pydicom.dataset import Dataset  # noqa: E402

from inference.types import CHESTXRAY14, Finding, Heatmaps, ModelInfo  # noqa: E402
from node.fhir_store import with_meta  # noqa: E402
from node.outputs.fhir_report import build_report_resources  # noqa: E402
from node.report import ReportStatus, Triage  # noqa: E402
from node.scored_study import ScoredImage, ScoredStudy  # noqa: E402
from node.states import Priority  # noqa: E402
from node.study_facts import StudyFacts  # noqa: E402

STUDY_UID = "1.2.826.0.1.3680043.10.1249.777.1"
OUTPUT = HERE / "chest-xray-two-views-bundle.json"


def header(view: str, series: int) -> Dataset:
    ds = Dataset()
    ds.StudyInstanceUID = STUDY_UID
    ds.SeriesInstanceUID = f"{STUDY_UID}.{series}"
    ds.SOPInstanceUID = f"{STUDY_UID}.{series}.1"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image - For Presentation
    ds.Modality = "DX"
    ds.SeriesNumber, ds.InstanceNumber = series, 1
    ds.ViewPosition, ds.SeriesDescription = view, f"Chest {view}"
    ds.PatientID, ds.PatientName = "EXAMPLE-0001", "Example^Patient"
    ds.PatientBirthDate, ds.PatientSex = "19600101", "F"
    ds.AccessionNumber = "ACC-EX-0001"
    ds.StudyDate, ds.StudyTime = "20261121", "093000"
    ds.StudyDescription = "XR CHEST PA AND LATERAL"
    return ds


def findings(probabilities: dict[str, float]) -> tuple[Finding, ...]:
    return tuple(
        Finding(label, probabilities.get(label, 0.04), 0.5, probabilities.get(label, 0.04) >= 0.5)
        for label in CHESTXRAY14
    )


def main(output: Path = OUTPUT) -> None:
    pa, lateral = header("PA", 1), header("LL", 2)
    cold = Heatmaps(np.zeros((14, 7, 7), np.float32), (0, 0, 1024), (1024, 1024))  # FHIR shows no heatmap
    study = ScoredStudy(
        calling_ae="MODALITY",
        facts=StudyFacts.from_datasets([pa, lateral]),
        images=(
            ScoredImage(pa.SOPInstanceUID, findings({"Effusion": 0.71, "Cardiomegaly": 0.64, "Atelectasis": 0.31}),
                        cold),
            ScoredImage(lateral.SOPInstanceUID, findings({"Effusion": 0.83, "Cardiomegaly": 0.41}), cold),
        ),
        model=ModelInfo("densenet121-res224-all", "demo-seed0", demo=True),
        triage=Triage(Priority.ROUTINE, (), "no critical AI finding (watched: Pneumothorax)"),
        version=1,
        status=ReportStatus.PRELIMINARY,
        issued=dt.datetime(2026, 11, 21, 9, 41, 7, tzinfo=dt.timezone.utc),
    )
    resources = build_report_resources(study, patient_system="urn:oid:1.2.826.0.1.3680043.10.1249.1")
    stamp = dt.datetime(2026, 11, 21, 9, 41, 8, tzinfo=dt.timezone.utc).timestamp()
    base = "https://carina.example.org/fhir"
    bundle = {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [
            {"fullUrl": f"{base}/{r['resourceType']}/{r['id']}", "resource": with_meta(r, 1, stamp)}
            for r in resources
        ],
    }
    output.write_text(json.dumps(bundle, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {output} ({len(resources)} resources)")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else OUTPUT)
