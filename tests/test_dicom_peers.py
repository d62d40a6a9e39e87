"""Issue 10: who may associate, the PDU cap, and the association events.

Known peers are calling AE titles bound to the addresses they may connect from.
Anything else gets A-ASSOCIATE-RJ (rejected-permanent, service-user, "calling
AE title not recognised") during negotiation, as dcmtk's echoscu/storescu see
it. A PDU longer than advertised is aborted before it is read. Each association
produces one event when negotiated and one when it ends, off the C-STORE path.
"""
from __future__ import annotations

import ipaddress
import socket
import struct
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest
from pynetdicom import AE

from dicom_factory import make_dx, small_chest_pixels, write
from dicom_scp.peers import Peer, PeerPolicy
from dicom_scp.scp import StorageSCP
from dicom_scp.sockets import LOW_LATENCY_HANDLER
from node.config import Settings
from node.context import NodeContext
from node.receiver import Receiver
from peers import (
    CarinaNode,
    echoscu,
    free_port,
    loopback_peers,
    loopback_policy,
    require_tool,
    store_responses,
    storescu,
    study_state,
    wait_until,
)

VERIFICATION = "1.2.840.10008.1.1"
DX = "1.2.840.10008.5.1.4.1.1.1.1"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
REJECTION = ("Association Rejected", "Result: Rejected Permanent, Source: Service User",
             "Reason: Calling AE Title Not Recognized")


def echo(port: int, calling_ae: str) -> subprocess.CompletedProcess:
    return subprocess.run([require_tool("echoscu"), "-v", "-aet", calling_ae, "-aec", "CARINA", "127.0.0.1", str(port)],
                          capture_output=True, text=True, timeout=30)


def rejected_as_unknown(proc: subprocess.CompletedProcess) -> bool:
    text = proc.stdout + proc.stderr
    return proc.returncode != 0 and all(line in text for line in REJECTION)


# --- the policy -------------------------------------------------------------------


def test_policy_binds_each_ae_title_to_its_addresses():
    def resolve(name):
        if name == "gone.example.org":
            raise OSError("no such host")
        return frozenset({ipaddress.ip_address("10.0.0.7")} if name == "dx1.example.org" else ())

    policy = PeerPolicy([
        Peer("CR_ROOM_3", "10.20.3.41"),
        Peer("ROUTER", "10.20.0.0/24"),
        Peer("DX1", "dx1.example.org"),
        Peer("GONE", "gone.example.org"),
        Peer("V6", "fd00::/64"),
        Peer("TWICE", "10.1.1.1"),
        Peer("TWICE", "10.2.2.2"),
    ], resolve=resolve)
    allowed = [("CR_ROOM_3", "10.20.3.41"), ("CR_ROOM_3  ", "10.20.3.41"), ("ROUTER", "10.20.0.200"),
               ("DX1", "10.0.0.7"), ("V6", "fd00::12"), ("TWICE", "10.1.1.1"), ("TWICE", "10.2.2.2"),
               ("CR_ROOM_3", "::ffff:10.20.3.41")]  # a dual-stack listener's view of an IPv4 sender
    refused = [("CR_ROOM_3", "10.20.3.42"), ("cr_room_3", "10.20.3.41"), ("ROUTER", "10.20.1.1"),
               ("DX1", "10.0.0.8"), ("GONE", "10.0.0.7"), ("V6", "fd01::1"), ("TWICE", "10.3.3.3"),
               ("STRANGER", "10.20.3.41"), ("CR_ROOM_3", "not-an-address"), ("", "10.20.3.41")]
    for title, address in allowed:
        assert policy.check(title, address).accepted, (title, address)
    for title, address in refused:
        decision = policy.check(title, address)
        assert not decision.accepted, (title, address)
        assert decision.reason.startswith("calling AE title not recognised"), decision.reason
    assert "unknown AE title" in policy.check("STRANGER", "10.20.3.41").reason
    assert "not allowed from this address" in policy.check("CR_ROOM_3", "10.20.3.42").reason

    with pytest.raises(ValueError, match="no known peers"):
        PeerPolicy([])
    assert PeerPolicy.any_peer().check("ANYONE", "192.0.2.1").accepted
    # A real hostname, resolved by the system: localhost.
    assert PeerPolicy([Peer("NAMED", "localhost")]).check("NAMED", "127.0.0.1").accepted


