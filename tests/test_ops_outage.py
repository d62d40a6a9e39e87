"""Issue 11 acceptance: PACS outages measured in hours, time-scaled.

Time scale 1/720: one hour of the real world is 5 s here. The delivery
policy is the default one scaled the same way (first retry 30 s -> 42 ms,
cap 15 min -> 1.25 s, give up after 72 h -> 360 s).

1. The PACS (Orthanc "pacs") is down for a 2-hour outage (10 s) while studies
   arrive: every delivery waits and retries, none is dead-lettered, and all
   arrive, each object once, when it is back.
2. A second destination (Orthanc "archive", its own horizon: 2 h -> 10 s) is
   down past its horizon: its deliveries are dead-lettered, /readyz says
   "degraded", `carina_dead_letter_jobs` counts them, the admin API lists
   them; after it returns, `carina jobs retry --all --destination archive`
   delivers them, and the node is ready again.
"""
from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from collections import Counter

from dicom_factory import make_dx, small_chest_pixels, write
from peers import CarinaNode, Orthanc, carina_db_rows, http_json, storescu, study_state, wait_until

SCALE = 1 / 720  # seconds here per second of the real world
HOUR = 3600 * SCALE
OUTAGE = 2 * HOUR
ARCHIVE_HORIZON = 2 * HOUR


def scaled_policy(give_up_hours: float) -> dict:
    return {"base_seconds": 30 * SCALE, "max_seconds": 900 * SCALE, "give_up_after_seconds": give_up_hours * HOUR}


def readyz(node: CarinaNode) -> tuple[int, dict]:
    try:
        return 200, http_json(f"{node.url}/readyz")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def metric(node: CarinaNode, name: str, **labels) -> float:
    text = urllib.request.urlopen(f"{node.url}/metrics", timeout=10).read().decode()
    total = 0.0
    for line in text.splitlines():
        m = re.match(r"^(\w+)(?:\{(.*)\})? (\S+)$", line)
        if not m or m.group(1) != name:
            continue
        have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(m.group(3))
    return total


def push(node: CarinaNode, work, first: int, count: int) -> list[str]:
    uids = []
    for n in range(first, first + count):
        ds = make_dx(small_chest_pixels(500 + n), patient_id=f"OUT-{n}", accession=f"OU{n:04d}")
        assert storescu(node.dicom_port, write(ds, work / f"s{n}.dcm")).returncode == 0
        uids.append(str(ds.StudyInstanceUID))
    return uids


def deliveries(node: CarinaNode, uids: list[str], destination: str) -> list[dict]:
    out = []
    for uid in uids:
        view = study_state(node, uid) or {"deliveries": []}
        out += [d for d in view["deliveries"] if d["destination"] == destination]
    return out


