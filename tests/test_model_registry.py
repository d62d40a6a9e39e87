"""The model registry: `carina model import|list|activate`, the demo entry, Device UIDs,
and the running node's hot-swap (ModelManager, load_engine)."""
from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torchxrayvision as xrv
import yaml

import dicom_factory as f
from inference.batcher import BatchingEngine
from inference.decode import decode_png_or_jpeg
from inference.model import MODEL_NAME, PATHOLOGIES, XRV_OP_THRESHOLDS, load_model
from model_factory import state_digest, write_xrv_pickle
from node import cli
from node.config import ConfigError, Settings, load_settings
from node.context import NodeContext
from node.models import ModelManager, ModelRegistry
from node.outputs.equipment import device_uid

DEMO_REF = f"{MODEL_NAME}@demo-seed0"


@pytest.fixture(scope="module")
def demo_registry(tmp_path_factory) -> Path:
    """A registry holding only the demo entry, made by ensure_demo itself (once: seconds)."""
    root = tmp_path_factory.mktemp("registry-template") / "models"
    ModelRegistry(root).ensure_demo()
    return root


@pytest.fixture(scope="module")
def pickles(demo_model, tmp_path_factory) -> dict[str, tuple[Path, str]]:
    """Two torchxrayvision-format pickles: 'v1' and 'v2' of a model, as an operator would download."""
    d = tmp_path_factory.mktemp("downloads")
    state = demo_model.module.state_dict()
    return {v: write_xrv_pickle(d / f"cxr-{v}.pt", state, seed=seed) for v, seed in (("v1", 1), ("v2", 2))}


@pytest.fixture
def node_dir(tmp_path, demo_registry) -> Path:
    """A data_dir whose registry already holds the demo entry, and a config file for the CLI."""
    shutil.copytree(demo_registry, tmp_path / "var" / "models")
    (tmp_path / "carina.yaml").write_text(yaml.safe_dump({
        "storage": {"data_dir": str(tmp_path / "var")},
        "inference": {"device": "cpu", "model_poll_seconds": 0.1, "max_wait_ms": 1},
    }))
    return tmp_path


def carina(node_dir: Path, capsys, *args: str) -> tuple[int, str, str]:
    rc = cli.main([*args, "--config", str(node_dir / "carina.yaml")])
    out = capsys.readouterr()
    return rc, out.out, out.err


def settings_for(node_dir: Path) -> Settings:
    return load_settings(node_dir / "carina.yaml")


def wait_for(predicate, timeout: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def image():
    return decode_png_or_jpeg(f.NIH_PNGS[0])


def probs(result) -> np.ndarray:
    return np.array([x.probability for x in result.findings])


# --- the demo entry ---------------------------------------------------------------------


def test_first_start_creates_the_demo_entry_and_makes_it_active(demo_registry, demo_model):
    registry = ModelRegistry(demo_registry)
    assert registry.active_ref() == DEMO_REF
    (entry,) = registry.entries()
    assert entry.ref == DEMO_REF and entry.demo and entry.meta["source_sha256"] is None
    assert "NOT FOR CLINICAL USE" in entry.meta["note"]
    loaded = load_model(entry.weights, device="cpu")
    assert loaded.info.demo and loaded.info.caveat and loaded.info.ref == DEMO_REF
    # The stored demo weights are exactly the deterministic ones built in memory.
    assert state_digest(loaded.module.state_dict()) == state_digest(demo_model.module.state_dict())
    assert loaded.op_thresholds == (0.5,) * 18
    assert registry.ensure_demo().ref == DEMO_REF and len(registry.entries()) == 1  # idempotent


def test_list_flags_the_demo_as_non_clinical_and_marks_the_active_one(node_dir, capsys):
    rc, out, _ = carina(node_dir, capsys, "model", "list")
    assert rc == 0
    (row,) = [line for line in out.splitlines() if DEMO_REF in line]
    assert row.startswith("*\t") and "DEMO (non-clinical)" in row


# --- import -------------------------------------------------------------------------------


def test_import_refuses_a_sha256_mismatch_without_leaving_anything(node_dir, pickles, capsys, monkeypatch):
    path, digest = pickles["v1"]
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("unpickled before the hash check"))
    wrong = digest[::-1]
    rc, out, err = carina(node_dir, capsys, "model", "import", str(path), "--name", "cxr", "--version", "1", "--sha256", wrong)
    assert rc == 2 and out == ""
    assert "model import refused: SHA-256 mismatch" in err and digest in err and wrong in err
    root = node_dir / "var" / "models"
    assert not (root / "cxr").exists() and list((root / ".staging").iterdir()) == []