# --- a real `carina serve` against dcmtk ------------------------------------------------


def test_unknown_or_misplaced_callers_get_a_rejection_from_a_real_node(tmp_path):
    node = CarinaNode(tmp_path / "carina", peers=[
        *loopback_peers("MODALITY"),
        {"ae_title": "LOOPNET", "host": "127.0.0.0/8"},
        {"ae_title": "NAMED", "host": "localhost"},
        {"ae_title": "FARAWAY", "host": "10.9.9.9"},  # a real AE title, but not from here
    ])
    node.create_token()
    node.start()
    try:
        for title in ("MODALITY", "LOOPNET", "NAMED"):
            proc = echo(node.dicom_port, title)
            assert proc.returncode == 0, (title, proc.stdout + proc.stderr)
        outcomes = {}
        for title in ("STRANGER", "FARAWAY"):
            proc = echo(node.dicom_port, title)
            assert rejected_as_unknown(proc), (title, proc.stdout + proc.stderr)
            outcomes[title] = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("F:")]

        # A spoofed sender cannot add an image: storescu is refused and nothing is stored.
        spoof = make_dx(small_chest_pixels(1), patient_id="SPOOF-1")
        proc = storescu(node.dicom_port, write(spoof, tmp_path / "spoof.dcm"), calling_ae="FARAWAY")
        assert rejected_as_unknown(proc) and store_responses(proc) == [], proc.stdout + proc.stderr
        assert study_state(node, spoof.StudyInstanceUID) is None
        # The same dataset from the known peer is stored.
        assert store_responses(storescu(node.dicom_port, tmp_path / "spoof.dcm", calling_ae="MODALITY")) == ["Success"]
        assert study_state(node, spoof.StudyInstanceUID, "MODALITY") is not None

        # The A-ASSOCIATE-RJ fields themselves, as a pynetdicom requestor reads them.
        ae = AE(ae_title="STRANGER")
        ae.add_requested_context(VERIFICATION)
        assoc = ae.associate("127.0.0.1", node.dicom_port, ae_title="CARINA")
        rj = assoc.acceptor.primitive
        assert assoc.is_rejected and (rj.result, rj.result_source, rj.diagnostic) == (0x01, 0x01, 0x03)

        log = node.log_text()
        assert "association from STRANGER at 127.0.0.1 rejected: calling AE title not recognised: unknown AE title" in log
        assert "association from FARAWAY at 127.0.0.1 rejected: calling AE title not recognised: not allowed from this address" in log
        assert "association from MODALITY released after 1 study(ies)" in log
        print(f"echoscu as STRANGER: {outcomes['STRANGER']}")
    finally:
        node.stop()


def test_serve_refuses_to_start_without_peers_unless_any_peer_is_explicit(tmp_path):
    bare = CarinaNode(tmp_path / "bare", peers=[])
    proc = bare.carina("serve", check=False)
    assert proc.returncode == 2, proc.stderr
    assert "dicom.peers is empty" in proc.stderr and "dicom.accept_any_peer" in proc.stderr

    both = CarinaNode(tmp_path / "both", extra={"dicom": {"accept_any_peer": True}})
    proc = both.carina("serve", check=False)
    assert proc.returncode == 2 and "not both" in proc.stderr, proc.stderr

    # Explicit: start-up warns, readiness carries the warning, anyone may associate.
    from node.intake import ACCEPT_ANY_PEER_WARNING, peer_policy

    ctx = NodeContext(settings=Settings(dicom={"accept_any_peer": True}), db=None)
    assert peer_policy(ctx).check("ANYONE", "192.0.2.1").accepted
    assert ctx.warnings == [ACCEPT_ANY_PEER_WARNING]
    listed = NodeContext(settings=Settings(dicom={"peers": loopback_peers("MODALITY")}), db=None)
    assert not peer_policy(listed).check("ANYONE", "127.0.0.1").accepted and listed.warnings == []

    node = CarinaNode(tmp_path / "any", peers=[], extra={"dicom": {"accept_any_peer": True}})
    node.start()
    try:
        assert echoscu(node.dicom_port, calling_ae="WHOEVER")
        assert ACCEPT_ANY_PEER_WARNING in node.log_text()
    finally:
        node.stop()


