"""Real external peers used by the tests. A missing tool is a failure, never a skip."""
from __future__ import annotations

import re
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


# dciodvfy prints "Error - ..." and "Abort - ..." at the start of a line, or
# after a tag prefix for read errors: "(0x6568,0x6c6c)  ?  - Error - Bad Value Length ...".
_DCIODVFY_FAILURE = re.compile(r"(?:^|\s-\s)(?:Error|Abort)\s-")


def dciodvfy_errors(path: Path) -> list[str]:
    """Everything that makes dciodvfy (dicom3tools) reject a file; [] means valid.

    The `Error`/`Abort` lines, plus one entry for a non-zero exit: dicom3tools
    20220618 exits 1 on any error (missing attributes, bad values, a non-DICOM or
    truncated file, an unknown SOP class) and on a file it cannot open, which
    prints no `Error` line at all, only `Abort`. It exits 0 when there are only warnings."""
    tool = require_tool("dciodvfy")
    proc = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=120)
    lines = (proc.stdout + proc.stderr).splitlines()
    errors = [line for line in lines if _DCIODVFY_FAILURE.search(line)]
    if proc.returncode != 0:
        errors.append(f"dciodvfy exited with status {proc.returncode}")
    return errors


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


# Orthanc (1.10.1) calls ReceivedInstanceFilter for every C-STORE it receives,
# before it looks for an existing copy: an identical re-send is answered with
# success and not stored again (no new /changes entry), but it still passes
# here. So this log counts deliveries, where Orthanc's index counts copies.
# `dicom` holds every tag except Pixel Data. It is written as JSON with sorted
# keys (sequence items keyed "1", "2", ...), so two receptions of the same
# content give the same line. Plain Lua on purpose: Orthanc's own DumpJson on
# the table of a TID 1500 SR corrupts Orthanc's heap in 1.10.1 (it aborts with
# "corrupted size vs. prev_size" within a few SRs).
_RECEPTION_HOOK = r"""
local function quote(s)
  return '"' .. (tostring(s):gsub('[%c"\\]', function(c) return string.format("\\u%04x", c:byte()) end)) .. '"'
end

local function encode(value)
  if type(value) ~= "table" then
    return quote(value)
  end
  local keys = {}
  for key in pairs(value) do
    keys[#keys + 1] = tostring(key)
  end
  table.sort(keys)
  local parts = {}
  for _, key in ipairs(keys) do
    local item = value[key]
    if item == nil then
      item = value[tonumber(key)]
    end
    parts[#parts + 1] = quote(key) .. ":" .. encode(item)
  end
  return "{" .. table.concat(parts, ",") .. "}"
end

function ReceivedInstanceFilter(dicom, origin, info)
  local f = assert(io.open(CARINA_RECEPTION_LOG, "a"))
  f:write('{"origin":', encode(origin), ',"tags":', encode(dicom), "}\n")
  f:close()
  return true
end
"""


