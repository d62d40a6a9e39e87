"""Local validation and threshold calibration (issue #13), through the real `carina` command.

The labelled set is made here, so the right answer is known: seeded phantom
PNGs, labelled y ~ Bernoulli(p) from the demo model's own probabilities for
three pathologies (the other eleven are absent and must be "not evaluated").
The reference figures are computed independently with scikit-learn from the
test's own scoring of the images; the bootstrap CI must cover the set's
population AUROC, which the construction makes exactly computable.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from sklearn.metrics import precision_score, recall_score, roc_auc_score

import governance_data as gd
from dicom_factory import DATA
from inference.model import load_model
from inference.types import CHESTXRAY14
from node.governance.labels import read_labels
from node.models import ModelRegistry

DEMO = "densenet121-res224-all@demo-seed0"
LABELLED = ("Cardiomegaly", "Effusion", "Pneumothorax")
N_IMAGES = 40


def carina(config: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "node.cli", *args, "--config", str(config)], capture_output=True,
                          text=True, timeout=900, cwd=config.parent)
    if check:
        assert proc.returncode == 0, f"carina {' '.join(args)}: {proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def labelled_set(tmp_path_factory, demo_model):
    work = tmp_path_factory.mktemp("eval")
    config = work / "carina.yaml"
    config.write_text(yaml.safe_dump({"storage": {"data_dir": str(work / "var"), "min_free_mb": 0},
                                      "inference": {"device": "cpu"}}))
    images = work / "images"
    names = gd.phantom_pngs(images, N_IMAGES)
    p = gd.model_probabilities(demo_model, images, names)
    y = gd.bernoulli_labels(p, seed=11)
    labels = {label: list(y[:, gd.label_index(label)]) for label in LABELLED}
    labels["Effusion"][3] = labels["Effusion"][17] = None  # two images not labelled for Effusion
    csv_path = gd.write_columns_csv(work / "labels.csv", names, labels, extra={"Age": [60] * N_IMAGES})
    return {"work": work, "config": config, "images": images, "names": names, "p": p, "labels": labels, "csv": csv_path}


@pytest.fixture(scope="module")
def evaluation(labelled_set):
    s = labelled_set
    out = s["work"] / "report"
    proc = carina(s["config"], "eval", DEMO, "--labels", str(s["csv"]), "--images", str(s["images"]), "--out", str(out))
    return json.loads((out / "evaluation.json").read_text()), out, proc


def column(s: dict, label: str) -> tuple[np.ndarray, np.ndarray]:
    values = s["labels"][label]
    keep = [i for i, v in enumerate(values) if v is not None]
    return np.array([values[i] for i in keep]), s["p"][keep, gd.label_index(label)]


def test_eval_matches_scikit_learn_and_its_ci_covers_the_known_auroc(labelled_set, evaluation):
    record, out, _ = evaluation
    s = labelled_set
    # The node scored the images through the pipeline's own path: the test's one-by-one scoring agrees to
    # float32 batch rounding (measured 1.3e-6). The reference statistics below use the node's scores.
    scores = np.genfromtxt(out / "scores.csv", delimiter=",", skip_header=1)[:, 1:]
    np.testing.assert_allclose(scores, s["p"], rtol=0, atol=1e-5)
    for label in LABELLED:
        row = record["pathologies"][label]
        y, q = column(s, label)  # q: the probability each label was drawn with
        p = column({**s, "p": scores}, label)[1]
        threshold = row["threshold"]
        assert threshold == 0.5  # the demo model's operating point
        predicted = (p >= threshold).astype(int)
        assert row["evaluated"] and row["n"] == len(y) and row["prevalence"] == pytest.approx(y.mean(), abs=1e-12)
        assert abs(row["auroc"] - roc_auc_score(y, p)) <= 1e-9
        assert abs(row["sensitivity"] - recall_score(y, predicted)) <= 1e-9
        assert abs(row["specificity"] - recall_score(y, predicted, pos_label=0)) <= 1e-9
        for ours, theirs in ((row["ppv"], precision_score(y, predicted, zero_division=np.nan)),
                             (row["npv"], precision_score(y, predicted, pos_label=0, zero_division=np.nan))):
            # No predicted positive (or negative): undefined, reported as None, never 0.
            assert (ours is None and np.isnan(theirs)) or abs(ours - theirs) <= 1e-9
        known = gd.population_auroc(q, p)  # labels were drawn with P(y=1) = the model's own probability
        lo, hi = row["auroc_ci"]
        assert lo < row["auroc"] < hi and lo <= known <= hi, (label, known, row["auroc_ci"])
        # Calibration: labels drawn from the model's own probabilities; ECE as defined, recomputed here.
        bins = np.minimum((p * 10).astype(int), 9)
        ece = sum(abs(y[bins == b].mean() - p[bins == b].mean()) * (bins == b).sum() / len(y)
                  for b in range(10) if (bins == b).any())
        assert row["ece"] == pytest.approx(ece, abs=1e-12)
        assert sum(b["count"] for b in row["reliability"]) == len(y)
    assert record["pathologies"]["Effusion"]["n"] == N_IMAGES - 2  # the empty cells are not negatives


def test_pathologies_missing_from_the_labels_are_not_evaluated_never_zero(evaluation):
    record, _, proc = evaluation
    missing = [label for label in CHESTXRAY14 if label not in LABELLED]
    assert record["not_evaluated"] == missing
    for label in missing:
        assert record["pathologies"][label] == {"evaluated": False, "reason": "not in the labels"}
        assert f"{label:20s} not evaluated" in proc.stdout
    assert record["dataset"]["ignored_columns"] == ["Age"]


def test_report_is_self_contained_and_the_run_is_recorded_in_the_registry(labelled_set, evaluation):
    record, out, _ = evaluation
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 2  # ROC and reliability figures, embedded
    assert "<script" not in html and "http://" not in html and "https://" not in html
    assert "not evaluated: not in the labels" in html and "DEMO WEIGHTS" in html
    registry = ModelRegistry(labelled_set["work"] / "var" / "models")
    [kept] = registry.evaluations(DEMO)
    assert kept["dataset_sha256"] == record["dataset_sha256"] and len(kept["dataset_sha256"]) == 64
    assert kept["user"] and kept["date"] == record["date"]
    assert kept["pathologies"]["Cardiomegaly"]["auroc"] == record["pathologies"]["Cardiomegaly"]["auroc"]
    assert kept["outputs"]["html"] == str(out / "report.html")


def test_nih_csv_format_on_the_shared_images_real_labels(tmp_path, labelled_set):
    labels = read_labels(DATA / "nih_Data_Entry_2017.csv")
    assert labels.format == "nih" and labels.pathologies == CHESTXRAY14  # NIH labels cover all 14
    by_name = {image.name: image.labels for image in labels.images}
    assert by_name["00000001_000.png"] == {label: int(label == "Cardiomegaly") for label in CHESTXRAY14}
    assert by_name["00027426_000.png"] == {label: 0 for label in CHESTXRAY14}
    images = tmp_path / "nih"
    images.mkdir()
    for name in ("00000001_000.png", "00027426_000.png"):
        shutil.copy(DATA / f"nih_{name}", images / name)
    out = tmp_path / "out"
    carina(labelled_set["config"], "eval", DEMO, "--labels", str(DATA / "nih_Data_Entry_2017.csv"),
           "--images", str(images), "--out", str(out), "--no-progress")
    record = json.loads((out / "evaluation.json").read_text())
    assert record["dataset"]["labels_format"] == "nih"
    assert record["dataset"]["images_scored"] == 2 and record["dataset"]["images_missing"] == 1  # 00000002_000
    cardio = record["pathologies"]["Cardiomegaly"]
    assert cardio["n"] == 2 and cardio["positives"] == 1 and cardio["auroc"] in (0.0, 0.5, 1.0)
    for label in CHESTXRAY14:  # all but Cardiomegaly negative in these two images: counts, no AUROC, never "0"
        if label != "Cardiomegaly":
            row = record["pathologies"][label]
            assert row["evaluated"] and row["positives"] == 0 and row["auroc"] is None and row["sensitivity"] is None
            assert "one class" in row["auroc_note"]


def test_calibration_reaches_the_target_in_a_new_version_and_leaves_the_old_one(labelled_set):
    s = labelled_set
    registry = ModelRegistry(s["work"] / "var" / "models")
    parent = registry.get(DEMO)
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in parent.directory.iterdir() if p.is_file()}
    proc = carina(s["config"], "model", "calibrate", DEMO, "--labels", str(s["csv"]), "--images", str(s["images"]),
                  "--target-sensitivity", "Cardiomegaly=0.9", "--target-specificity", "Effusion=0.8", "--no-progress")
    assert f"registered {DEMO}+cal1" in proc.stdout
    calibrated = registry.get(DEMO + "+cal1")
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in parent.directory.iterdir() if p.is_file()} == before
    assert registry.active_ref() == DEMO  # calibration never activates
    # Same weights (same bytes, verified by the recorded SHA-256), new operating points.
    registry.verify(calibrated)
    assert calibrated.meta["sha256"] == parent.meta["sha256"] and calibrated.meta["parent"] == DEMO
    loaded = load_model(calibrated.weights, device="cpu")
    thresholds = dict(zip(CHESTXRAY14, loaded.op_thresholds))
    scores = np.genfromtxt(s["work"] / "report" / "scores.csv", delimiter=",", skip_header=1)[:, 1:]
    for label, what, target in (("Cardiomegaly", "sensitivity", 0.9), ("Effusion", "specificity", 0.8)):
        y, p = column({**s, "p": scores}, label)  # the node's scores of these images (same weights)
        predicted = (p >= thresholds[label]).astype(int)
        achieved = recall_score(y, predicted) if what == "sensitivity" else recall_score(y, predicted, pos_label=0)
        assert achieved >= target, (label, what, achieved)
        [record] = [t for t in calibrated.meta["calibration"]["targets"] if t["label"] == label]
        assert record["threshold"] == thresholds[label] and record["achieved"][what] == pytest.approx(achieved, abs=1e-12)
        assert record["threshold_ci"][0] <= record["threshold"] <= record["threshold_ci"][1]
        assert record["achieved"][f"{what}_ci"][0] <= achieved <= record["achieved"][f"{what}_ci"][1]
    # Untargeted pathologies keep the parent's operating point; the evaluation behind the new ones is kept.
    assert thresholds["Pneumothorax"] == 0.5
    evaluation = calibrated.meta["calibration"]["evaluation"]
    assert evaluation["pathologies"]["Cardiomegaly"]["threshold"] == thresholds["Cardiomegaly"]
    # Calibrating again adds +cal2; nothing is ever overwritten.
    again = registry.create_calibrated(DEMO, list(loaded.op_thresholds), {"targets": []})
    assert again.ref == DEMO + "+cal2" and registry.get(DEMO + "+cal1").meta == calibrated.meta
