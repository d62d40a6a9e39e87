"""`outputs.kinds`: which DICOM objects the real encode stage writes and the
real deliver stage sends to a real Orthanc. A kind switched off is neither
produced nor delivered; re-delivery sends the same objects, which the PACS
keeps once; a PACS that refuses a kind's SOP class says so, and switching
that kind off is the remedy."""
from __future__ import annotations

import subprocess

import pytest
from pydicom import dcmread
from sqlalchemy import select

from node.config import Settings
from node.db import Job, Output, Study, now
from node.jobs import enqueue
from node.states import DELIVERY_STAGES, JobState, OutputKind, Stage
from peers import Orthanc, accepts_connections, carina_outputs_in_orthanc, free_port, require_tool, wait_until
from pipeline_rig import PipelineRig

FOUR_POSITIVES = {"Pneumothorax": 0.91, "Effusion": 0.73, "Cardiomegaly": 0.66, "Mass": 0.58}
# The rig's study: one image, four positive findings, each with a region.
ALL = {"sr": 1, "sc": 4 + 1, "seg": 1, "gsps": 1, "pdf": 1}


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    pacs = Orthanc(tmp_path_factory.mktemp("orthanc")).start()
    yield pacs
    pacs.stop()


def run_study(tmp_path, pacs, kinds=None, *, port=None, delivered=JobState.DONE):
    """Encode and deliver the four-positive study; the outputs the node wrote by kind."""
    sections = {} if kinds is None else {"outputs": {"kinds": kinds}}
    destination = {"name": "pacs", "type": "dicom", "ae_title": "PACS", "host": "127.0.0.1", "port": port or pacs.dicom_port}
    rig = PipelineRig(tmp_path, destinations=[destination], **sections)
    study_id, ds = rig.add_study(FOUR_POSITIVES)
    rig.encode(study_id)
    jobs = rig.run_deliveries(study_id)
    assert jobs["pacs"].state == delivered, jobs["pacs"].last_error
    with rig.db.session() as s:
        rows = s.execute(select(Output.kind, Output.path).where(Output.study_id == study_id)).all()
    written: dict[str, list] = {}
    for kind, path in rows:
        written.setdefault(kind, []).append(path)
    return rig, study_id, ds, written


def in_pacs(pacs, study_uid) -> dict[str, int]:
    return {k: n for k, n in carina_outputs_in_orthanc(pacs, study_uid).items() if k in ALL and n}


def test_every_kind_by_default_and_a_redelivery_keeps_one_copy(tmp_path, pacs):
    assert Settings().outputs.kinds == [OutputKind.SR, OutputKind.SC, OutputKind.SEG, OutputKind.GSPS, OutputKind.PDF]
    rig, study_id, ds, written = run_study(tmp_path, pacs)
    try:
        assert {k: len(v) for k, v in written.items()} == ALL
        assert in_pacs(pacs, ds.StudyInstanceUID) == ALL
        sent_once = [r for r in pacs.receptions() if r["study"] == ds.StudyInstanceUID]
        assert len(sent_once) == sum(ALL.values())
        # the SR references the GSPS it was delivered with
        sr = dcmread(written["sr"][0])
        gsps = dcmread(written["gsps"][0])
        evidence = {i.ReferencedSOPInstanceUID for s in sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
                    for i in s.ReferencedSOPSequence}
        assert gsps.SOPInstanceUID in evidence

        # Delivered again, as after a crash between the send and its settle: the
        # jobs' leases (the report's objects, the SCs) run out, another worker
        # claims them and sends the same objects, byte for byte; the PACS still
        # holds one copy of each.
        with rig.db.session() as s:
            jobs = s.scalars(select(Job).where(Job.study_id == study_id, Job.stage.in_(DELIVERY_STAGES))).all()
            assert sorted(job.stage for job in jobs) == [Stage.DELIVER, Stage.DELIVER_SC]
            for job in jobs:
                job.state, job.lease_until = JobState.RUNNING, now() - 1
        assert rig.run_deliveries(study_id)["pacs"].state == JobState.DONE
        assert in_pacs(pacs, ds.StudyInstanceUID) == ALL
        received = [r for r in pacs.receptions() if r["study"] == ds.StudyInstanceUID]
        assert len(received) == 2 * len(sent_once)
        first, again = received[: len(sent_once)], received[len(sent_once):]
        assert sorted((r["sop"], str(r["tags"])) for r in again) == sorted((r["sop"], str(r["tags"])) for r in first)
    finally:
        rig.close()


@pytest.mark.parametrize(
    "kinds",
    [["sr"], ["sr", "seg"], ["gsps", "sr"], ["sr", "sc"], ["sr", "pdf"]],
)
def test_a_kind_switched_off_is_neither_written_nor_delivered(tmp_path, pacs, kinds):
    rig, _, ds, written = run_study(tmp_path, pacs, kinds)
    try:
        expected = {k: n for k, n in ALL.items() if k in kinds}
        assert {k: len(v) for k, v in written.items()} == expected
        assert in_pacs(pacs, ds.StudyInstanceUID) == expected
        # without a GSPS the SR names no presentation state
        sr = dcmread(written["sr"][0])
        [library] = [i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "111028"]
        entry = library.ContentSequence[0].ContentSequence[0].ReferencedSOPSequence[0]
        assert ("ReferencedSOPSequence" in entry) == ("gsps" in kinds)
    finally:
        rig.close()


