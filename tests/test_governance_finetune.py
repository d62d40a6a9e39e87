"""Fine-tuning from feedback-like labels, and the activation guard (issue #13).

A small generated set (seeded phantoms; labels: the demo model's own
probabilities thresholded at their median with 10 % of labels flipped, so the
parent predicts them well) is fine-tuned through the real `carina model
finetune` on CPU (head only). A sane run lowers the training loss and
registers a candidate with its held-out evaluation. Poisoned feedback (the
training images' labels inverted, the held-out ones true) makes a worse
model, whose activation the guard refuses unless forced, and the force is
recorded.
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import governance_data as gd
from node.governance.finetune import split
from node.models import ActivationRecord, ModelRegistry
from test_governance_eval import DEMO, carina

LABELLED = ("Infiltration", "Fibrosis", "Effusion", "Pneumonia")
N_IMAGES = 40


@pytest.fixture(scope="module")
def trained(tmp_path_factory, demo_model):
    import yaml

    work = tmp_path_factory.mktemp("finetune")
    config = work / "carina.yaml"
    config.write_text(yaml.safe_dump({"storage": {"data_dir": str(work / "var"), "min_free_mb": 0},
                                      "inference": {"device": "cpu"}}))
    images = work / "images"
    names = gd.phantom_pngs(images, N_IMAGES, seed=21)
    y = gd.threshold_labels(gd.model_probabilities(demo_model, images, names), seed=5)
    labels = gd.write_columns_csv(work / "labels.csv", names, {l: list(y[:, gd.label_index(l)]) for l in LABELLED})
    training, _ = split(names, 0.3, seed=0)  # the split the command makes (seeded)
    poisoned = y.copy()
    poisoned[[names.index(n) for n in training]] ^= 1
    bad_labels = gd.write_columns_csv(work / "poisoned.csv", names, {l: list(poisoned[:, gd.label_index(l)]) for l in LABELLED})
    common = ("--images", str(images), "--holdout", "0.3", "--resamples", "1000", "--no-progress", "--device", "cpu")
    good = carina(config, "model", "finetune", "--from", DEMO, "--labels", str(labels), "--epochs", "3", *common)
    bad = carina(config, "model", "finetune", "--from", DEMO, "--labels", str(bad_labels), "--epochs", "5", "--lr", "1e-4",
                 "--version", "poisoned", *common)
    return {"config": config, "registry": ModelRegistry(work / "var" / "models"), "good": good, "bad": bad}


def test_finetune_lowers_the_training_loss_and_registers_a_candidate_with_its_evaluation(trained):
    registry = trained["registry"]
    assert f"registered {DEMO}+ft1 (not active)" in trained["good"].stdout
    candidate = registry.get(DEMO + "+ft1")
    registry.verify(candidate)
    record = candidate.meta["finetune"]
    assert record["parent"] == DEMO and record["device"] == "cpu" and record["epochs"] == 3
    assert record["training_loss_after"] < record["training_loss_before"], record
    assert len(record["epoch_losses"]) == 3 and record["epoch_losses"][-1] < record["epoch_losses"][0]
    assert record["training_images"] + record["heldout_images"] == N_IMAGES and record["heldout_images"] == 12
    # On CPU only the last dense block, the final norm and the classifier change.
    parent, child = load_file(registry.get(DEMO).weights), load_file(candidate.weights)
    assert torch.equal(parent["features.denseblock3.denselayer1.conv1.weight"], child["features.denseblock3.denselayer1.conv1.weight"])
    assert not torch.equal(parent["features.denseblock4.denselayer1.conv1.weight"], child["features.denseblock4.denselayer1.conv1.weight"])
    assert not torch.equal(parent["classifier.weight"], child["classifier.weight"])
    # The held-out comparison with the parent (what the guard reads) and the candidate's own evaluation.
    heldout = candidate.meta["heldout"]
    assert set(heldout["pathologies"]) <= set(LABELLED) and heldout["images"] == 12
    for row in heldout["pathologies"].values():
        assert row["delta_ci"][0] <= row["delta"] <= row["delta_ci"][1]
        assert row["delta"] == pytest.approx(row["candidate_auroc"] - row["parent_auroc"], abs=1e-12)
    [evaluation] = registry.evaluations(candidate.ref)
    assert evaluation["model"] == candidate.ref and evaluation["dataset"]["images_scored"] == 12
    assert candidate.meta["heldout_evaluation"]["dataset_sha256"] == evaluation["dataset_sha256"]
    assert candidate.meta["op_threshs"] == registry.get(DEMO).meta["op_threshs"]
    assert registry.active_ref() == DEMO  # registered, never activated by the fine-tune


def test_the_activation_guard_refuses_a_worse_model_unless_forced_and_records_the_force(trained):
    registry, config = trained["registry"], trained["config"]
    worse = registry.get(DEMO.split("@")[0] + "@poisoned")
    worse_rows = [row for row in worse.meta["heldout"]["pathologies"].values() if row["delta_ci"][1] < 0]
    assert worse_rows, worse.meta["heldout"]  # worse than the parent beyond the CI somewhere
    assert "The activation guard would refuse it" in trained["bad"].stdout

    refused = carina(config, "model", "activate", worse.ref, check=False)
    assert refused.returncode == 3 and f"activation of {worse.ref} refused" in refused.stderr
    assert "--force" in refused.stderr and registry.active_ref() == DEMO

    forced = carina(config, "model", "activate", worse.ref, "--force")
    assert "overridden with --force (recorded)" in forced.stdout and registry.active_ref() == worse.ref
    last = registry.activations()[-1]
    assert last["ref"] == worse.ref and last["previous"] == DEMO and last["forced"] is True
    assert len(last["guard"]) == len(worse_rows) and last["user"]

    # A candidate that is not worse beyond the CI activates without force.
    assert carina(config, "model", "activate", DEMO + "+ft1").returncode == 0
    assert registry.activations()[-1]["forced"] is False


def test_every_activation_reaches_the_audit_hook(tmp_path):
    seen: list[ActivationRecord] = []
    registry = ModelRegistry(tmp_path / "models", on_activation=seen.append)
    registry.ensure_demo()
    registry.activate(DEMO, user="alice")
    assert [(r.ref, r.user, r.forced) for r in seen] == [(DEMO, "alice", False)]
    assert json.loads((tmp_path / "models" / "activations.jsonl").read_text())["user"] == "alice"