class Orthanc:
    """A real Orthanc PACS (Debian package) on free loopback ports.

    Every C-STORE it receives is logged (`receptions()`), re-sends included."""

    def __init__(self, workdir: Path, ae_title: str = "ORTHANC", extra_config: dict | None = None):
        self.binary = require_tool("Orthanc")
        self.workdir = Path(workdir)
        self.ae_title = ae_title
        self.extra_config = extra_config or {}  # Orthanc configuration keys to add or override
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
            "LuaScripts": [str(self._write_reception_hook())],
        } | self.extra_config
        cfg = self.workdir / "orthanc.json"
        cfg.write_text(json.dumps(config))
        self.log = open(self.workdir / "orthanc.log", "ab")
        self.proc = subprocess.Popen([self.binary, str(cfg)], stdout=self.log, stderr=subprocess.STDOUT)
        wait_until(lambda: http_json(f"{self.url}/system"), 30, what="Orthanc REST API")
        return self

    @property
    def reception_log(self) -> Path:
        return self.workdir / "receptions.jsonl"

    def _write_reception_hook(self) -> Path:
        script = self.workdir / "receptions.lua"
        # json.dumps gives a valid Lua string literal for a path.
        script.write_text(f"CARINA_RECEPTION_LOG = {json.dumps(str(self.reception_log))}\n{_RECEPTION_HOOK}")
        return script

    def receptions(self) -> list[dict]:
        """Every instance received so far, in order, one entry per C-STORE (or
        REST upload): {"sop", "study", "calling_ae", "origin", "tags"}; `tags`
        is every tag but Pixel Data by keyword, sequence items keyed "1", "2", ...
        Equal `tags` mean equal content apart from the pixels."""
        if not self.reception_log.exists():
            return []
        out = []
        text = self.reception_log.read_bytes().decode("utf-8", "surrogateescape")
        for line in text.splitlines(keepends=True):
            if not line.endswith("\n"):
                break  # still being written
            entry = json.loads(line)
            tags, origin = entry["tags"], entry["origin"]
            out.append({
                "sop": tags.get("SOPInstanceUID", ""),
                "study": tags.get("StudyInstanceUID", ""),
                "calling_ae": origin.get("RemoteAet", ""),
                "origin": origin.get("RequestOrigin", ""),
                "tags": tags,
            })
        return out

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


# Every calling AE title the tests send with, all from this machine: the known
# peers of a test node and of the in-process SCPs (dicom.peers).
TEST_SENDERS = ("MODALITY", "PROBE", "ECHOSCU", "STORESCU", "MOD", "ROUTE_A", "ROUTE_B",
                "HOSTILE", "CONTROL", "BIGMOD", "FUZZER")


def loopback_peers(*ae_titles: str) -> list[dict]:
    """`dicom.peers` entries for senders on 127.0.0.1 (default: TEST_SENDERS)."""
    return [{"ae_title": title, "host": "127.0.0.1"} for title in (ae_titles or TEST_SENDERS)]


def loopback_policy(*ae_titles: str):
    """The same, as the PeerPolicy an in-process StorageSCP takes."""
    from dicom_scp.peers import Peer, PeerPolicy

    return PeerPolicy(Peer(p["ae_title"], p["host"]) for p in loopback_peers(*ae_titles))


