"""Issue 11 acceptance: graceful shutdown of a real `carina serve`.

SIGTERM lands in the middle of a 50-instance push (one association, a
modality's pace) while the pipeline is scoring the first studies:

- the node stops listening at once, lets the open association go on for
  `shutdown.grace_seconds`, then aborts it; running stages finish or have
  their leases released; the process exits 0 within the grace period;
- every instance the sender saw acknowledged is stored (with the bytes sent);
- no job is left `running` (a released job is pending, runnable now), so on
  restart nothing waits for the 600 s lease, and every acknowledged study is
  scored.

Then a second signal during a drain exits at once (128+SIGTERM), and what was
acknowledged is still there.
"""
from __future__ import annotations

import hashlib
import signal
import time
import urllib.error

from dicom_factory import make_dx, small_chest_pixels, write
from ops_peers import PacedSender
from peers import CarinaNode, accepts_connections, carina_db_rows, http_json, study_state, wait_until

INSTANCES = 50
GRACE = 6.0
LEASE = 600.0  # a job left holding its lease would wait ten minutes: the test's deadlines are far shorter


def readyz(node: CarinaNode) -> tuple[int, dict]:
    try:
        return 200, http_json(f"{node.url}/readyz")
    except urllib.error.HTTPError as exc:
        import json

        return exc.code, json.loads(exc.read() or b"{}")


def test_sigterm_mid_push_loses_nothing_acknowledged_and_leaves_no_lease(tmp_path):
    files, studies = [], []
    for n in range(INSTANCES):
        ds = make_dx(small_chest_pixels(300 + n), patient_id=f"SIG-{n:03d}", accession=f"SG{n:04d}")
        files.append(write(ds, tmp_path / f"i{n:02d}.dcm"))
        studies.append(str(ds.StudyInstanceUID))
    node = CarinaNode(tmp_path / "carina", stable_seconds=0.3, extra={
        "shutdown": {"grace_seconds": GRACE},
        "pipeline": {"lease_seconds": LEASE, "workers": 2},
    })
    node.create_token()
    node.start()
    # 50 instances at 0.25 s: the push would need ~12 s, twice the grace period.
    sender = PacedSender(node.dicom_port, files, pause=0.25)
    sender.start()
    sender.wait_acked(12, 60)
    # Mid-push, and mid-pipeline: wait until a stage is running in the node.
    wait_until(lambda: carina_db_rows(node, "SELECT count(*) FROM jobs WHERE state = 'running'")[0][0] > 0,
               60, interval=0.02, what="a pipeline stage running")
    acked_before = sender.outcomes.count("acked")
    signalled = time.monotonic()
    node.proc.send_signal(signal.SIGTERM)

    # Listening stops at once; HTTP answers "draining" meanwhile.
    wait_until(lambda: not accepts_connections(node.dicom_port), 5, interval=0.05, what="the SCP to stop listening")
    code, body = readyz(node)
    assert node.proc.poll() is not None or (code, body["status"]) == (503, "draining"), body
    # Exits 0 within the grace period (plus the time to stop HTTP).
    assert node.proc.wait(GRACE + 5) == 0
    took = time.monotonic() - signalled
    sender.join(30)
    assert sender.error is None, sender.error
    acked = sender.acked
    log = node.log_text()
    assert "graceful shutdown" in log and "drained in" in log, log[-2000:]

    # The association went on during the grace period, then was aborted.
    assert len(acked) > acked_before, (len(acked), acked_before)
    assert len(acked) < INSTANCES and sender.aborted, (len(acked), sender.outcomes[-3:])
    # Nothing acknowledged is lost: each is stored with the bytes sent.
    stored = dict(carina_db_rows(node, "SELECT sop_instance_uid, path FROM instances"))
    from pydicom import dcmread

    for path in acked:
        sop = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        assert sop in stored, f"acknowledged {sop} not stored"
        sent = dcmread(path)
        kept = dcmread(stored[sop])
        assert hashlib.sha256(kept.PixelData).digest() == hashlib.sha256(sent.PixelData).digest()
    # No job was left holding a lease.
    states = dict(carina_db_rows(node, "SELECT state, count(*) FROM jobs GROUP BY state"))
    assert "running" not in states, states
    released = "released at shutdown" in log

    # Restart: every acknowledged study is scored, long before a 600 s lease could expire.
    restarted = time.monotonic()
    node.start()
    acked_studies = [studies[files.index(p)] for p in acked]
    wait_until(lambda: all((study_state(node, uid) or {}).get("state") == "done" for uid in acked_studies),
               180, interval=0.5, what="every acknowledged study scored after the restart")
    caught_up = time.monotonic() - restarted
    print(f"sigterm: {len(acked)}/{INSTANCES} acknowledged ({acked_before} before the signal), exit 0 after "
          f"{took:.1f} s (grace {GRACE:.0f} s), job released at shutdown: {released}, all acknowledged studies "
          f"scored {caught_up:.1f} s after the restart (lease {LEASE:.0f} s)")

    # A second signal during a drain exits at once, safely: an instance
    # acknowledged just before is there after the restart, and scored.
    unsent = [f for f in files if f not in acked]
    hold = PacedSender(node.dicom_port, unsent[:2], pause=60)  # acknowledged one, then keeps the association open
    hold.start()
    hold.wait_acked(1, 30)
    node.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: not accepts_connections(node.dicom_port), 5, interval=0.05, what="draining")
    assert node.proc.poll() is None  # still draining: the association may take up to the grace period
    node.proc.send_signal(signal.SIGTERM)
    assert node.proc.wait(10) == 128 + signal.SIGTERM
    hold.join(30)
    node.start()
    late = studies[files.index(unsent[0])]
    wait_until(lambda: (study_state(node, late) or {}).get("state") == "done", 120, interval=0.5,
               what="the instance acknowledged before the second signal, scored after the restart")
    node.stop()
