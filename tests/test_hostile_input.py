"""Issue 3: hostile and broken input against a running `carina serve`.

Each case must end in a proper DIMSE failure status, a negotiation refusal
(for what the SCP does not offer), or a stored instance whose state is
failed/ignored with a reason; odd-but-valid input (patient names) must be
scored normally. Meanwhile the node stays up, answers C-ECHO, loses nothing it
had accepted, and a concurrent "control" association keeps storing
successfully throughout.

Senders: dcmtk `storescu`/`dcmsend` where they can send the file; byte-level
garbage that dcmtk refuses to read goes out raw through pynetdicom
(`peers.send_raw`).
"""
from __future__ import annotations

import random
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataelem import DataElement
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, generate_uid

from dicom_factory import (
    dataset_bytes,
    make_dx,
    small_chest_pixels,
    write,
    write_huge_dx,
    write_raw,
)
from peers import (
    CarinaNode,
    dcmsend,
    echoscu,
    process_memory_kb,
    send_raw,
    store_responses,
    storescu,
    study_state,
    wait_until,
)

DX = "1.2.840.10008.5.1.4.1.1.1.1"
SC = "1.2.840.10008.5.1.4.1.1.7"
CT = "1.2.840.10008.5.1.4.1.1.2"
PRIVATE_CLASS = "1.3.6.1.4.1.99999.1.1"  # nobody's storage class
JPEG_XL = "1.2.840.10008.1.2.4.110"  # no decoder installed, so not offered for chest classes
CANNOT_UNDERSTAND, DOES_NOT_MATCH, MISSING_ATTRIBUTE = 0xC000, 0xA900, 0xC210
# Proper refusals of a dataset that cannot be stored as what it claims to be.
UNUSABLE = (CANNOT_UNDERSTAND, MISSING_ATTRIBUTE, DOES_NOT_MATCH)


@dataclass
class Case:
    name: str
    study_uid: str
    files: list[Path]
    how: str  # storescu | dcmsend | raw
    expect: str  # refused | no-context | failed | ignored | done
    reason: str = ""  # regex the instance reason (or comment) must match
    raw: list[tuple[Path, str, str]] = field(default_factory=list)
    statuses: tuple[int, ...] = ()
    got: object = None


def dx(n: int, **kwargs):
    kwargs.setdefault("patient_id", f"HOSTILE-{n}")
    return make_dx(small_chest_pixels(400 + n), **kwargs)