class CarinaNode:
    """`carina serve` as a subprocess, exactly as an operator runs it.

    `role` is `carina serve --role` (node/service.py); `env` is added to the
    environment of every `carina` it runs (e.g. CARINA_DATABASE__URL, as a
    container is configured)."""

    @property
    def env(self) -> dict[str, str]:
        # Read at each run, not at construction: a test may set a secret's
        # variable (monkeypatch.setenv) after building the node and before start().
        return dict(os.environ, **self._extra_env)

    def __init__(self, workdir: Path, *, destinations: list[dict] | None = None, stable_seconds: float = 1.0,
                 extra: dict | None = None, peers: list[dict] | None = None, role: str = "all",
                 env: dict[str, str] | None = None):
        self.workdir = Path(workdir)
        self.role = role
        self._extra_env = dict(env or {})
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.config_path = self.workdir / "carina.yaml"
        config = {
            "storage": {"data_dir": str(self.workdir / "var"), "min_free_mb": 0},
            "dicom": {"ae_title": "CARINA", "host": "127.0.0.1", "port": self.dicom_port, "stable_seconds": stable_seconds,
                      "peers": loopback_peers() if peers is None else peers},
            "api": {"host": "127.0.0.1", "port": self.http_port},
            "pipeline": {"poll_seconds": 0.2, "backoff_base_seconds": 0.5, "backoff_max_seconds": 2},
            "delivery": {"base_seconds": 0.5, "max_seconds": 2},  # retries as fast as the pipeline's; give up after 72 h
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

    def carina(self, *args: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "node.cli", *args, "--config", str(self.config_path)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=self.workdir, timeout=120, input=input,
                              env=self.env)
        if check:
            assert proc.returncode == 0, f"carina {' '.join(args)} failed: {proc.stderr}"
        return proc

    def create_token(self, name: str = "tests", role: str = "admin") -> str:
        """A bearer token; admin by default, since the tests read studies and jobs as an operator."""
        self.token = self.carina("token", "create", "--name", name, "--role", role).stdout.strip().splitlines()[-1]
        return self.token

    def create_user(self, name: str, role: str, password: str) -> None:
        """A UI user; the password goes in on stdin, as `carina user add` reads it."""
        self.carina("user", "add", name, "--role", role, input=password + "\n")

    def start(self, wait_ready: bool = True) -> "CarinaNode":
        self.log = open(self.workdir / "carina.log", "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "node.cli", "serve", "--role", self.role, "--config", str(self.config_path)],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=self.workdir, env=self.env,
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


def storescu_watched(port: int, path: Path, on_line, *, called_ae: str = "CARINA", calling_ae: str = "MODALITY",
                     timeout: float = 120) -> subprocess.CompletedProcess:
    """`storescu()` for one file, calling `on_line(line)` as each line of its
    verbose output appears, so a test can act at a known point of the exchange
    (e.g. right after "Sending Store Request", i.e. mid-C-STORE)."""
    import threading

    tool = require_tool("storescu")
    env = dict(os.environ, TCP_NODELAY="1")
    args = [tool, "-v", "-aet", calling_ae, "-aec", called_ae, "127.0.0.1", str(port), str(path)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    watchdog = threading.Timer(timeout, proc.kill)
    watchdog.start()
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            on_line(line)
        proc.wait()
    finally:
        watchdog.cancel()
        proc.stdout.close()
    return subprocess.CompletedProcess(args, proc.returncode, "".join(lines), "")


def store_outcome(proc: subprocess.CompletedProcess) -> str:
    """What one storescu run of one file means for the sender:

    - 'acked': a Success response;
    - 'refused': no association was established, so nothing was sent (the
      node was down or starting); a modality simply tries again;
    - 'aborted': an association, a request, and no response: the peer aborted
      mid-C-STORE. The instance may or may not have been committed;
    - 'failed': any other ending (e.g. a failure status)."""
    text = proc.stdout + proc.stderr
    responses = store_responses(proc)
    if responses == ["Success"]:
        return "acked"
    if "Association Accepted" not in text:
        return "refused"
    if not responses and "Peer aborted Association" in text:
        return "aborted"
    return "failed"


def accepts_connections(port: int, host: str = "127.0.0.1") -> bool:
    """True when something listens on the port (a TCP connect succeeds)."""
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


# --- helpers for the durability, routing and hostile-input tests ----------------


def echoscu(port: int, called_ae: str = "CARINA", calling_ae: str = "PROBE", timeout: float = 30) -> bool:
    """True when a DICOM C-ECHO on `port` gets success (dcmtk echoscu)."""
    tool = require_tool("echoscu")
    env = dict(os.environ, TCP_NODELAY="1")
    proc = subprocess.run([tool, "-aet", calling_ae, "-aec", called_ae, "127.0.0.1", str(port)],
                          capture_output=True, text=True, env=env, timeout=timeout)
    return proc.returncode == 0


def dcmsend(port: int, *files: Path, called_ae: str = "CARINA", calling_ae: str = "MODALITY",
            extra: tuple[str, ...] = (), timeout: float = 600) -> subprocess.CompletedProcess:
    """Push files in their own transfer syntax, as a modality does (dcmtk dcmsend)."""
    tool = require_tool("dcmsend")
    env = dict(os.environ, TCP_NODELAY="1")
    return subprocess.run(
        [tool, "-v", *extra, "-aet", calling_ae, "-aec", called_ae, "127.0.0.1", str(port), *map(str, files)],
        capture_output=True, text=True, env=env, timeout=timeout,
    )


def process_memory_kb(pid: int) -> dict[str, int]:
    """VmRSS (now) and VmHWM (peak) of a process, in kB, from /proc."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def children_of(pid: int) -> list[int]:
    """The live child processes of `pid` (procfs): for a node, the stage processes that run encode
    and capture (node/pipeline/processes.py) and multiprocessing's resource tracker."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def is_stage_process(pid: int) -> bool:
    """Alive and spawned by multiprocessing to run tasks (not its resource tracker, nor a receiving
    process, node/intake_processes.py; a zombie has no cmdline)."""
    try:
        return b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes() and not is_intake_process(pid)
    except FileNotFoundError:
        return False


def is_intake_process(pid: int) -> bool:
    """A node's extra receiving process (`dicom.receiver_processes`), alive, by the name it gives itself."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() == "carina-intake" \
            and b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return False


def intake_processes_of(pid: int) -> list[int]:
    return [child for child in children_of(pid) if is_intake_process(child)]


def stage_processes_of(pid: int) -> list[int]:
    return [child for child in children_of(pid) if is_stage_process(child)]


def orthanc_study_series(pacs: "Orthanc", study_uid: str) -> list[dict]:
    """Series Orthanc holds for a StudyInstanceUID: MainDicomTags plus the instance ids."""
    found = http_json(f"{pacs.url}/tools/lookup", method="POST", data=study_uid.encode())
    studies = [item["ID"] for item in found if item["Type"] == "Study"]
    if not studies:
        return []
    assert len(studies) == 1, f"Orthanc holds {len(studies)} studies for {study_uid}"
    return http_json(f"{pacs.url}/studies/{studies[0]}/series?expand")


# Carina's output series: the kind each holds and its modality (an SC keeps its source's).
CARINA_SERIES = {"9901": ("sr", "SR"), "9902": ("sc", None), "9903": ("seg", "SEG"), "9904": ("gsps", "PR"),
                 "9905": ("pdf", "DOC")}


def carina_outputs_in_orthanc(pacs: "Orthanc", study_uid: str) -> dict[str, int]:
    """How many instances of each Carina output kind Orthanc holds for a study:
    SR (series 9901), SC (9902), SEG (9903), GSPS (9904), PDF (9905); anything
    else, the sources included, is "other"; "series" counts Carina's series."""
    counts = {"sr": 0, "sc": 0, "seg": 0, "gsps": 0, "pdf": 0, "other": 0, "series": 0}
    for series in orthanc_study_series(pacs, study_uid):
        tags = series["MainDicomTags"]
        kind, modality = CARINA_SERIES.get(str(tags.get("SeriesNumber")), ("other", None))
        if modality and tags.get("Modality") != modality:
            kind = "other"
        counts[kind] += len(series["Instances"])
        counts["series"] += kind != "other"
    return counts


def expected_outputs(view: dict, versions: int = 1) -> dict[str, int]:
    """What Carina delivers for a study view (/api/v1/studies/{uid}) with every
    output kind on: one SR and one Encapsulated PDF per version; per scored
    image one SC per positive finding plus a summary, and a SEG and a GSPS when
    a positive finding has a region; the series they fill."""
    images = view["images"]
    drawn = sum(1 for img in images if any(f["positive"] and f["regions"] for f in img["findings"]))
    counts = {"sr": versions, "sc": positives(view) + len(images), "seg": drawn, "gsps": drawn, "pdf": versions,
              "other": 0}
    counts["series"] = sum(1 for kind in ("sr", "sc", "seg", "gsps", "pdf") if counts[kind])
    return counts


def carina_db_rows(node: "CarinaNode", sql: str, params: tuple = ()) -> list[tuple]:
    """Read-only query of a CarinaNode's database: its SQLite file (safe while it runs: WAL),
    or the PostgreSQL database its environment names (conftest.py `both_backends`).
    `sql` uses SQLite's `?` placeholders; they become psycopg's on PostgreSQL."""
    import sqlite3

    url = node.env.get("CARINA_DATABASE__URL")
    if url:
        from sqlalchemy import create_engine

        engine = create_engine(url)
        try:
            with engine.connect() as conn:
                return [tuple(row) for row in conn.exec_driver_sql(sql.replace("?", "%s"), params).fetchall()]
        finally:
            engine.dispose()

    db = node.workdir / "var" / "carina.db"
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def study_state(node: "CarinaNode", study_uid: str, calling_ae: str | None = None) -> dict | None:
    """The node's /api/v1/studies/{uid} view, or None when the node does not know the study."""
    suffix = f"?calling_ae={calling_ae}" if calling_ae else ""
    try:
        return node.api(f"/api/v1/studies/{study_uid}{suffix}")
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None
        raise


def positives(view: dict) -> int:
    """Positive findings over the scored images of a study view: one heatmap SC each."""
    return sum(1 for img in view["images"] for f in img["findings"] if f["positive"])


def send_raw(port: int, items: list[tuple[Path, str, str]], *, called_ae: str = "CARINA",
             calling_ae: str = "HOSTILE", timeout: float = 60) -> list[object]:
    """C-STORE files byte for byte over one pynetdicom association.

    `items` are (path, sop_class, transfer_syntax). The dataset after the file
    meta is streamed as it is on disk (STORE_SEND_CHUNKED_DATASET), so garbage
    goes out as garbage, which dcmtk refuses to send. Returns one entry per
    item: the response status (int), 'no-context' when the SCP did not accept
    that SOP class + syntax, or 'no-response' when the association died."""
    from pynetdicom import AE, _config

    from dicom_scp.sockets import LOW_LATENCY_HANDLER

    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.maximum_pdu_size = 0
    contexts = sorted({(sop_class, syntax) for _, sop_class, syntax in items})
    assert len(contexts) <= 127, "one association proposes at most 128 contexts"
    for sop_class, syntax in contexts:
        ae.add_requested_context(sop_class, [syntax])
    # Verification too, so a refused storage context is a per-context answer
    # rather than an association without any accepted context.
    ae.add_requested_context("1.2.840.10008.1.1")
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    results: list[object] = []
    try:
        assoc = ae.associate("127.0.0.1", port, ae_title=called_ae, evt_handlers=[LOW_LATENCY_HANDLER])
        assert assoc.is_established, f"association with {called_ae} on {port} not established"
        accepted = {(cx.abstract_syntax, cx.transfer_syntax[0]) for cx in assoc.accepted_contexts}
        try:
            for path, sop_class, syntax in items:
                if (sop_class, syntax) not in accepted:
                    results.append("no-context")
                    continue
                if not assoc.is_established:
                    results.append("no-response")
                    continue
                rsp = assoc.send_c_store(path)
                results.append(int(rsp.Status) if rsp and "Status" in rsp else "no-response")
        finally:
            if assoc.is_established:
                assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous
    return results


from contextlib import contextmanager


@contextmanager
def node_with_pacs(workdir: Path, *, start: bool = True, **node_kwargs):
    """A real Orthanc and a `carina serve` delivering to it; both stopped on exit."""
    pacs = Orthanc(Path(workdir) / "orthanc").start()
    node = CarinaNode(
        Path(workdir) / "carina",
        destinations=[{"name": "pacs", "type": "dicom", "ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.dicom_port}],
        **node_kwargs,
    )
    try:
        node.create_token()
        if start:
            node.start()
        yield node, pacs
    finally:
        node.stop()
        pacs.stop()


# Orthanc's DICOMweb plugin (Debian orthanc-dicomweb): STOW-RS, QIDO-RS and
# WADO-RS at /dicom-web/, and a STOW-RS client to the servers it is given.
ORTHANC_DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def orthanc_dicomweb(servers: dict | None = None) -> dict:
    """The Orthanc configuration keys that load the DICOMweb plugin at /dicom-web/.
    `servers` are the DICOMweb servers it may send to ("DicomWeb.Servers")."""
    if not ORTHANC_DICOMWEB_PLUGIN.exists():
        pytest.fail(f"{ORTHANC_DICOMWEB_PLUGIN} is missing; `make test` installs orthanc-dicomweb "
                    "(scripts/ensure-peers.sh)")
    return {"Plugins": [str(ORTHANC_DICOMWEB_PLUGIN)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "Servers": servers or {}}}