# --- association events -------------------------------------------------------------


@pytest.fixture
def scp_with_events(tmp_path, sqlite_db):
    events, gate = [], threading.Event()
    gate.set()

    def sink(event):
        gate.wait(60)  # a test may hold the audit sink to show it never holds up a C-STORE
        events.append(event)

    scp = StorageSCP(ae_title="CARINA", host="127.0.0.1", port=free_port(),
                     accept=Receiver(sqlite_db, tmp_path / "instances"),
                     peers=loopback_policy("MODALITY", "ABORTER"), on_association=sink)
    scp.start()
    try:
        yield scp, events, gate
    finally:
        gate.set()
        scp.stop()


def test_association_events_one_when_negotiated_and_one_when_ended(scp_with_events, tmp_path):
    scp, events, _ = scp_with_events
    a, b = (make_dx(small_chest_pixels(n), patient_id=f"EV-{n}") for n in (1, 2))
    files = [write(a, tmp_path / "a.dcm"), write(b, tmp_path / "b.dcm")]
    assert store_responses(storescu(scp.port, *files, calling_ae="MODALITY")) == ["Success", "Success"]
    assert rejected_as_unknown(echo(scp.port, "STRANGER"))

    # An association that stores one study, then aborts.
    c = make_dx(small_chest_pixels(3), patient_id="EV-3")
    ae = AE(ae_title="ABORTER")
    ae.add_requested_context(DX, [EXPLICIT_LE])
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="CARINA", evt_handlers=[LOW_LATENCY_HANDLER])
    assert assoc.is_established and assoc.send_c_store(c).Status == 0
    assoc.abort()

    wait_until(lambda: len(events) >= 5, 30, what="five association events")
    by_port: dict[int, list] = {}
    for event in events:
        by_port.setdefault(event.peer_port, []).append(event)
    kinds = sorted(tuple(e.kind for e in evs) for evs in by_port.values())
    assert kinds == [("accepted", "aborted"), ("accepted", "released"), ("rejected",)], kinds

    released = next(evs for evs in by_port.values() if evs[-1].kind == "released")[-1]
    assert (released.calling_ae, released.called_ae, released.peer_address, released.tls) == ("MODALITY", "CARINA", "127.0.0.1", False)
    assert released.study_uids == tuple(sorted([a.StudyInstanceUID, b.StudyInstanceUID]))
    aborted = next(evs for evs in by_port.values() if evs[-1].kind == "aborted")[-1]
    assert aborted.calling_ae == "ABORTER" and aborted.study_uids == (c.StudyInstanceUID,)
    (rejected,) = next(evs for evs in by_port.values() if evs[0].kind == "rejected")
    assert rejected.calling_ae == "STRANGER" and rejected.study_uids == ()
    assert rejected.reason == "calling AE title not recognised: unknown AE title"
    for evs in by_port.values():
        assert evs[0].kind in ("accepted", "rejected") and evs[0].study_uids == ()


def test_a_stuck_audit_sink_never_holds_up_storing(scp_with_events, tmp_path):
    scp, events, gate = scp_with_events
    gate.clear()  # the sink blocks from now on
    paths = [write(make_dx(small_chest_pixels(10 + n), patient_id=f"STUCK-{n}"), tmp_path / f"{n}.dcm") for n in range(3)]
    for path in paths:  # three associations, each answered while every event waits
        assert store_responses(storescu(scp.port, path, calling_ae="MODALITY")) == ["Success"]
    assert events == []
    gate.set()
    wait_until(lambda: len(events) == 6, 30, what="the six held events delivered")
    assert [e.kind for e in events].count("released") == 3


# --- the PDU cap ---------------------------------------------------------------------


def _item(kind: int, payload: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(payload)) + payload


