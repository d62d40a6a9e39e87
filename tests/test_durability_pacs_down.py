"""Issue 3 acceptance, PACS-down test: store-and-forward.

Orthanc is stopped while studies are pushed and processed. Carina keeps
accepting and scoring; each delivery waits and retries with backoff, and the
backlog is visible in /api/v1/jobs and in each study's deliveries. When
Orthanc comes back on the same ports and storage, every delivery completes and
every output is in the PACS exactly once.
"""
from __future__ import annotations

import time

import pytest
from dicom_factory import make_dx, small_chest_pixels, write
from peers import (
    carina_outputs_in_orthanc,
    expected_outputs,
    node_with_pacs,
    storescu,
    study_state,
    wait_until,
)

# On SQLite and on PostgreSQL (tests/conftest.py both_backends).
pytestmark = pytest.mark.usefixtures("both_backends")

STUDIES = 4


@pytest.fixture
def rig(tmp_path):
    # Fast backoff, and enough attempts that a minute's outage cannot dead-letter.
    pipeline = {"backoff_base_seconds": 0.5, "backoff_max_seconds": 2, "max_attempts": 200}
    with node_with_pacs(tmp_path, stable_seconds=1.0, extra={"pipeline": pipeline}) as (node, pacs):
        yield node, pacs, tmp_path


def test_outputs_wait_for_a_down_pacs_and_arrive_once_when_it_returns(rig):
    node, pacs, work = rig
    pacs.stop()  # the PACS goes down before anything is sent

    studies = []
    for n in range(STUDIES):
        ds = make_dx(small_chest_pixels(100 + n), patient_id=f"DOWN-{n}", accession=f"DN{n:04d}")
        proc = storescu(node.dicom_port, write(ds, work / f"s{n}.dcm"))
        assert proc.returncode == 0, proc.stdout + proc.stderr  # receiving does not depend on the PACS
        studies.append(ds.StudyInstanceUID)

    def backlog_visible():
        views = [study_state(node, uid) for uid in studies]
        if not all(v and v["state"] == "done" for v in views):
            return False  # scored and encoded while the PACS is down
        deliveries = [d for v in views for d in v["deliveries"]]
        return len(deliveries) == STUDIES and all(
            d["state"] in ("pending", "running") and d["attempts"] >= 2 and d["last_error"] for d in deliveries
        ) and views

    views = wait_until(backlog_visible, 120, interval=0.3, what="every delivery retried at least twice")
    for view in views:
        (delivery,) = view["deliveries"]
        assert "pacs" in delivery["last_error"], delivery
        assert delivery["study_version"] == 1
    pending = node.api("/api/v1/jobs?state=pending&stage=deliver")
    assert pending["counts"].get("pending", 0) >= 1
    assert all(j["stage"] == "deliver" and j["attempts"] >= 1 and j["last_error"] for j in pending["jobs"]), pending
    assert node.api("/api/v1/jobs?state=dead")["jobs"] == []

    # Outage over: same ports, same storage.
    pacs.start()
    outage_end = time.monotonic()
    wait_until(
        lambda: all(d["state"] == "done" for uid in studies for d in study_state(node, uid)["deliveries"]),
        60, interval=0.3, what="every delivery done after the PACS returned",
    )
    drained = time.monotonic() - outage_end
    for uid in studies:
        view = study_state(node, uid)
        assert carina_outputs_in_orthanc(pacs, uid) == expected_outputs(view), uid
        (delivery,) = view["deliveries"]
        assert delivery["state"] == "done" and delivery["last_error"] is None
    counts = node.api("/api/v1/jobs?limit=1")["counts"]
    assert not counts.get("pending") and not counts.get("running") and not counts.get("dead"), counts
    print(f"pacs down: {STUDIES} studies, max attempts {max(d['attempts'] for v in views for d in v['deliveries'])} "
          f"during the outage, backlog drained {drained:.1f} s after Orthanc returned")
