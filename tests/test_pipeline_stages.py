"""The worker's load / run / settle around every stage: version checks and
what a stage may do to a study that changed while it ran."""
from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select

from dicom_scp.scp import ReceivedInstance
from node.completion import complete_quiet_studies
from node.db import Job, Output, Study, now
from node.outputs import uids
from node.receiver import record_instance
from node.states import JobState, Stage, StudyState
from pipeline_rig import DEMO, PipelineRig

# On SQLite and on PostgreSQL (tests/conftest.py both_backends).
pytestmark = pytest.mark.usefixtures("both_backends")


@pytest.fixture
def rig(tmp_path):
    rig = PipelineRig(tmp_path)
    yield rig
    rig.close()


def _late_instance(ds, sop_uid: str) -> ReceivedInstance:
    return ReceivedInstance(
        calling_ae="MODALITY", peer_address="127.0.0.1", sop_class_uid=str(ds.SOPClassUID), sop_instance_uid=sop_uid,
        study_uid=str(ds.StudyInstanceUID), series_uid=str(ds.SeriesInstanceUID),
        transfer_syntax_uid="1.2.840.10008.1.2.1", patient_id=str(ds.PatientID),
        accession_number=str(ds.AccessionNumber), modality="DX", temp_path=Path("/nonexistent"), size_bytes=1,
    )


def test_a_late_instance_during_encode_is_not_buried_by_the_encode(rig):
    """Encode of version 1 settles after a late image reopened the study: the
    outputs of version 1 are kept, but the study stays RECEIVED so that
    completion runs version 2 (before, encode set DONE and the late image
    was never scored)."""
    study_id, ds = rig.add_study({"Effusion": 0.8})
    record_instance(rig.db, _late_instance(ds, generate_uid()), rig.ctx.instances_dir / "late.dcm")
    with rig.db.session() as s:
        assert s.get(Study, study_id).state == StudyState.RECEIVED
    rig.encode(study_id)  # version 1's encode finishes now
    with rig.db.session() as s:
        study = s.get(Study, study_id)
        assert (study.state, study.version) == (StudyState.RECEIVED, 1)
    assert complete_quiet_studies(rig.db, stable_seconds=0.1, at=now() + 1) == [study_id]
    with rig.db.session() as s:
        study = s.get(Study, study_id)
        assert (study.state, study.version) == (StudyState.PROCESSING, 2)
        assert s.scalar(select(Job).where(Job.study_id == study_id, Job.stage == Stage.INFER,
                                          Job.study_version == 2)) is not None


def test_a_superseded_job_is_done_without_running_its_stage(rig):
    study_id, ds = rig.add_study({"Effusion": 0.8})
    rig.rescore(study_id, ds, {})  # version 2 exists before version 1 was encoded
    rig.encode(study_id)  # version 2's encode
    with rig.db.session() as s:
        stale = s.scalar(select(Job).where(Job.study_id == study_id, Job.stage == Stage.ENCODE,
                                           Job.study_version == 1))
        versions = set(s.scalars(select(Output.version).where(Output.study_id == study_id)))
        sr_v1 = s.scalar(select(Output).where(Output.sop_instance_uid == uids.sr_instance_uid(
            [str(ds.SOPInstanceUID)], DEMO.ref, 1)))
    assert stale.state == JobState.DONE  # claimed and settled as superseded...
    assert versions == {2} and sr_v1 is None  # ...without encoding version 1
