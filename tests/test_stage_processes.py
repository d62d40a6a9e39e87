"""Encode and capture in stage processes (node/pipeline/processes.py).

The stages' bytes from a stage process are checked against the recorded ones
in tests/test_golden_outputs.py; here: a stage process that dies costs one
retryable attempt and is replaced, a stage's error keeps its code and detail
across the process boundary, a stage process's log records reach the node's
handlers with the job's context, and `carina serve` runs its stage processes
beside the workers and takes them down with it, even when it is SIGKILLed.
"""
from __future__ import annotations

import logging
import os
import pickle
import signal

import pytest
from sqlalchemy import select

from dicom_factory import make_dx, write
from node.db import Job, JobError, Output
from node.jobs import PermanentError, RetryableError
from node.pipeline.processes import StageProcesses
from node.states import OutputKind, Stage
from node.storage import display_path
from peers import CarinaNode, dcmsend, is_stage_process, stage_processes_of, wait_until
from pipeline_rig import PipelineRig


@pytest.fixture
def rig(tmp_path):
    rig = PipelineRig(tmp_path)
    rig.ctx.stage_processes = StageProcesses(rig.settings, 1)
    rig.ctx.stage_processes.start()
    yield rig
    rig.ctx.stage_processes.stop()
    rig.close()


@pytest.mark.parametrize("error", [RetryableError, PermanentError])
def test_a_stage_error_keeps_its_code_and_detail_across_processes(error):
    back = pickle.loads(pickle.dumps(error("capture: disk full", "the full text for admins")))
    assert type(back) is error
    assert (back.code, back.detail) == ("capture: disk full", "the full text for admins")


def test_a_stage_process_that_dies_costs_one_retryable_attempt_and_is_replaced(rig):
    study_id, _ = rig.add_study({"Effusion": 0.9})
    (child,) = stage_processes_of(os.getpid())
    os.kill(child, signal.SIGKILL)
    wait_until(lambda: child not in stage_processes_of(os.getpid()), 30, what="the stage process gone")

    rig.encode(study_id)

    with rig.db.session() as s:
        encode = s.scalar(select(Job).where(Job.study_id == study_id, Job.stage == Stage.ENCODE))
        errors = s.scalars(select(JobError.summary).where(JobError.job_id == encode.id)).all()
        kinds = set(s.scalars(select(Output.kind).where(Output.study_id == study_id)))
    assert (encode.state, encode.attempts) == ("done", 2)
    assert errors == ["encode process died"]
    assert {OutputKind.SR, OutputKind.SC} <= kinds
    (replacement,) = stage_processes_of(os.getpid())
    assert replacement != child


def test_a_stage_process_logs_through_the_node_with_the_job_context(rig, caplog):
    study_id, ds = rig.add_study({"Effusion": 0.9})
    rendition = display_path(rig.ctx.work_dir, "MODALITY", str(ds.StudyInstanceUID), 1, str(ds.SOPInstanceUID))
    rig.ctx.renditions.settle([rendition])
    rendition.write_bytes(b"not a rendition")  # so the stage process warns and decodes the source again

    with caplog.at_level(logging.WARNING):
        rig.encode(study_id)

    warned = [r for r in caplog.records if "display rendition" in r.getMessage()]
    assert warned and all(r.process != os.getpid() for r in warned)
    assert {r.study_uid for r in warned} == {str(ds.StudyInstanceUID)}
    assert {r.stage for r in warned} <= {Stage.ENCODE, Stage.CAPTURE}


def test_carina_serve_runs_its_stage_processes_and_stops_them(tmp_path):
    dx = make_dx(patient_id="STAGE-PROC-1")
    node = CarinaNode(tmp_path / "carina", extra={"pipeline": {"stage_processes": 2}}).start()
    try:
        wait_until(lambda: len(stage_processes_of(node.proc.pid)) == 2, 60, what="two stage processes")
        stage_processes = stage_processes_of(node.proc.pid)
        node.create_token()
        assert dcmsend(node.dicom_port, write(dx, tmp_path / "dx.dcm")).returncode == 0
        study = f"/api/v1/studies/{dx.StudyInstanceUID}"
        wait_until(lambda: node.api(study)["state"] in ("done", "failed"), 240, what="study settled")
        assert node.api(study)["state"] == "done"
        assert stage_processes_of(node.proc.pid) == stage_processes  # the same two did the work
    finally:
        node.stop()
    assert node.proc.returncode == 0
    assert not [pid for pid in stage_processes if is_stage_process(pid)]


def test_the_stage_processes_of_a_killed_node_end_with_it(tmp_path):
    node = CarinaNode(tmp_path / "carina").start()
    try:
        wait_until(lambda: len(stage_processes_of(node.proc.pid)) == 1, 60, what="the stage process")
        (stage_process,) = stage_processes_of(node.proc.pid)
    finally:
        node.kill()  # SIGKILL: no shutdown code runs
    wait_until(lambda: not is_stage_process(stage_process), 30, what="the orphaned stage process to exit")

