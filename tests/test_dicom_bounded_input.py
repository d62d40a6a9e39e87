"""Issue 10: bounded input. A small Deflated dataset must not inflate whole in memory.

Deflate reaches ~1000:1 on uniform pixels, so a 1 MB C-STORE can be a 1 GB
dataset. Carina still accepts Deflated Explicit VR Little Endian, but inflates
it in chunks with a cap (dicom.max_inflated_mb) everywhere it reads network or
upload input: the SCP's header check, the infer and encode stages, and the
predict API's decode. The decisive test sends 20 concurrent associations, each
a Deflated dataset that would inflate to 1 GiB, to a real `carina serve`.
"""
from __future__ import annotations

import io
import threading
import zlib
from functools import lru_cache
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import DeflatedExplicitVRLittleEndian

from dicom_factory import dataset_bytes, deflated, make_dx, small_chest_pixels, write, write_raw
from inference.dicom_file import InflateLimitExceeded, dcmread_bounded, inflate, read_header
from peers import CarinaNode, echoscu, process_memory_kb, send_raw, study_state, wait_until
from test_hostile_input import control_sender

DX = "1.2.840.10008.5.1.4.1.1.1.1"
CANNOT_UNDERSTAND = 0xC000
GIB_SIDE = 23170  # 23170² 16-bit pixels: 1,073,651,200 bytes of Pixel Data
BOMBS = 20
RSS_LIMIT_KB = 1536 * 1024  # 1.5 GiB


def _deflate(data: bytes) -> bytes:
    c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return c.compress(data) + c.flush()


@lru_cache(maxsize=1)
def _gigabyte_of_zeros_deflated() -> bytes:
    """The tail of every bomb: 1 GiB of zero pixels as the final deflate blocks (~1 MB)."""
    c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    out = bytearray()
    chunk = bytes(2**24)
    remaining = GIB_SIDE * GIB_SIDE * 2
    while remaining:
        n = min(remaining, len(chunk))
        out += c.compress(chunk[:n])
        remaining -= n
    return bytes(out + c.flush())


def write_bomb(path: Path, patient_id: str) -> tuple[Path, str]:
    """A valid Deflated DX whose dataset inflates to just over 1 GiB, in ~1 MB.

    The header is deflated on its own and sync-flushed (so its blocks are not
    final); the shared zero-pixel blocks follow. Two raw deflate streams
    joined like that are one valid stream."""
    import struct

    ds = make_dx(np.zeros((2, 2), np.uint8), patient_id=patient_id)
    del ds.PixelData
    ds.Rows = ds.Columns = GIB_SIDE
    head = dataset_bytes(ds) + struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, GIB_SIDE * GIB_SIDE * 2)
    c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    body = c.compress(head) + c.flush(zlib.Z_SYNC_FLUSH) + _gigabyte_of_zeros_deflated()
    if len(body) % 2:
        body += b"\0"  # PS3.5 A.5: pad the deflated stream to even length
    write_raw(path, DX, ds.SOPInstanceUID, DeflatedExplicitVRLittleEndian, body)
    return path, ds.StudyInstanceUID


# --- the bounded reader ---------------------------------------------------------------


def test_bounded_reader_matches_pydicom_and_stops_at_the_cap(tmp_path):
    ds = deflated(make_dx(small_chest_pixels(3), patient_id="DEFL-1"))
    path = tmp_path / "deflated.dcm"
    ds.save_as(path, enforce_file_format=True)
    ours, theirs = dcmread_bounded(path), pydicom.dcmread(path)
    assert ours.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian
    assert ours == theirs and ours.PixelData == theirs.PixelData
    assert dcmread_bounded(io.BytesIO(path.read_bytes())) == theirs
    header = read_header(path, ["PatientID", "StudyInstanceUID"])
    assert (header.PatientID, header.StudyInstanceUID) == ("DEFL-1", ds.StudyInstanceUID)
    plain = write(make_dx(small_chest_pixels(4)), tmp_path / "plain.dcm")
    assert dcmread_bounded(plain, max_inflated_bytes=1) == pydicom.dcmread(plain)  # not Deflated: no cap to hit

    with pytest.raises(InflateLimitExceeded, match="inflates beyond the 1,000 bytes limit"):
        dcmread_bounded(path, max_inflated_bytes=1000)
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(zlib.error):
        read_header(truncated, ["PatientID"])

    # Chunked inflation of 1 GiB holds at most a chunk: the bomb is refused at the cap.
    stream = io.BytesIO(_gigabyte_of_zeros_deflated())
    with pytest.raises(InflateLimitExceeded):
        inflate(stream, limit=128 * 2**20)
    stream.seek(0)
    kept, total = inflate(stream, limit=2**31, keep=16)
    assert (kept, total) == (bytes(16), GIB_SIDE * GIB_SIDE * 2)
    assert inflate(io.BytesIO(_deflate(b"x" * 5_000_001) + b"\0"), limit=10**7)[1] == 5_000_001  # padding ignored


