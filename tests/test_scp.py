"""The Storage SCP against dcmtk peers (echoscu, storescu) and a real database."""
from __future__ import annotations

import copy
import os
import socket
import subprocess
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from sqlalchemy import select

from dicom_scp.scp import StorageSCP
from dicom_scp.sockets import _low_latency
from dicom_scp.contexts import decodable_transfer_syntaxes
from dicom_scp.listener import SupportedContexts
from dicom_factory import SIIM_MONO1, make_dx, write
from node.db import Instance, Study
from node.receiver import NOT_CHEST, Receiver
from node.storage import instance_path, safe_path_component
from peers import accepts_connections, free_port, loopback_policy, require_tool, store_responses, storescu, wait_until


@pytest.fixture
def db(sqlite_db):
    return sqlite_db


def start_scp(tmp_path, db, *, min_free_mb: float = 0, accept=None, **kwargs) -> StorageSCP:
    """The SCP with the node's receiver as its acceptor, as `carina serve` wires it."""
    accept = accept or Receiver(db, tmp_path / "instances", min_free_mb)
    kwargs.setdefault("peers", loopback_policy())
    scp = StorageSCP(ae_title="CARINA", host="127.0.0.1", port=free_port(), accept=accept, **kwargs)
    scp.start()
    return scp


@pytest.fixture
def scp(tmp_path, db):
    server = start_scp(tmp_path, db)
    yield server
    server.stop()


