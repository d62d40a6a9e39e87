"""STOW-RS limits, and STOW-RS out's retry and dead-letter rules, against a real
DICOMweb server: a Carina app on uvicorn (loopback), whose STOW-RS answers
with real FailureReasons (its disk floor: 0xA700) and real HTTP refusals."""
from __future__ import annotations

import threading
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn
from sqlalchemy import select

from dicom_factory import make_dx, small_chest_pixels
from node.api.app import create_app
from node.api.auth import create_token
from node.config import Settings
from node.context import NodeContext
from node.db import Database, Instance, Study
from node.states import JobState
from peers import free_port, wait_until
from pipeline_rig import PipelineRig

DICOM_TYPE = 'multipart/related; type="application/dicom"; boundary=XyZ'


class Archive:
    """A Carina node's HTTP API alone, on uvicorn: a STOW-RS server for these tests."""

    def __init__(self, tmp: Path, **settings):
        config = {"storage": {"data_dir": str(tmp), "min_free_mb": 0},
                  "dicomweb": {"stow_senders": [{"token": "sender", "source": "SENDER"}]}} | settings
        self.db = Database(f"sqlite:///{tmp / 'carina.db'}")
        self.db.create_schema()
        self.ctx = NodeContext(Settings(**config), self.db)
        self.token = create_token(self.db, "sender", "integration", expires_days=1)
        self.outsider = create_token(self.db, "outsider", "integration", expires_days=1)
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn.Config(create_app(self.ctx), host="127.0.0.1", port=port,
                                                    log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_until(lambda: self.server.started or not self.thread.is_alive(), 15, 0.05, what="uvicorn started")
        assert self.server.started, "uvicorn did not start"

    def stow(self, body, content_length: bool = True) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.token}", "Content-Type": DICOM_TYPE}
        return httpx.post(f"{self.url}/dicomweb/studies", content=body, headers=headers, timeout=60)

    def stored(self, source: str = "SENDER") -> list[str]:
        with self.db.session() as s:
            return sorted(s.scalars(select(Instance.sop_instance_uid).join(Study, Study.id == Instance.study_id)
                                    .where(Study.calling_ae == source)))

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.db.dispose()


@pytest.fixture
def archive(tmp_path):
    archive = Archive(tmp_path / "archive", dicomweb={"stow_senders": [{"token": "sender", "source": "SENDER"}],
                                                      "max_part_mb": 0.05, "max_request_mb": 0.5})
    yield archive
    archive.stop()


def _part(ds, tmp: Path) -> bytes:
    path = tmp / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return b"--XyZ\r\nContent-Type: application/dicom\r\n\r\n" + path.read_bytes() + b"\r\n"


def _reasons(answer: dict) -> list[int]:
    return [item["00081197"]["Value"][0] for item in answer.get("00081198", {}).get("Value", [])]


def test_a_part_over_the_limit_fails_alone(archive, tmp_path):
    small = make_dx(np.full((32, 32), 90, np.uint8), patient_id="LIMITS")
    big = make_dx(small_chest_pixels(1, size=320), patient_id="LIMITS")  # ~100 KB > 0.05 MB
    rsp = archive.stow(_part(small, tmp_path) + _part(big, tmp_path) + b"--XyZ--\r\n")
    assert rsp.status_code == 202
    assert _reasons(rsp.json()) == [0xA700]
    assert archive.stored() == [small.SOPInstanceUID]
    assert not list((archive.ctx.tmp_dir).glob("stow-*"))  # the drained part left nothing behind


def test_a_request_over_the_limit_is_refused(archive, tmp_path):
    parts = [make_dx(np.full((128, 128), i, np.uint8), patient_id="LIMITS") for i in range(40)]  # 16 KB each
    body = b"".join(_part(ds, tmp_path) for ds in parts) + b"--XyZ--\r\n"
    assert len(body) > 0.5 * 2**20
    # It says its length: refused before a byte is read.
    rsp = archive.stow(body)
    assert rsp.status_code == 413 and archive.stored() == []

    # Chunked, so the length shows only while reading: what came before the limit is
    # stored and listed, and the answer is still 413.
    def chunks():
        for start in range(0, len(body), 16384):
            yield body[start:start + 16384]

    rsp = archive.stow(chunks())
    assert rsp.status_code == 413
    stored = archive.stored()
    listed = [item["00081155"]["Value"][0] for item in rsp.json()["00081199"]["Value"]]
    assert 0 < len(stored) < len(parts) and sorted(listed) == stored