def test_import_writes_an_immutable_safetensors_entry(node_dir, pickles, capsys):
    path, digest = pickles["v1"]
    rc, out, err = carina(node_dir, capsys, "model", "import", str(path), "--name", "cxr", "--version", "1", "--sha256", digest)
    assert rc == 0, err
    assert "imported cxr@1" in out and "carina model activate cxr@1" in out
    entry_dir = node_dir / "var" / "models" / "cxr" / "1"
    assert sorted(p.name for p in entry_dir.iterdir()) == ["model.json", "model.safetensors"]
    meta = json.loads((entry_dir / "model.json").read_text())
    assert meta["name"] == "cxr" and meta["version"] == "1" and meta["demo"] is False
    assert meta["pathologies"] == list(PATHOLOGIES) and meta["op_threshs"] == list(XRV_OP_THRESHOLDS)
    assert meta["source_sha256"] == digest and meta["imported_at"]
    # Importing does not activate by itself.
    assert ModelRegistry(node_dir / "var" / "models").active_ref() == DEMO_REF

    rc, _, err = carina(node_dir, capsys, "model", "import", str(path), "--name", "cxr", "--version", "1", "--sha256", digest)
    assert rc == 2 and "already exists" in err and "immutable" in err
    rc, _, err = carina(node_dir, capsys, "model", "import", str(path), "--name", "../x", "--version", "1", "--sha256", digest)
    assert rc == 2 and "model name" in err
    rc, _, err = carina(node_dir, capsys, "model", "activate", "cxr-1")
    assert rc == 2 and "NAME@VERSION" in err


def test_config_never_points_run_time_at_a_pickle(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"inference": {"weights": "/models/densenet.pt"}}))
    with pytest.raises(ConfigError, match=r"inference\.weights.*carina model import"):
        load_settings(config)


# --- activation and hot-swap ---------------------------------------------------------------------


def test_activate_switches_a_running_node_without_restart_and_rolls_back(node_dir, pickles, image, capsys, monkeypatch):
    for version in ("v1", "v2"):
        path, digest = pickles[version]
        assert carina(node_dir, capsys, "model", "import", str(path), "--name", "cxr", "--version", version,
                      "--sha256", digest)[0] == 0

    # From here on nothing may unpickle: the running node reads safetensors only.
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("run time unpickled"))
    manager = ModelManager(settings_for(node_dir))
    batcher = manager.start()
    try:
        assert isinstance(batcher, BatchingEngine) and batcher.model_info.ref == DEMO_REF
        demo_probs = probs(batcher.predict([image])[0])

        rc, out, _ = carina(node_dir, capsys, "model", "activate", "cxr@v1")
        assert rc == 0 and "active: cxr@v1 (was densenet121-res224-all@demo-seed0)" in out
        wait_for(lambda: batcher.model_info.ref == "cxr@v1", what="the watcher to swap in cxr@v1")
        v1 = batcher.predict([image])[0]
        assert v1.model.ref == "cxr@v1" and not v1.model.demo and v1.model.source_sha256 == pickles["v1"][1]
        assert np.abs(probs(v1) - demo_probs).max() > 0.01

        assert carina(node_dir, capsys, "model", "activate", "cxr@v2")[0] == 0
        wait_for(lambda: batcher.model_info.ref == "cxr@v2", what="cxr@v2")
        v2 = batcher.predict([image])[0]
        assert carina(node_dir, capsys, "model", "activate", "cxr@v1")[0] == 0  # rollback
        wait_for(lambda: batcher.model_info.ref == "cxr@v1", what="rollback to cxr@v1")
        np.testing.assert_allclose(probs(batcher.predict([image])[0]), probs(v1), atol=1e-6)
        assert batcher.swaps == 3  # one worker throughout: swapped, never restarted
    finally:
        manager.stop()

    # Every model has its own Device UID (SR Contributing Equipment, FHIR Device).
    uids = {device_uid(info) for info in (v1.model, v2.model, ModelInfoOf(node_dir, DEMO_REF))}
    assert len(uids) == 3

    rc, out, _ = carina(node_dir, capsys, "model", "list")
    rows = {line.split("\t")[1]: line for line in out.splitlines()[1:]}
    assert set(rows) == {DEMO_REF, "cxr@v1", "cxr@v2"}  # previous versions stay
    assert rows["cxr@v1"].startswith("*\t") and "clinical" in rows["cxr@v1"]


