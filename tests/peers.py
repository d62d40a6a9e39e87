"""Real external peers used by the tests. A missing tool is a failure, never a skip."""
from __future__ import annotations

import shutil
import socket
import subprocess
from pathlib import Path

import pytest


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"required tool {name!r} is not installed; `make test` installs it (scripts/ensure-peers.sh)")
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dciodvfy_errors(path: Path) -> list[str]:
    """All `Error` lines dciodvfy (dicom3tools) reports for a file."""
    tool = require_tool("dciodvfy")
    proc = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=120)
    lines = (proc.stdout + proc.stderr).splitlines()
    return [line for line in lines if line.startswith("Error")]


def dsrdump(path: Path) -> str:
    tool = require_tool("dsrdump")
    proc = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"dsrdump failed on {path}: {proc.stderr}"
    return proc.stdout