NO_SEG_PROFILE = """\
[[TransferSyntaxes]]
[Uncompressed]
TransferSyntax1 = LocalEndianExplicit
TransferSyntax2 = LittleEndianImplicit

[[PresentationContexts]]
[NoSeg]
PresentationContext1 = Comprehensive3DSRStorage\\Uncompressed
PresentationContext2 = SecondaryCaptureImageStorage\\Uncompressed
PresentationContext3 = GrayscaleSoftcopyPresentationStateStorage\\Uncompressed
PresentationContext4 = EncapsulatedPDFStorage\\Uncompressed

[[Profiles]]
[NoSeg]
PresentationContexts = NoSeg
"""


def test_a_pacs_refusing_seg_gets_the_rest_and_the_operator_is_told(tmp_path, pacs):
    """dcmtk's storescp configured without the Segmentation SOP class: the SEG
    is refused at association (never sent), the delivery is dead-lettered with
    a message naming the remedy, and without `seg` in outputs.kinds it succeeds."""
    config = tmp_path / "noseg.cfg"
    config.write_text(NO_SEG_PROFILE)
    received = tmp_path / "received"
    received.mkdir()
    port = free_port()
    scp = subprocess.Popen([require_tool("storescp"), "-xf", str(config), "NoSeg", "-od", str(received), str(port)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: accepts_connections(port), 30, what="storescp listening")
        rig, study_id, _, written = run_study(tmp_path / "all", pacs, port=port, delivered=JobState.DEAD)
        job = rig.deliveries(study_id)["pacs"]
        # last_error is PHI-free (a count and the status); the per-object detail is for admins.
        error, detail = job.last_error, rig.error_detail(job)
        rig.close()
        [seg_uid] = [dcmread(p).SOPInstanceUID for p in written["seg"]]
        assert "0x0122" in error and "drop its kind from outputs.kinds" in error
        assert f"{seg_uid}=0x0122" in detail
        stored = sorted(p.name[:2] for p in received.iterdir())
        assert stored == ["PD", "PS"] + ["SC"] * 5 + ["SR"]  # everything but the SEG arrived

        rig, _, _, written = run_study(tmp_path / "no-seg", pacs, ["sr", "sc", "gsps", "pdf"], port=port)
        rig.close()
        assert "seg" not in written
    finally:
        scp.terminate()
        scp.wait(10)


def test_sr_cannot_be_switched_off():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="sr cannot be turned off"):
        Settings(outputs={"kinds": ["sc", "seg", "gsps"]})
    with pytest.raises(ValidationError, match="repeated: seg"):
        Settings(outputs={"kinds": ["sr", "seg", "seg"]})


def test_the_report_goes_out_before_the_scs_and_a_failed_capture_fails_their_delivery(tmp_path, pacs, monkeypatch):
    """Encode queues the report's delivery, capture and the SCs' delivery; the SCs'
    delivery waits for capture. Capture failing for good fails the study and the
    SCs' delivery with it, while the report's objects are already in the PACS."""
    import node.pipeline.capture as capture
    from node.jobs import PermanentError
    from node.worker import run_one

    def refuse(ctx, work):
        raise PermanentError("capture refused for the test")

    monkeypatch.setattr(capture, "run", refuse)
    destination = {"name": "pacs", "type": "dicom", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.dicom_port}
    rig = PipelineRig(tmp_path, destinations=[destination])
    try:
        study_id, ds = rig.add_study(FOUR_POSITIVES)
        with rig.db.session() as s:
            enqueue(s, study_id, Stage.ENCODE, 1)
        ran = 0
        while run_one(rig.ctx, "test-worker"):  # until nothing is runnable: the SCs' delivery never is
            ran += 1
        with rig.db.session() as s:
            jobs = {j.stage: (j.state, j.last_error) for j in s.scalars(select(Job).where(Job.study_id == study_id))}
            study = s.get(Study, study_id)
            state, reason = study.state, study.reason
        assert ran == 3  # encode, deliver, capture
        assert jobs[Stage.DELIVER] == (JobState.DONE, "")
        assert jobs[Stage.CAPTURE][0] == JobState.DEAD
        assert jobs[Stage.DELIVER_SC][0] == JobState.DEAD
        assert jobs[Stage.DELIVER_SC][1] == "capture failed: capture refused for the test"
        assert (state, reason) == ("failed", "capture: capture refused for the test")
        assert rig.deliveries(study_id)["pacs"].state == JobState.DEAD
        assert in_pacs(pacs, ds.StudyInstanceUID) == {k: n for k, n in ALL.items() if k != "sc"}
    finally:
        rig.close()
