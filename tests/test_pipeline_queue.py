"""Completion detection and the persisted job queue, on a real SQLite database."""
from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

from dicom_scp.scp import ReceivedInstance
from node.completion import complete_quiet_studies
from node.db import Job, Study, now
from node.jobs import Backoff, claim, enqueue, fail, requeue_dead, succeed
from node.receiver import record_instance

CR = "1.2.840.10008.5.1.4.1.1.1"
CT = "1.2.840.10008.5.1.4.1.1.2"


@pytest.fixture
def db(any_db):
    return any_db


def received(study="1.2.3", sop="1.2.3.1", sop_class=CR, ae="MOD") -> ReceivedInstance:
    return ReceivedInstance(
        calling_ae=ae, peer_address="127.0.0.1", sop_class_uid=sop_class, sop_instance_uid=sop, study_uid=study,
        series_uid="1.2.3.9", transfer_syntax_uid="1.2.840.10008.1.2.1", patient_id="P1", accession_number="A1",
        modality="CR", temp_path=Path("/nonexistent"), size_bytes=1,
    )


def stored(**fields) -> tuple[ReceivedInstance, Path]:
    """A received instance and where the receiver put it (the record never opens the file)."""
    return received(**fields), Path("/nonexistent")


def jobs(db, **where):
    with db.session() as s:
        stmt = select(Job)
        for key, value in where.items():
            stmt = stmt.where(getattr(Job, key) == value)
        return s.scalars(stmt).all()


def study(db, uid="1.2.3"):
    with db.session() as s:
        return s.scalars(select(Study).where(Study.study_uid == uid)).one()


def test_a_new_instance_of_a_known_study_is_written_as_the_orm_path_writes_it(db):
    """node/receiver.py writes a new instance of a study already here as plain
    rows (`_insert_new`); every other case goes through the ORM. The rows must
    be the same: the instance, its first revision, the study touched, and a
    processed study reopened."""
    from node.db import Instance, InstanceRevision

    def rows(sop):
        with db.session() as s:
            instance = s.scalars(select(Instance).where(Instance.sop_instance_uid == sop)).one()
            revision = s.scalars(select(InstanceRevision).where(InstanceRevision.instance_id == instance.id)).one()
            described = {c: getattr(instance, c) for c in Instance.__table__.columns.keys()
                         if c not in ("id", "sop_instance_uid", "received_at")}
            return described, {c: getattr(revision, c) for c in ("revision", "sha256", "path", "size_bytes")}

    assert record_instance(db, *stored(sop="1.1"), sha256="a" * 64) == "new"  # a new study: the ORM path
    first = study(db)
    assert record_instance(db, *stored(sop="1.2"), sha256="a" * 64) == "new"  # a known study: plain rows
    assert rows("1.2") == rows("1.1")
    touched = study(db)
    assert touched.last_received_at >= first.last_received_at and touched.updated_at >= first.updated_at
    assert record_instance(db, *stored(sop="1.3", sop_class=CT), sha256="b" * 64) == "new"
    assert rows("1.3")[0]["state"] == "ignored" and rows("1.3")[0]["reason"]

    with db.session() as s:  # processed: a new instance reopens it, as a late one does through the ORM
        s.scalars(select(Study)).one().state = "done"
    assert record_instance(db, *stored(sop="1.4"), sha256="c" * 64) == "new"
    reopened = study(db)
    assert reopened.state == "received" and reopened.reason == ""


def test_study_completes_only_after_quiet_period(db):
    record_instance(db, *stored(sop="1.1"))
    t = now()
    assert complete_quiet_studies(db, stable_seconds=5, at=t + 1) == []
    record_instance(db, *stored(sop="1.2"))
    assert complete_quiet_studies(db, stable_seconds=5, at=t + 2) == []
    assert len(complete_quiet_studies(db, stable_seconds=5, at=now() + 6)) == 1
    st = study(db)
    assert (st.state, st.version) == ("processing", 1)
    assert [(j.stage, j.study_version) for j in jobs(db)] == [("infer", 1)]
    # Completing again does nothing: the study is no longer receiving.
    assert complete_quiet_studies(db, stable_seconds=5, at=now() + 60) == []


def test_study_without_chest_images_is_ignored_with_reason(db):
    record_instance(db, *stored(sop="9.1", sop_class=CT))
    complete_quiet_studies(db, stable_seconds=0.1, at=now() + 1)
    st = study(db)
    assert st.state == "ignored" and "no chest radiograph" in st.reason
    assert jobs(db) == []


def test_late_arrival_reopens_and_bumps_version(db):
    record_instance(db, *stored(sop="1.1"))
    complete_quiet_studies(db, stable_seconds=0.1, at=now() + 1)
    record_instance(db, *stored(sop="1.1"))  # a re-send of the same instance does not reopen
    assert study(db).state == "processing"
    record_instance(db, *stored(sop="1.2"))  # a new instance does
    assert study(db).state == "received"
    complete_quiet_studies(db, stable_seconds=0.1, at=now() + 1)
    assert study(db).version == 2
    assert sorted(j.study_version for j in jobs(db, stage="infer")) == [1, 2]