def test_echo_answers(scp):
    tool = require_tool("echoscu")
    proc = subprocess.run([tool, "-aet", "MOD", "-aec", "CARINA", "127.0.0.1", str(scp.port)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr


def test_stores_dx_and_jpeg_cr_durably_with_rows(scp, db, tmp_path):
    dx = write(make_dx(), tmp_path / "dx.dcm")
    proc = storescu(scp.port, dx, calling_ae="MODALITY")
    assert proc.returncode == 0, proc.stderr
    proc = storescu(scp.port, SIIM_MONO1, calling_ae="MODALITY", extra=("-xy",))  # propose JPEG baseline
    assert proc.returncode == 0, proc.stderr

    with db.session() as s:
        rows = s.scalars(select(Instance)).all()
        assert len(rows) == 2
        for row in rows:
            stored = dcmread(row.path)
            assert stored.SOPInstanceUID == row.sop_instance_uid
            assert row.state == "stored"
        jpeg = next(r for r in rows if r.sop_instance_uid == dcmread(SIIM_MONO1).SOPInstanceUID)
        assert jpeg.transfer_syntax_uid == "1.2.840.10008.1.2.4.50"
        # Stored exactly as sent: the JPEG bytes are not transcoded.
        assert dcmread(jpeg.path).PixelData == dcmread(SIIM_MONO1).PixelData
        studies = s.scalars(select(Study)).all()
        assert {st.calling_ae for st in studies} == {"MODALITY"}
        assert all(st.state == "received" for st in studies)


def test_same_study_from_two_callers_stays_two_studies(scp, db, tmp_path):
    ds = make_dx()
    path = write(ds, tmp_path / "dx.dcm")
    assert storescu(scp.port, path, calling_ae="ROUTE_A").returncode == 0
    assert storescu(scp.port, path, calling_ae="ROUTE_B").returncode == 0
    with db.session() as s:
        studies = s.scalars(select(Study).where(Study.study_uid == ds.StudyInstanceUID)).all()
        assert sorted(st.calling_ae for st in studies) == ["ROUTE_A", "ROUTE_B"]


def _ct_dataset() -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.Modality = "CT-1", "CT"
    ds.Rows = ds.Columns = 4
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = b"\0" * 32
    return ds


def test_other_storage_class_is_stored_and_marked_ignored(scp, db, tmp_path):
    path = write(_ct_dataset(), tmp_path / "ct.dcm")
    proc = storescu(scp.port, path)
    assert proc.returncode == 0, proc.stderr
    with db.session() as s:
        row = s.scalars(select(Instance)).one()
        assert row.state == "ignored" and row.reason == NOT_CHEST
        assert Path(row.path).exists()


def test_disk_floor_answers_out_of_resources(tmp_path, db):
    server = start_scp(tmp_path, db, min_free_mb=10**12)  # a floor no disk can meet
    try:
        path = write(make_dx(), tmp_path / "dx.dcm")
        proc = storescu(server.port, path)
        assert store_responses(proc) == ["Refused: OutOfResources"]  # 0xA7xx
        with db.session() as s:
            assert s.scalars(select(Instance)).all() == []
    finally:
        server.stop()


def test_database_failure_is_never_acknowledged(tmp_path, db):
    def broken_acceptor(_instance):
        raise RuntimeError("database is down")

    server = start_scp(tmp_path, db, accept=broken_acceptor)
    try:
        path = write(make_dx(), tmp_path / "dx.dcm")
        proc = storescu(server.port, path)
        # A C-STORE whose DB row failed must not succeed.
        assert store_responses(proc) == ["Refused: OutOfResources"]
        # And the SCP is still alive for the next association.
        assert subprocess.run([require_tool("echoscu"), "-aec", "CARINA", "127.0.0.1", str(server.port)], timeout=30).returncode == 0
    finally:
        server.stop()


def test_unsafe_uids_never_escape_the_storage_root(tmp_path):
    root = tmp_path / "instances"
    path = instance_path(root, "../../etc", "1.2/../../x", "..")
    assert root in path.parents
    assert safe_path_component("1.2.840.1") == "1.2.840.1"


def test_tcp_nodelay_is_set_on_association_sockets():
    class _Socket:
        def __init__(self, s):
            self.socket = s

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    client = socket.create_connection(server.getsockname())
    try:
        event = type("E", (), {})()
        event.assoc = type("A", (), {})()
        event.assoc.dul = type("D", (), {"socket": _Socket(client)})()
        assert client.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0
        _low_latency(event)
        assert client.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    finally:
        client.close()
        server.close()


def test_each_association_gets_its_own_copy_of_the_offered_contexts(scp):
    """pynetdicom deep-copies the listener's contexts for every association; SupportedContexts
    does it without copy.deepcopy's cost, and must give the same, independent copy."""
    offered = scp._server.contexts
    assert isinstance(offered, SupportedContexts) and len(offered) > 100
    cheap, reference = copy.deepcopy(offered), copy.deepcopy(list(offered))
    assert [vars(c) for c in cheap] == [vars(c) for c in reference]
    for mine, original in zip(cheap, offered):
        assert mine is not original and mine.transfer_syntax is not original.transfer_syntax
    before = list(offered[0].transfer_syntax)
    cheap[0].add_transfer_syntax("1.2.840.10008.1.2.4.201")  # HTJ2K, added to the copy only
    assert "1.2.840.10008.1.2.4.201" in cheap[0].transfer_syntax and offered[0].transfer_syntax == before
    # Negotiation on the copies still works (echoscu proposes Verification).
    proc = subprocess.run([require_tool("echoscu"), "-aet", "MOD", "-aec", "CARINA", "127.0.0.1", str(scp.port)],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr


def test_offers_every_decodable_syntax_for_chest_classes():
    names = set(decodable_transfer_syntaxes())
    for uid in ("1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80",
                "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.1.99"):
        assert uid in names


def test_the_scp_s_associations_wait_for_work_not_for_a_tick(tmp_path, db, monkeypatch):
    """dicom_scp/sockets.py: each association's DUL and reactor wait on their
    socket and queues instead of sleeping pynetdicom's 1 ms tick (what that buys
    is bench/ingest.py's to show); the hooks go when the connection closes, and
    a thread that is not a hooked reactor still sleeps."""
    import threading
    import time

    import pynetdicom.association
    import pynetdicom.dul
    from pynetdicom import AE

    from dicom_scp import sockets
    from dicom_scp.sockets import _DulTime, _ReactorTime

    assert isinstance(pynetdicom.dul.time, _DulTime) and isinstance(pynetdicom.association.time, _ReactorTime)
    scp = start_scp(tmp_path, db)
    try:
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context("1.2.840.10008.1.1")
        assoc = ae.associate("127.0.0.1", scp.port, ae_title="CARINA")
        assert assoc.is_established
        (served,) = scp._server.active_associations
        assert served._carina_waits_for_work and served.dul._carina_wakeup is not None
        dul_waits = []
        monkeypatch.setattr(sockets, "select", _RecordingSelect(dul_waits))
        for _ in range(20):  # requests and responses flow through the hooked waits
            assert assoc.send_c_echo().Status == 0x0000
        assoc.release()
        # The reactor saw the peer's A-RELEASE (handed up by the DUL, it sets the reactor's event)
        # and answered it; it marks the association released just after sending that answer.
        wait_until(lambda: served.is_released, 10, what="the acceptor's reactor handling the release")
        # Nothing reaches a hooked DUL without waking it, so its idle wait is IDLE_WAIT, not 1 ms.
        assert dul_waits and min(dul_waits) >= sockets.IDLE_WAIT
        wait_until(lambda: served.dul._carina_wakeup is None, 10, what="the wake-up socket closed with the connection")
    finally:
        monkeypatch.undo()
        scp.stop()

    me, real_sleep, calls = threading.current_thread(), time.sleep, []
    monkeypatch.setattr(time, "sleep", lambda s: calls.append(s) if threading.current_thread() is me else real_sleep(s))
    pynetdicom.association.time.sleep(0.001)  # not a hooked reactor: it sleeps
    me._carina_waits_for_work = True
    try:
        pynetdicom.association.time.sleep(0.001)  # a hooked reactor: it waits in get_msg instead
        pynetdicom.association.time.sleep(0.1)  # any other wait is left alone
    finally:
        del me._carina_waits_for_work
        monkeypatch.undo()
    assert calls == [0.001, 0.1]


class _RecordingSelect:
    """`select` for dicom_scp.sockets that notes each timeout it is given."""

    def __init__(self, timeouts: list[float]):
        self.timeouts = timeouts

    def select(self, rlist, wlist, xlist, timeout=None):
        self.timeouts.append(timeout)
        import select as select_module

        return select_module.select(rlist, wlist, xlist, timeout)


def test_a_queued_item_wakes_whoever_waits_for_it():
    """dicom_scp/sockets.py: what the DUL hands up (a DIMSE message, an A-RELEASE,
    an A-ABORT) sets the acceptor reactor's event after the item is in the queue,
    so a reactor woken by it finds the item."""
    import queue
    import threading

    from dicom_scp.sockets import _set_after_put

    handed_up, work = queue.Queue(), threading.Event()
    seen = []
    original_set = work.set
    work.set = lambda: (seen.append(handed_up.qsize()), original_set())
    _set_after_put(handed_up, work)
    handed_up.put(("1", "A-RELEASE"))
    assert work.is_set() and seen == [1] and handed_up.get_nowait() == ("1", "A-RELEASE")


def test_the_scu_gets_every_response_over_one_long_association(tmp_path, caplog):
    """dicom_scp/sockets.py hooks the associations Carina requests too, but
    their reactor must never wait on the DIMSE queue: the sender reads its
    C-STORE responses from it. When it did, a fast peer's response was now
    and then taken by the reactor ("Received unexpected C-STORE service
    message") and the send timed out and aborted: a delivery failed and was
    sent again (the CI failures of test_ops_slow_destination and
    test_conformance_statement). Against dcmtk's storescp answering at once on
    loopback, that happened within a few hundred small instances; every one of
    them over one association must now be acknowledged."""
    import numpy as np

    from dicom_scp.scu import send_files

    received = tmp_path / "received"
    received.mkdir()
    files = [write(make_dx(np.full((16, 16), n % 256, np.uint8), patient_id="SCU-LOOP"), tmp_path / f"{n}.dcm")
             for n in range(400)]
    port = free_port()
    # dcmtk 3.6.7 leaves Nagle on unless TCP_NODELAY=1: with it, it answers at once, as a fast PACS does.
    peer = subprocess.Popen([require_tool("storescp"), "-od", str(received), str(port)],
                            env={**os.environ, "TCP_NODELAY": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: accepts_connections(port), 30, what="storescp listening")
        with caplog.at_level("WARNING", logger="pynetdicom"):
            report = send_files(files, calling_ae="CARINA", called_ae="STORESCP", host="127.0.0.1", port=port,
                                timeout=10)
    finally:
        peer.terminate()
        peer.wait(10)
    assert len(report.statuses) == len(files) and not report.failed
    assert len(list(received.iterdir())) == len(files)
    assert not [r.message for r in caplog.records if "unexpected" in r.message]
