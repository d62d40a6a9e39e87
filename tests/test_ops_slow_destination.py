"""Issue 11 acceptance: a destination that takes 3x the lease per association.

`carina serve` (lease 1.5 s, two workers) delivers to a PACS that holds every
association for 4.5 s. Without the heartbeat, the second worker would take
each delivery over after 1.5 s and send it again while the first still
sends. Counted at the receiving side: each of a study's two deliveries (the
report's objects, then the SCs: node/pipeline/capture.py) arrives in exactly
one association, complete, each object once.

Then shutdown during such a delivery: it cannot finish within the grace
period, so its lease is released (pending, runnable at once, no attempt
charged) and the restarted node delivers it.
"""
from __future__ import annotations

import signal

from dicom_factory import make_dx, small_chest_pixels, write
from ops_peers import SlowPacs
from peers import CarinaNode, carina_db_rows, storescu, study_state, wait_until

LEASE = 1.5
STUDIES = 4


def test_slow_destination_gets_each_study_once_never_concurrently(tmp_path):
    pacs = SlowPacs(association_seconds=3 * LEASE).start()
    node = CarinaNode(tmp_path / "carina", stable_seconds=0.3, destinations=[
        {"name": "slow", "type": "dicom", "ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.port}],
        extra={"pipeline": {"lease_seconds": LEASE, "workers": 2}, "shutdown": {"grace_seconds": 1}})
    try:
        node.create_token()
        node.start()
        studies = []
        for n in range(STUDIES):
            ds = make_dx(small_chest_pixels(400 + n), patient_id=f"SLOW-{n}", accession=f"SL{n:04d}")
            assert storescu(node.dicom_port, write(ds, tmp_path / f"s{n}.dcm")).returncode == 0
            studies.append(str(ds.StudyInstanceUID))

        def delivered():
            views = [study_state(node, uid) for uid in studies]
            return all(v and v["deliveries"] and v["deliveries"][0]["state"] == "done" for v in views) and views

        views = wait_until(delivered, 300, interval=0.5, what="every study delivered to the slow PACS")
        by_study: dict[str, list] = {uid: [r for r in pacs.receptions if uid in r.studies] for uid in studies}
        for view in views:
            uid = view["study_instance_uid"]
            receptions = by_study[uid]
            report = sorted(o["sop_instance_uid"] for o in view["outputs"] if o["kind"] != "sc")
            captures = sorted(o["sop_instance_uid"] for o in view["outputs"] if o["kind"] == "sc")
            assert captures and report, view["outputs"]
            assert len(receptions) == 2, f"{uid} received in {len(receptions)} associations"
            assert sorted(sorted(r.sops) for r in receptions) == sorted([report, captures]), "each object once, all of them"
            assert all(r.released and r.end - r.start >= 3 * LEASE for r in receptions)
            assert all(job["attempts"] == 1 for job in view["jobs"] if job["stage"] in ("deliver", "deliver-sc"))
        spans = sorted((r.start, r.end) for r in pacs.receptions)
        assert len(spans) == 2 * STUDIES
        assert "lease lost" not in node.log_text()
        print(f"slow destination: {STUDIES} studies, each delivered in one association of "
              f"{min(e - s for s, e in spans):.1f}-{max(e - s for s, e in spans):.1f} s at a {LEASE} s lease")

        # Shutdown while such a delivery runs: released at once, delivered after the restart.
        ds = make_dx(small_chest_pixels(499), patient_id="SLOW-X", accession="SLX")
        assert storescu(node.dicom_port, write(ds, tmp_path / "x.dcm")).returncode == 0
        uid = str(ds.StudyInstanceUID)
        wait_until(lambda: len(pacs.receptions) > 2 * STUDIES, 120, interval=0.05,
                   what="the delivery of the last study under way (its association open)")
        node.proc.send_signal(signal.SIGTERM)
        assert node.proc.wait(15) == 0
        (job,) = carina_db_rows(node, "SELECT state, attempts, lease_owner FROM jobs WHERE stage = 'deliver' "
                                      "AND study_id = (SELECT id FROM studies WHERE study_uid = ?)", (uid,))
        assert job == ("pending", 0, ""), job  # released: runnable at once, the interrupted attempt not charged
        assert "released at shutdown" in node.log_text()
        node.start()
        wait_until(lambda: (study_state(node, uid) or {}).get("deliveries", [{}])[0].get("state") == "done", 120,
                   interval=0.5, what="the released delivery done after the restart")
        complete = [sop for r in pacs.receptions if uid in r.studies and r.released for sop in r.sops]
        outputs = study_state(node, uid)["outputs"]
        assert sorted(complete) == sorted(o["sop_instance_uid"] for o in outputs), "each object once, all of them"
    finally:
        node.stop()
        pacs.stop()