def test_two_hour_outage_then_past_the_horizon(tmp_path):
    pacs = Orthanc(tmp_path / "pacs", ae_title="PACS").start()
    archive = Orthanc(tmp_path / "archive", ae_title="ARCHIVE").start()
    node = CarinaNode(tmp_path / "carina", stable_seconds=0.5, destinations=[
        {"name": "pacs", "type": "dicom", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.dicom_port},
        {"name": "archive", "type": "dicom", "ae_title": "ARCHIVE", "host": "127.0.0.1", "port": archive.dicom_port,
         "retry": scaled_policy(give_up_hours=ARCHIVE_HORIZON / HOUR)},
    ], extra={"delivery": scaled_policy(give_up_hours=72), "health": {"dead_letter_max_age_seconds": 0}})
    try:
        node.create_token()
        admin = node.carina("token", "create", "--name", "admin", "--role", "admin").stdout.strip().splitlines()[-1]
        node.start()

        # 1. A 2-hour PACS outage (10 s) while six studies arrive.
        pacs.stop()
        first = push(node, tmp_path, 0, 6)

        def outage_lasted():
            rows = carina_db_rows(node, "SELECT retry_since, state FROM jobs WHERE stage = 'deliver' "
                                        "AND destination = 'pacs'")
            return (len(rows) == 6 and all(state == "pending" and since is not None for since, state in rows)
                    and time.time() - max(since for since, _ in rows) >= OUTAGE)  # the last to start failing too

        wait_until(outage_lasted, 120, interval=0.2, what="every PACS delivery failing for the whole outage")
        during = deliveries(node, first, "pacs")
        attempts = [d["attempts"] for d in during]
        assert all(d["state"] in ("pending", "running") for d in during), during
        assert min(attempts) >= 3  # retried through the outage, never dead
        assert all(d["state"] == "done" for d in deliveries(node, first, "archive"))  # the other destination unaffected
        pacs.start()
        back = time.monotonic()
        wait_until(lambda: all(d["state"] == "done" for d in deliveries(node, first, "pacs")), 60, interval=0.2,
                   what="every PACS delivery done after the outage")
        drained = time.monotonic() - back
        assert carina_db_rows(node, "SELECT count(*) FROM jobs WHERE state = 'dead'") == [(0,)]
        received = Counter(r["sop"] for r in pacs.receptions())
        expected = {o["sop_instance_uid"] for uid in first for o in study_state(node, uid)["outputs"]}
        assert set(received) == expected and set(received.values()) == {1}, "each object delivered once"
        assert readyz(node)[0] == 200

        # 2. The archive is down past its horizon.
        archive.stop()
        second = push(node, tmp_path, 6, 3)
        wait_until(lambda: len(deliveries(node, second, "archive")) == 3
                   and all(d["state"] == "dead" for d in deliveries(node, second, "archive"))
                   and carina_db_rows(node, "SELECT COUNT(*) FROM jobs WHERE destination = 'archive' AND state = 'dead'")[0][0] == 6,
                   120, interval=0.3, what="the archive deliveries (the report's and the SCs') dead-lettered past the horizon")
        assert all(d["state"] == "done" for d in deliveries(node, second, "pacs"))
        code, body = readyz(node)
        assert (code, body["status"], body["checks"]["dead_letters"]) == (503, "degraded", False), body
        # Each study's two deliveries to the archive (the report's objects, the SCs) are dead.
        assert body["dead_letters"]["by_destination"] == {"archive": 6}
        for stage in ("deliver", "deliver-sc"):
            assert metric(node, "carina_dead_letter_jobs", destination="archive", stage=stage) == 3
            assert metric(node, "carina_deliveries_total", destination="archive", stage=stage, outcome="dead") == 3
        listed = http_json(f"{node.url}/api/v1/admin/dead-letters", token=admin)["dead_letters"]
        assert sorted(d["study_instance_uid"] for d in listed) == sorted(second * 2)
        assert all(d["destination"] == "archive" and "archive" in d["last_error"] for d in listed)

        archive.start()
        out = node.carina("jobs", "retry", "--all", "--destination", "archive").stdout
        assert "re-queued 6 dead-letter job(s)" in out, out
        wait_until(lambda: all(d["state"] == "done" for d in deliveries(node, second, "archive")), 60,
                   interval=0.3, what="the re-queued archive deliveries done")
        assert metric(node, "carina_dead_letter_jobs", destination="archive") == 0
        wait_until(lambda: readyz(node)[0] == 200, 10, what="/readyz ready again")
        stored = {o["sop_instance_uid"] for uid in second for o in study_state(node, uid)["outputs"]}
        assert stored <= {r["sop"] for r in archive.receptions()}
        print(f"outage: 6 studies through a {OUTAGE:.0f} s (2 h scaled) PACS outage with {min(attempts)}-"
              f"{max(attempts)} attempts each, none dead, drained {drained:.1f} s after it returned; "
              f"3 studies' archive deliveries (6 jobs) dead after the {ARCHIVE_HORIZON:.0f} s horizon, delivered after retry --all")
    finally:
        node.stop()
        pacs.stop()
        archive.stop()
