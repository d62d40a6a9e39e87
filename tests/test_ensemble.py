"""Ensembles (issue #13): a registry entry of kind `ensemble` scores as the mean of its
members, and every output names each member (SR algorithm identification, FHIR Device).
Single-model outputs stay byte-identical (tests/test_golden_outputs.py)."""
from __future__ import annotations

import json

import numpy as np
import pydicom
import pytest

from dicom_factory import NIH_PNGS, make_dx, png_pixels
from inference import decode_dicom
from inference.serialize import model_from_json, model_to_json
from model_factory import write_xrv_pickle
from node.config import Settings
from node.models import ModelManager, ModelRegistry, RegistryError
from node.outputs.fhir_report import build_report_resources
from node.outputs.sr import build_sr
from node.scored_study import ScoredStudy
from scored_factory import scored_study
from test_outputs_sr import assert_valid_dicom, dsrdump_checked, write

DEMO = "densenet121-res224-all@demo-seed0"


def walk(ds):
    for item in ds.get("ContentSequence", []):
        yield item
        yield from walk(item)


@pytest.fixture(scope="module")
def ensemble(tmp_path_factory, demo_model):
    work = tmp_path_factory.mktemp("ensemble")
    settings = Settings(storage={"data_dir": str(work / "var"), "min_free_mb": 0}, inference={"device": "cpu"})
    registry = ModelRegistry.for_settings(settings)
    registry.ensure_demo()
    pickle, digest = write_xrv_pickle(work / "cxr.pt", demo_model.module.state_dict(), seed=7)
    registry.import_checkpoint(pickle, name="cxr", version="7", sha256=digest)
    entry = registry.create_ensemble("cxr-ensemble", "1", [DEMO, "cxr@7"])
    engine = ModelManager(settings, registry).engine_for(entry.ref, "torch")
    ds = make_dx(png_pixels(NIH_PNGS[0]), patient_id="ENS-1", accession="ENS0001")
    return {"registry": registry, "entry": entry, "engine": engine, "ds": ds, "work": work}


def test_an_ensemble_answers_the_mean_of_its_members(ensemble):
    engine, registry, entry = ensemble["engine"], ensemble["registry"], ensemble["entry"]
    image = decode_dicom(ensemble["ds"])
    [result] = engine.predict([image])
    members = [m.predict([image])[0] for m in engine.members]
    assert [m.model.ref for m in members] == [DEMO, "cxr@7"]
    mean = np.mean([[f.probability for f in m.findings] for m in members], axis=0)
    np.testing.assert_allclose([f.probability for f in result.findings], mean, rtol=0, atol=1e-12)
    maps = np.mean([m.heatmaps.maps for m in members], axis=0)
    peak = maps.max(axis=(1, 2), keepdims=True)
    np.testing.assert_allclose(result.heatmaps.maps, np.where(peak > 0, maps / np.where(peak > 0, peak, 1), 0), atol=1e-6)
    # Its operating points are its own (here: the members' mean, until calibrated).
    expected = [(a + b) / 2 for a, b in zip(registry.get(DEMO).op_thresholds, registry.get("cxr@7").op_thresholds)]
    assert [f.threshold for f in result.findings] == pytest.approx(expected[:14], abs=1e-12)
    assert [f.positive for f in result.findings] == [f.probability >= f.threshold for f in result.findings]
    info = result.model
    assert info.ref == entry.ref and [m.ref for m in info.members] == [DEMO, "cxr@7"] and info.demo  # a demo member
    assert model_from_json(json.loads(json.dumps(model_to_json(info)))) == info
    assert "members" not in model_to_json(members[0].model)  # single models: JSON unchanged


def test_ensemble_registry_rules(ensemble):
    registry = ensemble["registry"]
    with pytest.raises(RegistryError, match="already exists"):
        registry.create_ensemble("cxr-ensemble", "1", [DEMO, "cxr@7"])
    with pytest.raises(RegistryError, match="itself an ensemble"):
        registry.create_ensemble("nested", "1", [DEMO, "cxr-ensemble@1"])
    registry.verify(ensemble["entry"])  # verifies every member's weights
    calibrated = registry.create_calibrated("cxr-ensemble@1", [0.3] * 18, {"targets": []})
    assert calibrated.ref == "cxr-ensemble@1+cal1" and calibrated.is_ensemble and calibrated.members == ("%s" % DEMO, "cxr@7")


def test_ensemble_outputs_name_every_member_in_the_sr_and_the_fhir_device(ensemble, tmp_path):
    ds = ensemble["ds"]
    [result] = ensemble["engine"].predict([decode_dicom(ds)])
    study = ScoredStudy.from_json(scored_study([(ds, result)]).to_json())  # through the codec, as encode reads it
    assert [m.ref for m in study.model.members] == [DEMO, "cxr@7"]

    sr = build_sr(study, {str(ds.SOPInstanceUID): ds})
    path = write(sr, tmp_path / "sr.dcm")
    assert_valid_dicom(path)
    dump = dsrdump_checked(path)  # dcmtk parses it (and truncates long values in its listing)
    assert "Algorithm Parameters" in dump and "cxr-ensemble" in dump
    parameters = [item.TextValue for item in walk(pydicom.dcmread(path))
                  if item.get("ConceptNameCodeSequence") and item.ConceptNameCodeSequence[0].CodeValue == "111002"]
    # TID 4019 Algorithm Parameters name every member in every finding group (14 of them here) and every NUM.
    assert parameters.count(f"member: {DEMO}") == parameters.count("member: cxr@7") >= 14
    assert set(parameters) == {f"member: {DEMO}", "member: cxr@7"}
    equipment = pydicom.dcmread(path).ContributingEquipmentSequence[-1]
    assert f"ensemble of {DEMO}, cxr@7" in equipment.ContributionDescription

    resources = build_report_resources(study, patient_system="urn:oid:1.2.3")  # validated with fhir.resources
    [device] = [r for r in resources if r["resourceType"] == "Device"]
    names = [n["name"] for n in device["deviceName"]]
    assert names == ["cxr-ensemble", f"ensemble member {DEMO}", "ensemble member cxr@7"]
    versions = {v["type"]["text"]: v["value"] for v in device["version"]}
    assert versions["ensemble member cxr"] == "7" and versions["ensemble member densenet121-res224-all"] == "demo-seed0"