def test_a_malformed_body_is_a_400(archive):
    rsp = archive.stow(b"--XyZ\r\nContent-Type: application/dicom\r\n\r\nno closing boundary")
    assert rsp.status_code == 400
    rsp = httpx.post(f"{archive.url}/dicomweb/studies", content=b"x", timeout=30,
                     headers={"Authorization": f"Bearer {archive.token}", "Content-Type": "multipart/related"})
    assert rsp.status_code == 400 and "boundary" in rsp.text


# --- STOW-RS out ---------------------------------------------------------------------------


def _deliver(tmp_path: Path, destination: dict):
    rig = PipelineRig(tmp_path / "node", destinations=[destination])
    study_id, ds = rig.add_study({"Effusion": 0.8})
    rig.encode(study_id)
    job = rig.run_deliveries(study_id)[destination["name"]]
    return rig, job, ds


def assert_gave_up_by_time(rig: PipelineRig, job) -> None:
    """Deliveries give up by time (delivery.give_up_after_seconds), however many attempts that takes."""
    window = rig.settings.delivery.give_up_after_seconds
    assert job.state == JobState.DEAD and job.attempts >= 2 and job.finished_at - job.retry_since >= window


def test_stow_out_delivers_with_credentials_from_the_environment(tmp_path, monkeypatch):
    archive = Archive(tmp_path / "archive")
    try:
        monkeypatch.setenv("CARINA_TEST_ARCHIVE_TOKEN", archive.token)
        rig, job, ds = _deliver(tmp_path, {"name": "archive", "type": "dicomweb", "base_url": f"{archive.url}/dicomweb",
                                           "auth": {"type": "bearer", "token_env": "CARINA_TEST_ARCHIVE_TOKEN"}})
        assert job.state == JobState.DONE, job.last_error
        with rig.db.session() as s:
            from node.db import Output

            sent = sorted(s.scalars(select(Output.sop_instance_uid)))
        rig.close()
        assert archive.stored() == sent  # every output, by STOW-RS, as the archive's own intake recorded them
    finally:
        archive.stop()


def test_stow_out_retries_failure_reasons_that_may_pass_then_dead_letters(tmp_path, monkeypatch):
    # The archive is below its disk floor: every part fails with 0xA700, which may pass.
    archive = Archive(tmp_path / "archive", storage={"data_dir": str(tmp_path / "archive"), "min_free_mb": 10**9})
    try:
        monkeypatch.setenv("CARINA_TEST_ARCHIVE_TOKEN", archive.token)
        rig, job, _ = _deliver(tmp_path, {"name": "archive", "type": "dicomweb", "base_url": f"{archive.url}/dicomweb",
                                          "auth": {"type": "bearer", "token_env": "CARINA_TEST_ARCHIVE_TOKEN"}})
        assert_gave_up_by_time(rig, job)
        assert "did not store" in job.last_error and "0xA700" in job.last_error
        rig.close()
    finally:
        archive.stop()


def test_stow_out_dead_letters_a_refusal_at_once(tmp_path, monkeypatch):
    archive = Archive(tmp_path / "archive")
    try:
        monkeypatch.setenv("CARINA_TEST_ARCHIVE_TOKEN", archive.outsider)  # not one of its STOW-RS senders
        rig, job, _ = _deliver(tmp_path, {"name": "archive", "type": "dicomweb", "base_url": f"{archive.url}/dicomweb",
                                          "auth": {"type": "bearer", "token_env": "CARINA_TEST_ARCHIVE_TOKEN"}})
        assert job.state == JobState.DEAD and job.attempts == 1 and "HTTP 403" in job.last_error
        rig.close()
    finally:
        archive.stop()


def test_stow_out_retries_an_unreachable_archive(tmp_path):
    rig, job, _ = _deliver(tmp_path, {"name": "archive", "type": "dicomweb",
                                      "base_url": f"http://127.0.0.1:{free_port()}/dicomweb"})
    assert_gave_up_by_time(rig, job)
    assert "ConnectError" in job.last_error
    rig.close()