def test_predict_decode_refuses_a_deflate_bomb(tmp_path):
    from inference import DecodeError
    from inference.engine import decode_image

    path, _ = write_bomb(tmp_path / "bomb.dcm", "PREDICT-BOMB")
    assert path.stat().st_size < 2 * 2**20
    for source in (path.read_bytes(), path):  # an upload's bytes, or a file
        with pytest.raises(DecodeError, match="inflates beyond the 128 MiB limit"):
            decode_image(source)


# --- 20 concurrent bombs against `carina serve` ---------------------------------------------


def test_twenty_concurrent_deflate_bombs_are_refused_and_memory_stays_bounded(tmp_path):
    node = CarinaNode(tmp_path / "carina", stable_seconds=1.0,
                      extra={"dicom": {"max_associations": BOMBS + 4}})  # room for all of them plus the control
    node.create_token()
    node.start()
    try:
        bombs = [write_bomb(tmp_path / f"bomb-{n}.dcm", f"BOMB-{n}") for n in range(BOMBS)]
        sizes = sorted(p.stat().st_size for p, _ in bombs)
        assert sizes[-1] < 2 * 2**20, sizes  # each under 2 MB on the wire

        # Deflated still works: a real small one is stored and scored.
        good = make_dx(small_chest_pixels(9), patient_id="DEFL-GOOD")
        good_path = write_raw(tmp_path / "good-deflated.dcm", DX, good.SOPInstanceUID, DeflatedExplicitVRLittleEndian,
                              _deflate(dataset_bytes(good)))
        assert send_raw(node.dicom_port, [(good_path, DX, DeflatedExplicitVRLittleEndian)]) == [0]

        pid = node.proc.pid
        before = process_memory_kb(pid)
        statuses: dict[int, object] = {}
        start = threading.Barrier(BOMBS)

        def bomber(n: int) -> None:
            start.wait(60)
            path, _ = bombs[n]
            try:
                (statuses[n],) = send_raw(node.dicom_port, [(path, DX, DeflatedExplicitVRLittleEndian)], timeout=300)
            except Exception as exc:  # noqa: BLE001 - recorded and asserted below
                statuses[n] = repr(exc)

        stop, control_sent, control_statuses = threading.Event(), [], []
        control = threading.Thread(target=control_sender, args=(node.dicom_port, tmp_path, stop, control_sent, control_statuses))
        control.start()
        threads = [threading.Thread(target=bomber, args=(n,)) for n in range(BOMBS)]
        try:
            for t in threads:
                t.start()
            for t in threads:
                t.join(600)
        finally:
            stop.set()
            control.join(120)
        after = process_memory_kb(pid)

        assert statuses == {n: CANNOT_UNDERSTAND for n in range(BOMBS)}, statuses
        assert node.proc.poll() is None and echoscu(node.dicom_port)
        assert after["VmHWM"] < RSS_LIMIT_KB, f"peak RSS {after['VmHWM'] // 1024} MiB"
        # The control association stored all along, and nothing of a bomb was kept.
        assert len(control_statuses) >= 3 and all(st == 0 for st in control_statuses), control_statuses
        for _, study_uid in bombs:
            assert study_state(node, study_uid, "HOSTILE") is None
        assert "deflated dataset inflates beyond the 128 MiB limit" in node.log_text()

        view = wait_until(lambda: (v := study_state(node, good.StudyInstanceUID, "HOSTILE")) and v["state"] in ("done", "failed") and v,
                          180, what="the good Deflated study scored")
        assert view["state"] == "done" and view["instances"][0]["state"] == "scored", view
        for uid in control_sent:
            wait_until(lambda: (v := study_state(node, uid, "CONTROL")) and v["state"] == "done", 180,
                       what=f"control study {uid} scored")
        print(f"{BOMBS} concurrent Deflated bombs ({sizes[0] // 1024}-{sizes[-1] // 1024} KiB each, 1 GiB inflated): "
              f"all 0x{CANNOT_UNDERSTAND:04X}; node peak RSS {before['VmHWM'] // 1024} MiB before -> "
              f"{after['VmHWM'] // 1024} MiB after; control association stored {len(control_statuses)} images")
    finally:
        node.stop()

