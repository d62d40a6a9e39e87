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


# --- long-running peers -------------------------------------------------------
import json
import os
import signal
import sys
import time
import urllib.error
import urllib.request

import yaml

REPO = Path(__file__).resolve().parent.parent


def wait_until(predicate, timeout: float, interval: float = 0.2, what: str = "condition"):
    deadline = time.monotonic() + timeout
    last_exc = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # peer still starting
            last_exc = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}" + (f" (last error: {last_exc})" if last_exc else ""))


def http_json(url: str, *, token: str | None = None, method: str = "GET", data: bytes | None = None, timeout: float = 10):
    req = urllib.request.Request(url, method=method, data=data)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(req, timeout=timeout) as rsp:
        return json.loads(rsp.read() or b"null")


class Orthanc:
    """A real Orthanc PACS (Debian package) on free loopback ports."""

    def __init__(self, workdir: Path, ae_title: str = "ORTHANC"):
        self.binary = require_tool("Orthanc")
        self.workdir = Path(workdir)
        self.ae_title = ae_title
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self) -> "Orthanc":
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "CARINA-TEST-PACS",
            "DicomAet": self.ae_title,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "storage"),
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False,
            "Plugins": [],
        }
        cfg = self.workdir / "orthanc.json"
        cfg.write_text(json.dumps(config))
        self.log = open(self.workdir / "orthanc.log", "ab")
        self.proc = subprocess.Popen([self.binary, str(cfg)], stdout=self.log, stderr=subprocess.STDOUT)
        wait_until(lambda: http_json(f"{self.url}/system"), 30, what="Orthanc REST API")
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def study_instances(self, study_uid: str) -> list[dict]:
        """Instances Orthanc holds for a StudyInstanceUID, with their main tags."""
        found = http_json(f"{self.url}/tools/lookup", method="POST", data=study_uid.encode())
        studies = [item["ID"] for item in found if item["Type"] == "Study"]
        if not studies:
            return []
        return http_json(f"{self.url}/studies/{studies[0]}/instances?expand")

    def download(self, orthanc_id: str, dest: Path) -> Path:
        with urllib.request.urlopen(f"{self.url}/instances/{orthanc_id}/file", timeout=30) as rsp:
            dest.write_bytes(rsp.read())
        return dest


class CarinaNode:
    """`carina serve` as a subprocess, exactly as an operator runs it."""

    def __init__(self, workdir: Path, *, destinations: list[dict] | None = None, stable_seconds: float = 1.0, extra: dict | None = None):
        self.workdir = Path(workdir)
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.config_path = self.workdir / "carina.yaml"
        config = {
            "storage": {"data_dir": str(self.workdir / "var"), "min_free_mb": 0},
            "dicom": {"ae_title": "CARINA", "host": "127.0.0.1", "port": self.dicom_port, "stable_seconds": stable_seconds},
            "api": {"host": "127.0.0.1", "port": self.http_port},
            "pipeline": {"poll_seconds": 0.2, "backoff_base_seconds": 0.5, "backoff_max_seconds": 2},
            "destinations": destinations or [],
        }
        for section, values in (extra or {}).items():
            config.setdefault(section, {}).update(values) if isinstance(values, dict) else config.__setitem__(section, values)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(config))
        self.proc: subprocess.Popen | None = None
        self.token: str | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def carina(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "node.cli", *args, "--config", str(self.config_path)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=self.workdir, timeout=120)
        if check:
            assert proc.returncode == 0, f"carina {' '.join(args)} failed: {proc.stderr}"
        return proc

    def create_token(self, name: str = "tests", role: str = "integration") -> str:
        self.token = self.carina("token", "create", "--name", name, "--role", role).stdout.strip().splitlines()[-1]
        return self.token

    def start(self, wait_ready: bool = True) -> "CarinaNode":
        self.log = open(self.workdir / "carina.log", "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "node.cli", "serve", "--config", str(self.config_path)],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=self.workdir,
        )
        if wait_ready:
            wait_until(self._healthy, 120, what="carina /healthz")
        return self

    def _healthy(self) -> bool:
        assert self.proc.poll() is None, f"carina exited with {self.proc.returncode}; see {self.workdir / 'carina.log'}"
        try:
            return http_json(f"{self.url}/healthz")["status"] == "ok"
        except urllib.error.HTTPError:
            return False

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def api(self, path: str):
        return http_json(f"{self.url}{path}", token=self.token)

    def log_text(self) -> str:
        return (self.workdir / "carina.log").read_text(errors="replace")


def storescu(port: int, *files: Path, called_ae: str = "CARINA", calling_ae: str = "MODALITY", extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """Push files like a modality does, with dcmtk's storescu."""
    tool = require_tool("storescu")
    env = dict(os.environ, TCP_NODELAY="1")
    return subprocess.run(
        [tool, "-v", *extra, "-aet", calling_ae, "-aec", called_ae, "127.0.0.1", str(port), *map(str, files)],
        capture_output=True, text=True, env=env, timeout=120,
    )


def store_responses(proc: subprocess.CompletedProcess) -> list[str]:
    """The status texts storescu -v printed, e.g. ['Success', 'Refused: OutOfResources']."""
    import re

    return re.findall(r"Received Store Response \(([^)]*)\)", proc.stdout + proc.stderr)