def build_cases(work: Path) -> list[Case]:
    rng = random.Random(3)
    cases: list[Case] = []

    def add(name, ds, expect, reason="", how="storescu"):
        path = write(ds, work / f"{name}.dcm")
        cases.append(Case(name, ds.StudyInstanceUID, [path], how, expect, reason))

    def add_raw(name, study_uid, sop_class, sop_uid, syntax, body, expect, reason="", statuses=()):
        path = write_raw(work / f"{name}.dcm", sop_class, sop_uid, syntax, body)
        cases.append(Case(name, study_uid, [path], "raw", expect, reason, raw=[(path, sop_class, syntax)], statuses=statuses))

    # Truncated files: in the pixel data the header still parses, so the
    # instance is stored and fails decoding; in the header it is refused.
    ds = dx(1)
    body = dataset_bytes(ds)
    add_raw("truncated-pixels", ds.StudyInstanceUID, DX, ds.SOPInstanceUID, ExplicitVRLittleEndian,
            body[: len(body) * 3 // 5], "failed", r"pixel data|decod|frame")
    ds = dx(2)
    body = dataset_bytes(ds)
    add_raw("truncated-header", ds.StudyInstanceUID, DX, ds.SOPInstanceUID, ExplicitVRLittleEndian,
            body[:301], "refused", statuses=UNUSABLE)
    # Not DICOM at all after a valid file meta; and an empty dataset.
    add_raw("random-bytes", generate_uid(), DX, generate_uid(), ExplicitVRLittleEndian,
            rng.randbytes(8192), "refused", statuses=UNUSABLE)
    add_raw("empty-dataset", generate_uid(), DX, generate_uid(), ExplicitVRLittleEndian,
            b"", "refused", statuses=UNUSABLE)
    add_raw("png-bytes", generate_uid(), DX, generate_uid(), ExplicitVRLittleEndian,
            Path(__file__).with_name("data").joinpath("nih_00000001_000.png").read_bytes()[:20000],
            "refused", statuses=UNUSABLE)
    # The dataset names another instance than the request does.
    ds = dx(3)
    add_raw("uid-mismatch", ds.StudyInstanceUID, DX, generate_uid(), ExplicitVRLittleEndian,
            dataset_bytes(ds), "refused", statuses=(DOES_NOT_MATCH,))

    ds = dx(4)
    del ds.PixelData
    add("missing-pixel-data", ds, "failed", r"no Pixel Data")

    ds = dx(5)
    ds.Rows = ds.Columns = 60000
    ds.PixelData = b"\x00" * 512
    add("60000x60000", ds, "failed", r"60000x60000 .* exceeds the limit")

    for bits in (12, 7):
        ds = dx(6 + bits)
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, min(bits, 12), min(bits, 12) - 1
        ds.PixelData = ds.PixelData[: len(ds.PixelData) * 3 // 4]  # as if 12 bits were packed
        add(f"bits-allocated-{bits}", ds, "failed", rf"unsupported bit depth: BitsAllocated={bits}")

    # A syntax we have no decoder for is not offered: refused at negotiation.
    ds = dx(20)
    add_raw("jpeg-xl", ds.StudyInstanceUID, DX, ds.SOPInstanceUID, JPEG_XL, dataset_bytes(ds), "no-context")
    # An offered syntax whose pixel data is not actually in it.
    ds = dx(21)
    add_raw("j2k-declared-raw-pixels", ds.StudyInstanceUID, DX, ds.SOPInstanceUID, JPEG2000Lossless,
            dataset_bytes(ds), "failed", r"JPEG 2000")

    # Colour "chest X-rays".
    for name, sop_class, modality in (("rgb-dx", DX, "DX"), ("rgb-sc", SC, "OT")):
        ds = dx(30 if sop_class == DX else 31, sop_class_uid=sop_class, modality=modality)
        grey = small_chest_pixels(30)
        rgb = np.stack([grey, np.roll(grey, 9, axis=1), 255 - grey], axis=-1)
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
        for keyword in ("WindowCenter", "WindowWidth", "PresentationLUTShape"):
            if keyword in ds:
                delattr(ds, keyword)
        ds.PixelData = rgb.astype(np.uint8).tobytes()
        add(name, ds, "failed", r"not a greyscale radiograph: PhotometricInterpretation=RGB, SamplesPerPixel=3")

    # SOP classes: a private one is not negotiated; a known non-chest one is stored and ignored.
    ds = dx(40)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = PRIVATE_CLASS
    add_raw("private-sop-class", ds.StudyInstanceUID, PRIVATE_CLASS, ds.SOPInstanceUID, ExplicitVRLittleEndian,
            dataset_bytes(ds), "no-context")
    ds = dx(41, sop_class_uid=CT, modality="CT")
    add("ct-image", ds, "ignored", r"not a chest radiograph")

    # Odd patient names are data, not errors: these studies are scored.
    ds = dx(50)
    ds.PatientName = "Ctl\x01\x07^Na\x1bme\x7f"
    add("name-control-chars", ds, "done")
    ds = dx(51)
    ds.PatientName = "Smith\U0001F600^Jöhn=スミス^ジョン"
    add("name-emoji-utf8", ds, "done")
    ds = dx(52)
    del ds.SpecificCharacterSet  # default repertoire, yet Latin-1 bytes
    ds["PatientName"] = DataElement(0x00100010, "PN", b"M\xfcller^J\xf6rg")
    add("name-latin1-no-charset", ds, "done")
    return cases


def control_sender(port: int, work: Path, stop: threading.Event, sent: list, statuses: list) -> None:
    """Another modality storing good images on its own association all along."""
    from pynetdicom import AE

    from dicom_scp.sockets import LOW_LATENCY_HANDLER

    ae = AE(ae_title="CONTROL")
    ae.add_requested_context(DX, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", port, ae_title="CARINA", evt_handlers=[LOW_LATENCY_HANDLER])
    assert assoc.is_established
    try:
        n = 0
        while not stop.is_set() or n < 3:
            ds = make_dx(small_chest_pixels(500 + n), patient_id=f"CONTROL-{n}")
            rsp = assoc.send_c_store(ds)
            statuses.append(int(rsp.Status) if rsp and "Status" in rsp else "no-response")
            sent.append(ds.StudyInstanceUID)
            n += 1
            stop.wait(0.7)
    finally:
        if assoc.is_established:
            assoc.release()


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    work = tmp_path_factory.mktemp("hostile")
    carina = CarinaNode(work / "carina", stable_seconds=1.0)
    carina.create_token()
    carina.start()
    try:
        yield carina, work
    finally:
        carina.stop()
        for path in work.rglob("*.dcm"):  # the stored 1 GB copy is real disk; the source is sparse
            if path.stat().st_size > 2**28:
                path.unlink()


def settled(node: CarinaNode, study_uid: str, calling_ae: str | None = None):
    view = study_state(node, study_uid, calling_ae)
    return view if view and view["state"] in ("done", "ignored", "failed") else None


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about every mangled value
def test_hostile_inputs_get_a_status_or_a_recorded_reason_and_harm_nothing(node):
    carina, work = node
    # Accepted before the barrage; must survive it.
    before = dx(90)
    assert store_responses(storescu(carina.dicom_port, write(before, work / "before.dcm"))) == ["Success"]

    cases = build_cases(work)
    stop, control_sent, control_statuses = threading.Event(), [], []
    control = threading.Thread(target=control_sender, args=(carina.dicom_port, work, stop, control_sent, control_statuses))
    control.start()
    try:
        for case in cases:
            if case.how == "raw":
                (case.got,) = send_raw(carina.dicom_port, case.raw)
                case.got = "Success" if case.got == 0 else case.got
            else:
                send = storescu if case.how == "storescu" else dcmsend
                proc = send(carina.dicom_port, *case.files, calling_ae="HOSTILE")
                responses = store_responses(proc)
                case.got = responses[0] if responses else (proc.stdout + proc.stderr)[-400:]
            assert carina.proc.poll() is None, f"the node died on {case.name}"
    finally:
        stop.set()
        control.join(60)

    assert echoscu(carina.dicom_port), "no C-ECHO after the hostile inputs"
    assert control_statuses and all(st == 0 for st in control_statuses), control_statuses

    stored = [c for c in cases if c.expect in ("failed", "ignored", "done")]
    for case in stored:
        assert case.got == "Success", f"{case.name}: expected the SCP to store it, got {case.got!r}"
    wait_until(lambda: all(settled(carina, c.study_uid, "HOSTILE") for c in stored), 120, interval=0.5,
               what="every stored hostile case settled")
    outcomes = {}
    for case in cases:
        if case.expect == "refused":
            assert case.got in case.statuses, f"{case.name}: expected one of {[hex(s) for s in case.statuses]}, got {case.got!r}"
            assert study_state(carina, case.study_uid, "HOSTILE") is None, f"{case.name}: refused yet recorded"
            outcomes[case.name] = f"0x{case.got:04X}"
        elif case.expect == "no-context":
            assert case.got == "no-context", f"{case.name}: expected a negotiation refusal, got {case.got!r}"
            outcomes[case.name] = "not negotiated"
        else:
            view = settled(carina, case.study_uid, "HOSTILE")
            (instance,) = view["instances"]
            if case.expect == "done":
                assert view["state"] == "done" and instance["state"] == "scored", (case.name, view["state"], view["reason"], instance)
                assert len(view["outputs"]) >= 2
            else:
                assert instance["state"] == case.expect, (case.name, instance)
                assert instance["reason"] and re.search(case.reason, instance["reason"]), (case.name, instance["reason"])
                assert view["state"] in ("failed", "ignored") and view["reason"], (case.name, view)
            outcomes[case.name] = f"{instance['state']}: {(instance['reason'] or '')[:90]}"

    # Nothing accepted was lost: the study from before and every control study is scored.
    for uid, ae in [(before.StudyInstanceUID, "MODALITY")] + [(u, "CONTROL") for u in control_sent]:
        view = wait_until(lambda: settled(carina, uid, ae), 120, interval=0.5, what=f"study {uid} settled")
        assert view["state"] == "done", (uid, view["state"], view["reason"])
    assert carina.proc.poll() is None and echoscu(carina.dicom_port)
    for name, outcome in outcomes.items():
        print(f"  {name:28s} {outcome}")


def test_one_gigabyte_instance_is_stored_streamed_then_failed_for_its_size(node):
    carina, work = node
    huge = write_huge_dx(work / "huge.dcm", 23172, 23172, patient_id="HOSTILE-1GB")
    size = huge.stat().st_size
    assert size > 2**30
    pid = carina.proc.pid
    baseline = process_memory_kb(pid)["VmRSS"]
    peak, stop = [baseline], threading.Event()

    def watch():
        while not stop.is_set():
            peak[0] = max(peak[0], process_memory_kb(pid)["VmRSS"])
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    started = time.monotonic()
    try:
        proc = dcmsend(carina.dicom_port, huge, calling_ae="BIGMOD")
    finally:
        stop.set()
        watcher.join()
    seconds = time.monotonic() - started
    assert "with status SUCCESS  : 1" in proc.stdout + proc.stderr, proc.stdout[-1500:] + proc.stderr[-1500:]
    grown_mb = (peak[0] - baseline) / 1024
    # Streamed to disk, never held in memory: the node grows by a few MB, not by 1 GB.
    assert grown_mb < 100, f"RSS grew by {grown_mb:.0f} MB while receiving a {size / 2**20:.0f} MB instance"

    import pydicom

    study_uid = pydicom.dcmread(huge, stop_before_pixels=True).StudyInstanceUID
    view = wait_until(lambda: settled(carina, study_uid, "BIGMOD"), 120, interval=0.5, what="1 GB study settled")
    (instance,) = view["instances"]
    assert instance["state"] == "failed" and "exceeds the limit" in instance["reason"], instance
    assert view["state"] == "failed"
    assert echoscu(carina.dicom_port) and carina.proc.poll() is None
    print(f"1 GB instance: {size / 2**20:.0f} MiB sent in {seconds:.1f} s, node RSS {baseline / 1024:.0f} MB -> "
          f"peak {peak[0] / 1024:.0f} MB (+{grown_mb:.1f} MB), outcome: {instance['reason']}")


# --- over-long values against the database columns, on SQLite and PostgreSQL -------


def test_overlong_uids_and_ids_never_become_out_of_resources(any_db, tmp_path):
    """UI is at most 64 characters and the database keys on it. PostgreSQL
    enforces column lengths (SQLite does not), so an over-long key would fail
    the commit, answer 0xA700, and make the sender retry forever: refuse it as
    a bad dataset instead; over-long informational values are truncated."""
    from dicom_scp.scp import StorageSCP
    from node.receiver import Receiver
    from peers import free_port, loopback_policy

    scp = StorageSCP(ae_title="CARINA", host="127.0.0.1", port=free_port(),
                     accept=Receiver(any_db, tmp_path / "instances"), peers=loopback_policy("MODALITY", "PROBE"))
    scp.start()
    try:
        long_uid = "1.2.826.0.1.3680043.10.1249." + "1234567890" * 5  # 78 characters
        bad_study = dx(60, study_uid=long_uid)
        odd = dx(61, accession="A" * 40, patient_id="P" * 100)
        odd.SeriesInstanceUID = long_uid
        answers = {}
        for name, ds in (("study", bad_study), ("series", odd)):
            proc = storescu(scp.port, write(ds, tmp_path / f"{name}.dcm"))
            answers[name] = store_responses(proc)
        assert answers["study"] and answers["study"][0] == "Error: CannotUnderstand", answers
        assert answers["series"] == ["Success"], answers
        from sqlalchemy import select

        from node.db import Instance, Study

        with any_db.session() as s:
            (instance,) = s.scalars(select(Instance)).all()
            (study,) = s.scalars(select(Study)).all()
            assert instance.sop_instance_uid == odd.SOPInstanceUID and len(instance.series_uid) == 64
            assert study.patient_id == "P" * 64 and study.accession_number == "A" * 16
        assert echoscu(scp.port)
    finally:
        scp.stop()