def test_enqueue_is_idempotent(db):
    record_instance(db, *stored())
    sid = study(db).id
    with db.session() as s:
        enqueue(s, sid, "deliver", 1, destination="pacs")
        enqueue(s, sid, "deliver", 1, destination="pacs")
    assert len(jobs(db, stage="deliver")) == 1


def test_lease_expiry_lets_another_worker_take_the_job(db):
    record_instance(db, *stored())
    with db.session() as s:
        enqueue(s, study(db).id, "infer", 1)
    first = claim(db, "worker-a", lease_seconds=300)
    assert first is not None and first.attempts == 1
    assert claim(db, "worker-b", lease_seconds=30) is None  # leased
    with db.session() as s:  # worker-a "crashes": its lease runs out
        s.get(Job, first.id).lease_until = now() - 1
    second = claim(db, "worker-c", lease_seconds=30)
    assert second is not None and second.id == first.id and second.attempts >= 2
    # The crashed worker's late success must not overwrite the new owner's job.
    assert succeed(db, first) is False
    assert succeed(db, second) is True
    assert jobs(db)[0].state == "done"


def test_retries_back_off_then_dead_letter_then_requeue(db):
    record_instance(db, *stored())
    with db.session() as s:
        enqueue(s, study(db).id, "deliver", 1, destination="pacs")
    backoff = Backoff(base=10, cap=100)
    job = claim(db, "w", 30)
    assert fail(db, job, "PACS down", retryable=True, max_attempts=2, backoff=backoff) == "pending"
    pending = jobs(db)[0]
    assert pending.run_after >= now() + 4  # at least half of the first 10 s step
    assert claim(db, "w", 30) is None  # not runnable until its backoff elapses
    with db.session() as s:
        s.get(Job, pending.id).run_after = 0
    job = claim(db, "w", 30)
    assert fail(db, job, "PACS still down", retryable=True, max_attempts=2, backoff=backoff) == "dead"
    dead = jobs(db)[0]
    assert dead.state == "dead" and dead.last_error == "PACS still down"
    assert requeue_dead(db) == 1
    assert jobs(db)[0].state == "pending" and jobs(db)[0].attempts == 0


def test_requeueing_a_dead_sc_delivery_brings_back_the_capture_it_waits_for(db):
    """`carina jobs retry --destination pacs` after a capture went dead (and its
    SC delivery with it): both come back, the capture first, or the SC delivery
    would wait for a dead capture for ever."""
    from node.states import Stage

    record_instance(db, *stored())
    study_id = study(db).id
    with db.session() as s:
        enqueue(s, study_id, Stage.CAPTURE, 1)
        enqueue(s, study_id, Stage.DELIVER_SC, 1, destination="pacs")
        for job in s.scalars(select(Job)):
            job.state = "dead"
    assert requeue_dead(db, destination="other") == 0
    assert requeue_dead(db, destination="pacs") == 2
    assert {(j.stage, j.state, j.attempts) for j in jobs(db)} == {("capture", "pending", 0), ("deliver-sc", "pending", 0)}
    order = []
    while (job := claim(db, "w", 30)) is not None:
        order.append(job.stage)
        succeed(db, job)
    assert order == ["capture", "deliver-sc"]


def test_backoff_grows_exponentially_with_a_cap():
    b = Backoff(base=2, cap=60)
    for attempt, step in [(1, 2), (2, 4), (3, 8), (10, 60)]:
        for _ in range(20):
            assert step / 2 <= b.delay(attempt) <= step


def test_concurrent_workers_claim_each_job_exactly_once(db):
    import threading

    record_instance(db, *stored())
    sid = study(db).id
    with db.session() as s:
        for version in range(1, 41):
            enqueue(s, sid, "infer", version)
    claimed: list[int] = []
    lock = threading.Lock()

    def worker(name: str) -> None:
        while (job := claim(db, name, lease_seconds=300)) is not None:
            with lock:
                claimed.append(job.id)
            assert succeed(db, job)

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(claimed) == sorted({j.id for j in jobs(db)}) and len(claimed) == 40
    assert {j.state for j in jobs(db)} == {"done"}


def test_concurrent_first_instances_create_one_study(db):
    import threading

    errors: list[BaseException] = []

    def send(n: int) -> None:
        try:
            record_instance(db, *stored(study="7.7.7", sop=f"7.7.7.{n}"))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    with db.session() as s:
        assert len(s.scalars(select(Study).where(Study.study_uid == "7.7.7")).all()) == 1
        from node.db import Instance

        assert len(s.scalars(select(Instance)).all()) == 8