def ModelInfoOf(node_dir: Path, ref: str):
    return load_model(ModelRegistry(node_dir / "var" / "models").get(ref).weights, device="cpu").info


def test_a_damaged_model_is_refused_and_the_running_one_kept(node_dir, pickles, image, capsys, caplog):
    path, digest = pickles["v1"]
    assert carina(node_dir, capsys, "model", "import", str(path), "--name", "cxr", "--version", "1", "--sha256", digest)[0] == 0
    weights = node_dir / "var" / "models" / "cxr" / "1" / "model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    weights.write_bytes(bytes(blob))

    rc, _, err = carina(node_dir, capsys, "model", "activate", "cxr@1")
    assert rc == 2 and "damaged" in err
    registry = ModelRegistry(node_dir / "var" / "models")
    assert registry.active_ref() == DEMO_REF

    settings = settings_for(node_dir).model_copy(update={"inference": settings_for(node_dir).inference.model_copy(
        update={"model_poll_seconds": 0})})
    manager = ModelManager(settings)
    batcher = manager.start()
    try:
        registry._write_active("cxr@1")  # as if written behind the CLI's back
        with caplog.at_level(logging.ERROR, logger="node.models"):
            assert manager.check() is False
        assert "cxr@1 was activated but cannot be loaded" in caplog.text
        assert batcher.model_info.ref == DEMO_REF and batcher.predict([image])[0].model.demo
        assert manager.check() is False  # the same pointer is not retried on every poll
    finally:
        manager.stop()


def test_pinned_weights_ignore_the_registry(node_dir, pickles, capsys):
    path, digest = pickles["v2"]
    assert carina(node_dir, capsys, "model", "import", str(path), "--name", "cxr", "--version", "2", "--sha256", digest)[0] == 0
    registry = ModelRegistry(node_dir / "var" / "models")
    s = settings_for(node_dir)
    pinned = s.model_copy(update={"inference": s.inference.model_copy(update={"weights": registry.get("cxr@2").weights})})
    manager = ModelManager(pinned)
    batcher = manager.start()
    try:
        assert batcher.model_info.ref == "cxr@2"
        registry.activate(DEMO_REF)
        assert manager.check() is False and batcher.model_info.ref == "cxr@2"
    finally:
        manager.stop()


def test_an_unimported_xrv_cache_file_is_pointed_out_not_loaded(node_dir, pickles, monkeypatch, caplog):
    path, _ = pickles["v1"]
    cache = node_dir / "xrv-cache"
    cache.mkdir()
    from inference.model import XRV_WEIGHTS_FILENAME

    shutil.copy(path, cache / XRV_WEIGHTS_FILENAME)
    monkeypatch.setattr(xrv.utils, "get_cache_dir", lambda: str(cache) + "/")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("the server unpickled the xrv cache"))
    manager = ModelManager(settings_for(node_dir))
    with caplog.at_level(logging.WARNING, logger="node.models"):
        batcher = manager.start()
    try:
        assert batcher.model_info.ref == DEMO_REF
        assert "will not be loaded" in caplog.text and f"carina model import {cache / XRV_WEIGHTS_FILENAME}" in caplog.text
    finally:
        manager.stop()


# --- the node's wiring ------------------------------------------------------------------------------


def test_load_engine_wires_the_batcher_and_recovers_from_a_bad_activation(node_dir):
    from node.db import Database
    from node.service import load_engine

    registry = ModelRegistry(node_dir / "var" / "models")
    registry._write_active("cxr@missing")  # points at nothing: the node must stay up, unready
    settings = settings_for(node_dir)
    ctx = NodeContext(settings=settings, db=Database(settings.database_url))
    load_engine(ctx)
    try:
        assert ctx.engine is None and ctx.ready["model"] is False and ctx.models is not None
        registry.activate(DEMO_REF)
        wait_for(lambda: ctx.ready["model"], what="recovery after activating a loadable model")
        assert isinstance(ctx.engine, BatchingEngine) and ctx.model_info.ref == DEMO_REF
    finally:
        ctx.models.stop()
        ctx.db.dispose()


def test_a_missing_gpu_is_a_clear_start_failure(node_dir, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    s = settings_for(node_dir)
    manager = ModelManager(s.model_copy(update={"inference": s.inference.model_copy(update={"device": "cuda"})}))
    with pytest.raises(ValueError, match="CUDA is not available"):
        manager.start()
    assert manager.batcher is None