def _associate_rq(calling: str, max_pdu: int = 16384) -> bytes:
    """A minimal A-ASSOCIATE-RQ (PS3.8 9.3.2): Verification, Implicit VR LE."""
    context = _item(0x20, bytes([1, 0, 0, 0]) + _item(0x30, VERIFICATION.encode()) + _item(0x40, b"1.2.840.10008.1.2"))
    user = _item(0x50, _item(0x51, struct.pack(">I", max_pdu)) + _item(0x52, b"1.2.826.0.1.3680043.10.1249.98"))
    body = (struct.pack(">HH", 1, 0) + b"CARINA".ljust(16) + calling.encode().ljust(16) + bytes(32)
            + _item(0x10, b"1.2.840.10008.3.1.1.1") + context + user)
    return struct.pack(">BBI", 0x01, 0, len(body)) + body


def _read_pdu(sock: socket.socket) -> tuple[int, bytes]:
    head = b""
    while len(head) < 6:
        chunk = sock.recv(6 - len(head))
        if not chunk:
            return -1, b""
        head += chunk
    kind, _, length = struct.unpack(">BBI", head)
    body = b""
    while len(body) < length:
        chunk = sock.recv(length - len(body))
        if not chunk:
            break
        body += chunk
    return kind, body


@pytest.mark.parametrize("case", ["p-data-over-the-advertised-maximum", "associate-request-over-1-MiB"])
def test_a_pdu_longer_than_allowed_is_aborted_before_it_is_read(tmp_path, sqlite_db, case):
    scp = StorageSCP(ae_title="CARINA", host="127.0.0.1", port=free_port(),
                     accept=Receiver(sqlite_db, tmp_path / "instances"), peers=loopback_policy("MODALITY", "PROBE"),
                     max_pdu_bytes=65536)
    scp.start()
    try:
        with socket.create_connection(("127.0.0.1", scp.port), timeout=30) as sock:
            if case.startswith("p-data"):
                sock.sendall(_associate_rq("MODALITY"))
                kind, _ = _read_pdu(sock)
                assert kind == 0x02, f"expected A-ASSOCIATE-AC, got PDU type {kind}"
                header = struct.pack(">BBI", 0x04, 0, 512 * 2**20)  # announces 512 MiB
            else:
                header = struct.pack(">BBI", 0x01, 0, 2 * 2**20)
            sock.sendall(header)
            sent = 0
            try:
                for _ in range(64):  # then streams up to 64 MiB of it, if the SCP lets it
                    sock.sendall(bytes(2**20))
                    sent += 2**20
            except OSError:
                pass  # the SCP closed the connection
            kind, body = _read_pdu(sock)
        assert kind == 0x07 and body == bytes([0, 0, 2, 6]), (kind, body)  # A-ABORT: service provider, invalid parameter
        print(f"{case}: A-ABORT after the sender pushed {sent // 2**20} MiB into the socket")
        assert echoscu(scp.port), "the SCP no longer answers after the abort"
    finally:
        scp.stop()


def test_large_instances_still_stream_to_disk_in_small_pdus(tmp_path, sqlite_db):
    from pydicom import dcmread

    scp = StorageSCP(ae_title="CARINA", host="127.0.0.1", port=free_port(),
                     accept=Receiver(sqlite_db, tmp_path / "instances"), peers=loopback_policy("MODALITY"),
                     max_pdu_bytes=16384)
    scp.start()
    try:
        pixels = np.random.default_rng(7).integers(0, 255, (2236, 2236), dtype=np.uint8)
        ds = make_dx(pixels, patient_id="BIG-PDU")
        path = write(ds, tmp_path / "ten-mb.dcm")
        assert path.stat().st_size > 10 * 10**6
        assert store_responses(storescu(scp.port, path, calling_ae="MODALITY")) == ["Success"]
        from sqlalchemy import select

        from node.db import Instance

        with sqlite_db.session() as s:
            (row,) = s.scalars(select(Instance)).all()
        assert dcmread(row.path).PixelData == ds.PixelData
    finally:
        scp.stop()


def test_dicom_scp_imports_nothing_from_the_node():
    import ast

    root = Path(__file__).resolve().parent.parent / "dicom_scp"
    for module in root.glob("*.py"):
        for node in ast.walk(ast.parse(module.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n == "node" or n.startswith("node.") for n in names), f"{module.name} imports {names}"

