"""Configuration: one validated model, YAML + environment, clear errors."""
from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from node.config import ConfigError, DEFAULT_CONFIG_PATH, load_settings
from peers import REPO


def test_documented_default_has_the_required_keys():
    raw = yaml.safe_load((REPO / DEFAULT_CONFIG_PATH).read_text())
    assert {"data_dir"} <= raw["storage"].keys()
    assert {"url"} <= raw["database"].keys()
    assert {"ae_title", "port", "stable_seconds"} <= raw["dicom"].keys()
    assert {"host", "port"} <= raw["api"].keys()
    assert "weights" in raw["inference"]
    assert isinstance(raw["destinations"], list)
    s = load_settings(REPO / DEFAULT_CONFIG_PATH)
    assert (s.dicom.ae_title, s.dicom.port, s.api.port, s.dicom.stable_seconds) == ("CARINA", 11112, 8080, 5)
    # The README tour's sender is a known peer, so `make run` takes its storescu.
    assert [(p.ae_title, p.host) for p in s.dicom.peers] == [("MODALITY", "127.0.0.1")] and not s.dicom.accept_any_peer
    assert s.database_url.startswith("sqlite:///")


def test_environment_overrides_yaml(tmp_path, monkeypatch):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"dicom": {"port": 4000, "ae_title": "X"}}))
    monkeypatch.setenv("CARINA_DICOM__PORT", "11113")
    s = load_settings(cfg)
    assert s.dicom.port == 11113 and s.dicom.ae_title == "X"


def test_destinations_are_validated(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"destinations": [{"name": "pacs", "type": "dicom", "ae_title": "PACS", "host": "h", "port": 104}]}))
    assert load_settings(cfg).destinations[0].ae_title == "PACS"
    cfg.write_text(yaml.safe_dump({"destinations": [{"name": "pacs", "type": "dicom", "ae_title": "PACS", "host": "h", "port": 0}]}))
    with pytest.raises(ConfigError, match=r"destinations\.0\.dicom\.port|destinations\.0.*port"):
        load_settings(cfg)


@pytest.mark.parametrize("content, key", [
    ({"dicom": {"port": "eleven"}}, "dicom.port"),
    ({"dicom": {"ae_title": "A_TITLE_LONGER_THAN_16"}}, "dicom.ae_title"),
    ({"storage": {"data_dri": "x"}}, "storage.data_dri"),
    # The old allow-list is gone; its message names the key that replaced it.
    ({"dicom": {"allowed_calling_aets": ["MODALITY"]}}, "dicom.peers"),
    ({"dicom": {"peers": [{"ae_title": "MODALITY"}]}}, "dicom.peers.0.host"),
    ({"dicom": {"tls": {"port": 2762, "certificate": "c.pem", "private_key": "k.pem"}}}, "ca_certificates"),
])
def test_invalid_config_stops_startup_naming_the_key(tmp_path, content, key):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump(content))
    proc = subprocess.run([sys.executable, "-m", "node.cli", "serve", "--config", str(cfg)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert key in proc.stderr


def test_config_path_resolution(tmp_path, monkeypatch):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text(yaml.safe_dump({"dicom": {"port": 1111}}))
    b.write_text(yaml.safe_dump({"dicom": {"port": 2222}}))
    monkeypatch.setenv("CARINA_CONFIG", str(b))
    assert load_settings(a).dicom.port == 1111  # --config wins
    assert load_settings(None).dicom.port == 2222  # then $CARINA_CONFIG
