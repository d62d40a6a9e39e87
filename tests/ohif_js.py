"""Runs OHIF's and Cornerstone3D's own code (tests/js, pinned npm packages) on files.

`make test` installs the packages (`npm ci` in tests/js) and Debian's node/npm
(scripts/ensure-peers.sh). A missing node, a missing or stale node_modules is
a test failure that says how to fix it, never a skip.
"""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

JS = Path(__file__).resolve().parent / "js"


def _require_node_modules() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not installed; `make test` installs it (scripts/ensure-peers.sh)")
    pinned = json.loads((JS / "package.json").read_text())["dependencies"]
    for name, version in pinned.items():
        manifest = JS / "node_modules" / name / "package.json"
        if not manifest.exists():
            pytest.fail(f"{name} is not installed in {JS}/node_modules; `make test` runs `npm ci` there")
        installed = json.loads(manifest.read_text())["version"]
        if installed != version:
            pytest.fail(f"{name} {installed} is installed but {version} is pinned; `make test` reruns `npm ci`")
    return node


def run(script: str, *files: Path, timeout: float = 120) -> dict:
    """Run tests/js/<script> on the files and return the JSON it prints."""
    node = _require_node_modules()
    proc = subprocess.run(
        [node, str(JS / script), *map(str, files)], capture_output=True, text=True, timeout=timeout, cwd=JS
    )
    assert proc.returncode == 0, f"{script} failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout)