def test_a_released_study_completes_at_once_only_with_complete_on_release(db):
    """dicom.complete_on_release: the association that brought the study's last
    instance was released, so it is complete without its stability window."""
    from node.receiver import record_release

    record_instance(db, *stored(sop="1.1"))
    record_release(db, "MOD", ["1.2.3"])
    assert complete_quiet_studies(db, stable_seconds=3600) == []  # off: the window still counts
    assert len(complete_quiet_studies(db, stable_seconds=3600, on_release=True)) == 1
    assert (study(db).state, study(db).version) == ("processing", 1)


def test_an_instance_after_the_release_waits_for_the_window_again(db):
    """Another association still sending the study: its last instance came after
    the release, so the study completes when quiet, as without the option."""
    from node.receiver import record_release

    record_instance(db, *stored(sop="1.1"))
    record_release(db, "MOD", ["1.2.3"])
    record_instance(db, *stored(sop="1.2"))  # last_received_at now after released_at
    assert complete_quiet_studies(db, stable_seconds=3600, on_release=True) == []
    assert len(complete_quiet_studies(db, stable_seconds=5, at=now() + 6, on_release=True)) == 1


def test_an_idle_worker_is_woken_when_work_is_queued(db, tmp_path):
    """WorkerPool.wake(): with an hour between polls, a queued job still runs
    at once when this process says it queued it."""
    from node.config import Settings
    from node.context import NodeContext
    from node.jobs import enqueue
    from node.states import Stage
    from node.worker import WorkerPool
    from peers import wait_until

    settings = Settings(storage={"data_dir": str(tmp_path)}, pipeline={"poll_seconds": 3600})
    pool = WorkerPool(NodeContext(settings=settings, db=db), 1)
    pool.start()
    try:
        wait_until(lambda: pool._threads[0].is_alive(), 10)
        record_instance(db, *stored(sop="1.1"))
        complete_quiet_studies(db, stable_seconds=0.1, at=now() + 1)  # version 1, an infer job
        with db.session() as s:
            st = s.scalars(select(Study)).one()
            st.version = 2  # superseded: the worker settles the version-1 job without a model
            enqueue(s, st.id, Stage.INFER, 1)
        pool.wake()
        wait_until(lambda: all(j.state == "done" for j in jobs(db)), 30, interval=0.05, what="the job run after wake()")
    finally:
        pool.stop(5)


def test_only_one_idle_worker_polls_the_queue(db, tmp_path, monkeypatch):
    """WorkerPool: idle workers wait for wake(); one of them, the poller, also
    looks every poll_seconds (work from another process, a retry come due).
    With every idle worker polling, six idle workers ran twelve claim
    transactions a second, each taking SQLite's write lock and the GIL."""
    import threading

    import node.worker
    from node.config import Settings
    from node.context import NodeContext
    from node.worker import WorkerPool
    from peers import wait_until

    claims: list[str] = []
    lock = threading.Lock()

    def run_one(ctx, owner, running):
        with lock:
            claims.append(owner)
        return False  # nothing to do

    monkeypatch.setattr(node.worker, "run_one", run_one)
    settings = Settings(storage={"data_dir": str(tmp_path)}, pipeline={"poll_seconds": 0.02})
    pool = WorkerPool(NodeContext(settings=settings, db=db), 4)
    pool.start()
    try:
        wait_until(lambda: len(claims) >= 30, 30, interval=0.01, what="thirty looks at the queue")
    finally:
        pool.stop(5)
    first_looks = {owner: claims.index(owner) for owner in set(claims)}
    assert len(first_looks) == 4  # every worker looked once when it started
    polls = [owner for i, owner in enumerate(claims) if i != first_looks[owner]]
    assert len(set(polls)) == 1, f"idle workers that polled: {sorted(set(polls))}"


def test_a_later_stage_is_claimed_before_an_older_earlier_one(db):
    """A burst flows through study by study: another study's encode, capture or
    deliveries go before an infer queued earlier; deliveries before drawing,
    but the SCs' delivery only once its capture is done."""
    from node.states import Stage

    for sop, uid in (("1.1", "1.2.3"), ("2.1", "2.2.3")):
        record_instance(db, *stored(sop=sop, study=uid))
    complete_quiet_studies(db, stable_seconds=0.1, at=now() + 1)  # two infer jobs, oldest first
    with db.session() as s:
        second = s.scalars(select(Study).where(Study.study_uid == "2.2.3")).one()
        enqueue(s, second.id, Stage.CAPTURE, 1)
        enqueue(s, second.id, Stage.DELIVER_SC, 1, destination="pacs")
        enqueue(s, second.id, Stage.DELIVER, 1, destination="pacs")
        enqueue(s, second.id, Stage.ENCODE, 1)
    order = []
    while (job := claim(db, "w", 30)) is not None:
        order.append(job.stage)
        succeed(db, job)
    assert order == ["deliver", "capture", "deliver-sc", "encode", "infer", "infer"]
