"""Issue 11: time on the database server's clock, the lease heartbeat and the
delivery give-up window, on the real job queue (SQLite and PostgreSQL).

Skew: each "host" is this process with `node.db.now` (the local clock every
scheduling time falls back to) moved by an hour. On PostgreSQL the queue must
not care, because leases, retries and study completion read the server's
clock; on SQLite (one host) the local clock is the only clock.
"""
from __future__ import annotations

import time
from pathlib import Path

import pytest
from sqlalchemy import select, update

import node.db
from peers import wait_until
from dicom_scp.scp import ReceivedInstance
from node.completion import complete_quiet_studies
from node.db import Job, Study
from node.jobs import Backoff, LeaseLost, claim, enqueue, fail, release, requeue_dead, settle_in
from node.lease import Heartbeat, check_lease
from node.receiver import record_instance
from node.states import Stage

HOUR = 3600.0


def received(sop: str, study: str = "9.9.9") -> ReceivedInstance:
    return ReceivedInstance(
        calling_ae="MOD", peer_address="127.0.0.1", sop_class_uid="1.2.840.10008.5.1.4.1.1.1", sop_instance_uid=sop,
        study_uid=study, series_uid="9.9.9.1", transfer_syntax_uid="1.2.840.10008.1.2.1", patient_id="P",
        accession_number="A", modality="CR", temp_path=Path("/nonexistent"), size_bytes=1,
    )


class Skew:
    """Move the local clock of this 'host' by `offset` seconds while inside."""

    def __init__(self, monkeypatch, offset: float):
        self.monkeypatch, self.offset = monkeypatch, offset

    def __enter__(self):
        real = time.time
        self.monkeypatch.setattr(node.db, "now", lambda: real() + self.offset)

    def __exit__(self, *exc):
        self.monkeypatch.setattr(node.db, "now", time.time)


def one_job(db, stage="deliver", destination="pacs") -> int:
    record_instance(db, received("9.9.9.1"), Path("/nonexistent"))
    with db.session() as s:
        study_id = s.scalar(select(Study.id))
        enqueue(s, study_id, stage, 1, destination=destination)
        return s.scalar(select(Job.id))


def test_skewed_hosts_agree_on_leases_retries_and_completion_on_postgresql(postgres_url, monkeypatch, request):
    from conftest import _postgres_database

    db, drop = _postgres_database(postgres_url)
    request.addfinalizer(drop)
    # Host A runs an hour slow: an instance it records must still complete on
    # time for host B, and a job it enqueues must be runnable for B at once.
    with Skew(monkeypatch, -HOUR):
        job_id = one_job(db)
    assert complete_quiet_studies(db, stable_seconds=0.5, at=None) == []  # just received, by the server's clock
    with db.session() as s:
        assert s.scalar(select(Study.state)) == "received"
    wait_until(lambda: complete_quiet_studies(db, stable_seconds=0.5), 10, interval=0.05, what="the study quiet for 0.5 s")

    # Host A (an hour slow) claims with a 30 s lease: host B must not see it as expired.
    deliver = (Stage.DELIVER,)  # completion also queued an infer job; this test follows the delivery
    with Skew(monkeypatch, -HOUR):
        held = claim(db, "host-a", lease_seconds=30, stages=deliver)
    assert held is not None and held.id == job_id
    assert claim(db, "host-b", lease_seconds=30, stages=deliver) is None

    # Host A, now an hour fast, fails it: the retry is due in ~1 s of server time, not in an hour.
    with Skew(monkeypatch, +HOUR):
        assert fail(db, held, "PACS down", retryable=True, max_attempts=5, backoff=Backoff(0.5, 1.0)) == "pending"
    with db.session() as s:
        run_after, server = s.scalar(select(Job.run_after)), node.db.server_now(s)
    assert run_after - server <= 1.0
    again = None
    deadline = time.monotonic() + 10
    while again is None and time.monotonic() < deadline:
        again = claim(db, "host-b", lease_seconds=30, stages=deliver)
        time.sleep(0.1)
    assert again is not None and again.id == job_id


def test_sqlite_uses_the_local_clock(sqlite_db, monkeypatch):
    # The contrast that shows the PostgreSQL test can fail: with one host's
    # clock an hour slow on SQLite, its lease looks expired to everyone else.
    with Skew(monkeypatch, -HOUR):
        job_id = one_job(sqlite_db)
        assert claim(sqlite_db, "host-a", lease_seconds=30).id == job_id
    assert claim(sqlite_db, "host-b", lease_seconds=30).id == job_id


@pytest.fixture
def db(any_db):
    return any_db


def test_heartbeat_keeps_a_long_stage_leased_and_stops_it_when_lost(db):
    job_id = one_job(db)
    job = claim(db, "worker-a", lease_seconds=0.6)
    with Heartbeat(db, job, 0.6) as beat:
        # Three leases long, the job stays ours: nobody else can claim it.
        deadline = time.monotonic() + 1.8
        while time.monotonic() < deadline:
            assert claim(db, "worker-b", lease_seconds=0.6) is None
            time.sleep(0.05)
        check_lease()  # still ours: no exception
        assert not beat.lost
        # Another worker takes the job over (as after a lease expiry elsewhere).
        with db.session() as s:
            s.execute(update(Job).where(Job.id == job_id).values(lease_owner="worker-b"))
        deadline = time.monotonic() + 5
        while not beat.lost and time.monotonic() < deadline:
            time.sleep(0.05)
        assert beat.lost
        with pytest.raises(LeaseLost):
            check_lease()
    with pytest.raises(LeaseLost):  # and it cannot settle
        with db.session() as s:
            settle_in(s, job)


def test_release_hands_a_running_job_back_at_once_without_charging_an_attempt(db):
    one_job(db)
    job = claim(db, "worker-a", lease_seconds=600)
    assert job.attempts == 1
    assert release(db, job)
    again = claim(db, "worker-b", lease_seconds=600)  # no waiting for the 600 s lease
    assert again is not None and again.id == job.id and again.attempts == 1
    assert not release(db, job)  # the old holder cannot release the new holder's lease


def test_deliveries_give_up_by_time_not_attempts_and_requeue_by_destination(db):
    one_job(db)
    with db.session() as s:
        study_id = s.scalar(select(Study.id))
        enqueue(s, study_id, "deliver", 1, destination="ehr")
    window = Backoff(0.01, 0.02, give_up_after=1.0)
    attempts = 0
    while True:  # far more attempts than max_attempts; only the time window ends it
        job = claim(db, "w", 30)
        if job is None:
            time.sleep(0.01)
            continue
        attempts += 1
        state = fail(db, job, f"{job.destination} down", retryable=True, max_attempts=2, backoff=window)
        if state == "dead":
            break
    assert attempts > 2
    with db.session() as s:
        dead = s.scalars(select(Job).where(Job.state == "dead")).all()
        assert [j.destination for j in dead] in (["pacs"], ["ehr"])
        first_dead = dead[0].destination
    # Re-queue only the other destination's dead letters: none yet.
    other = "ehr" if first_dead == "pacs" else "pacs"
    assert requeue_dead(db, destination=other) == 0
    assert requeue_dead(db, destination=first_dead) == 1
    with db.session() as s:
        job = s.scalar(select(Job).where(Job.destination == first_dead))
        assert (job.state, job.attempts, job.retry_since) == ("pending", 0, None)
