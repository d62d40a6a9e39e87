"""Issue 3 acceptance, crash test: SIGKILL the node while 50 studies are pushed
and processed, at moments aimed into each stage, and check what README.md
("What Carina guarantees") promises:

- every acknowledged instance is stored once, with the bytes that were sent;
- every study is processed once (version 1, one job per stage, one result);
- in the PACS: exactly the study's SR and heatmaps, each with Carina's current
  content. A delivery interrupted by a crash is repeated, so the PACS may
  receive an object again; such a re-send must be identical (Orthanc answers
  success and keeps its one copy) and may only come from a delivery job that
  was interrupted, never from a finished one;
- no FHIR resource is written twice.

One `storescu` process per study, so each C-STORE's outcome is known (see
`peers.store_outcome`): acked, refused (no association: the node was down, and
the modality tries again), or aborted (the node died mid-C-STORE: the instance
may or may not be in Carina; the ones it does not know are re-sent at the end,
as a modality would).

A killer thread SIGKILLs `carina serve` following KILL_PLAN and restarts it.
Where each kill landed is read from what was observable at that moment, never
assumed: the jobs the killed process held `running` in the database (their
lease owner names its pid), and whether the storescu in flight saw its
association aborted. A targeted kill that missed (the job finished or the
response left first) is tried again. Orthanc logs every C-STORE it receives
(`Orthanc.receptions`), so a re-delivery is counted even though Orthanc keeps
one copy.
"""
from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from dicom_factory import make_dx, small_chest_pixels, write
from peers import (
    CarinaNode,
    accepts_connections,
    carina_db_rows,
    carina_outputs_in_orthanc,
    dcmsend,
    expected_outputs,
    node_with_pacs,
    store_outcome,
    storescu,
    storescu_watched,
    study_state,
    wait_until,
)
from pydicom import dcmread

log = logging.getLogger(__name__)

SEED = int(os.environ.get("CARINA_CRASH_SEED", "20261121"))
STUDIES = 50
STAGES = ("store", "infer", "encode", "capture", "deliver", "deliver-sc")
# One kill per entry. "store" kills right after storescu sends its C-STORE
# request (mid-transfer, mid-commit, or between the commit and the response);
# a stage name kills while a job of that stage runs; "random" kills at a
# random moment, sometimes while the node is still starting. Both "store"
# kills come early, while studies are still being pushed.
KILL_PLAN = ("store", "infer", "store", "deliver", "encode", "capture", "deliver-sc", "random")
TRIES = 4  # a targeted kill that missed its stage is aimed again, up to this many times
RESERVE = 12  # studies the killer may feed when the pipeline has drained before a planned kill
CARINA_AE = "CARINA"  # the node's calling AE towards the PACS


def small_studies(work: Path, count: int, rng: random.Random) -> list[tuple[str, str, Path]]:
    """`count` distinct single-image DX studies, 256..320 px, from random crops of the NIH samples."""
    out = []
    for n in range(count):
        pixels = small_chest_pixels(
            n, rng.choice((256, 288, 320)), crop_fraction=rng.uniform(0.75, 1.0), offset=(rng.random(), rng.random())
        )
        ds = make_dx(pixels, patient_id=f"CRASH-{n:03d}", accession=f"CR{n:05d}")
        out.append((ds.StudyInstanceUID, ds.SOPInstanceUID, write(ds, work / f"study{n:03d}.dcm")))
    return out


def push(node: CarinaNode, path: Path) -> str:
    return store_outcome(storescu(node.dicom_port, path))


class Pusher(threading.Thread):
    """A modality: pushes each study once, trying again while the node is
    down. Every storescu run is an attempt with its start and end time, so a
    kill can be matched to the C-STORE it interrupted.

    After the planned studies it waits for more until closed: when the killer
    aims at a stage that has no work left (the pipeline outran it on a busy
    machine), it feeds one study from the reserve, so every planned kill has
    something to land in whatever the machine's speed."""

    def __init__(self, node: CarinaNode, studies, reserve, seed: int, errors: list):
        super().__init__(name="pusher")
        self.node, self.rng, self.errors = node, random.Random(seed), errors
        self.queue, self.reserve = list(studies), list(reserve)
        self.pushed: list[tuple[str, str, Path]] = []  # every study taken from the queue, in order
        self.attempts: list[dict] = []  # {"study", "start", "end", "result", "text"}
        self.outcome: dict[str, str] = {}  # study uid -> acked | aborted
        self.store_request = threading.Event()  # set at the next "Sending Store Request" once armed
        self._armed = False
        self._closed = False
        self._busy = False
        self._lock = threading.Condition()

    def arm(self) -> None:
        with self._lock:
            self._armed = True
            self.store_request.clear()

    def feed(self) -> bool:
        """Queue one reserve study; False when the reserve is used up."""
        with self._lock:
            if not self.reserve:
                return False
            self.queue.append(self.reserve.pop(0))
            self._lock.notify_all()
            return True

    def idle(self) -> bool:
        """Nothing queued and nothing being pushed."""
        with self._lock:
            return not self.queue and not self._busy

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._lock.notify_all()

    def _on_line(self, line: str) -> None:
        if "Sending Store Request" in line:
            with self._lock:
                if self._armed:
                    self._armed = False
                    self.store_request.set()

    def settled_before(self, moment: float) -> bool:
        """Every attempt started before `moment` has ended."""
        with self._lock:
            return all(a["end"] is not None for a in self.attempts if a["start"] <= moment)

    def _next(self):
        with self._lock:
            self._lock.wait_for(lambda: self.queue or self._closed)
            if not self.queue:
                return None
            self._busy = True
            study = self.queue.pop(0)
            self.pushed.append(study)
            return study

    def run(self) -> None:
        try:
            while (study := self._next()) is not None:
                study_uid, _, path = study
                while True:
                    attempt = {"study": study_uid, "start": time.monotonic(), "end": None, "result": None, "text": ""}
                    with self._lock:
                        self.attempts.append(attempt)
                    proc = storescu_watched(self.node.dicom_port, path, self._on_line)
                    with self._lock:
                        attempt.update(end=time.monotonic(), result=store_outcome(proc), text=proc.stdout)
                    if attempt["result"] != "refused":
                        self.outcome[study_uid] = attempt["result"]
                        break
                    # Never reached the node: wait until it listens again, then retry.
                    wait_until(lambda: accepts_connections(self.node.dicom_port), 180, interval=0.05,
                               what="the node listening again")
                with self._lock:
                    self._busy = False
                time.sleep(self.rng.uniform(0.05, 0.5))  # a modality's pace between studies
        except BaseException as exc:  # surfaced in the main thread
            self.errors.append(exc)


class Killer(threading.Thread):
    """Follows KILL_PLAN; records for each kill what it interrupted."""

    def __init__(self, node: CarinaNode, pusher: Pusher, seed: int, errors: list):
        super().__init__(name="killer")
        self.node, self.pusher, self.rng, self.errors = node, pusher, random.Random(seed), errors
        self.kills: list[dict] = []

    def jobs_running_in(self, pid: int) -> list[str]:
        # Worker lease owners are "host:pid:nonce:n": rows a dead process left
        # running belong to it, not to the process now running.
        rows = carina_db_rows(self.node, "SELECT stage FROM jobs WHERE state = 'running' AND lease_owner LIKE ?", (f"%:{pid}:%",))
        return sorted(r[0] for r in rows)

    def kill(self, target: str, **facts) -> dict:
        pid = self.node.proc.pid
        before = time.monotonic()
        self.node.kill()  # SIGKILL, then reap
        # Read while the node is down: exactly what the dead process held.
        kill = {"target": target, "pid": pid, "span": (before, time.monotonic()), "jobs": self.jobs_running_in(pid), **facts}
        self.kills.append(kill)
        self.node.start(wait_ready=False)
        return kill

    def aborted_attempt(self, kill: dict) -> dict | None:
        """The push this kill interrupted, if the sender saw its association aborted."""
        wait_until(lambda: self.pusher.settled_before(kill["span"][1]), 60, interval=0.01, what="the push in flight to end")
        return next((a for a in self.pusher.attempts if aborted_by(a, kill)), None)

    def aim(self, target: str) -> bool:
        """One kill aimed at `target`; True when it landed there."""
        node = self.node
        if target == "store":
            self.pusher.arm()
            if self.pusher.idle() and not self.pusher.feed():
                return False  # the reserve is used up: no C-STORE left to interrupt
            while not self.pusher.store_request.wait(0.1):
                if self.pusher.idle() and not self.pusher.feed():
                    return False
            time.sleep(self.rng.uniform(0.0, 0.02))  # a seeded offset into the ~20 ms C-STORE
            return self.aborted_attempt(self.kill(target)) is not None
        if target == "random":
            if self.rng.random() < 0.7:
                wait_until(node._healthy, 120, what="carina healthy before a kill")
            time.sleep(self.rng.uniform(0.0, 3.0))  # the random moment itself
            try:
                healthy = node._healthy()
            except Exception:
                healthy = False
            self.kill(target, healthy=healthy)
            return True

        def stage_running():
            if target in self.jobs_running_in(node.proc.pid):
                return "running"
            left = carina_db_rows(node, "SELECT id FROM jobs WHERE stage = ? AND state IN ('pending', 'running') LIMIT 1", (target,))
            in_flight = carina_db_rows(node, "SELECT id FROM studies WHERE state IN ('received', 'processing') LIMIT 1")
            if left or in_flight or not self.pusher.idle():
                return False  # a job of this stage is queued or will be
            # The pipeline drained: a new study will bring a job of this stage.
            return False if self.pusher.feed() else "none left"

        if wait_until(stage_running, 90, interval=0.01, what=f"a {target} job running") == "none left":
            return False  # nothing of that stage will run again; the assertions report the miss
        time.sleep(self.rng.uniform(0.0, 0.03))  # a seeded offset into the job
        return target in self.kill(target)["jobs"]

    def run(self) -> None:
        try:
            for target in KILL_PLAN:
                for _ in range(TRIES):
                    if self.aim(target):
                        break
        except BaseException as exc:
            self.errors.append(exc)
        finally:
            self.pusher.close()


def aborted_by(attempt: dict, kill: dict) -> bool:
    """The sender saw its association aborted, and it was open while the kill happened."""
    return attempt["result"] == "aborted" and attempt["start"] <= kill["span"][1] and attempt["end"] >= kill["span"][0]


def landed(kill: dict, pusher: Pusher) -> list[str]:
    """The stages a kill interrupted, from what was observable at that moment."""
    stages = set(kill["jobs"])
    if any(aborted_by(a, kill) for a in pusher.attempts):
        stages.add("store")
    if kill.get("healthy") is False:
        stages.add("starting")
    return sorted(stages) or ["idle"]


@pytest.fixture
def crash_rig(tmp_path):
    pipeline = {"lease_seconds": 5, "poll_seconds": 0.1, "workers": 2}
    with node_with_pacs(tmp_path, start=False, stable_seconds=1.0, extra={"pipeline": pipeline}) as (node, pacs):
        yield node, pacs, tmp_path


def test_sigkill_in_every_stage_loses_nothing_and_duplicates_nothing(crash_rig):
    node, pacs, work = crash_rig
    rng = random.Random(SEED)
    print(f"crash test seed {SEED} (set CARINA_CRASH_SEED to replay)")
    planned = small_studies(work, STUDIES + RESERVE + 1, rng)
    barrier = planned.pop()
    node.start()

    errors: list[BaseException] = []
    pusher = Pusher(node, planned[:STUDIES], planned[STUDIES:], SEED + 1, errors)
    killer = Killer(node, pusher, SEED + 2, errors)
    started = time.monotonic()
    pusher.start()
    killer.start()
    killer.join(600)
    pusher.join(600)
    # Verification starts only once nothing can kill or push any more.
    assert not killer.is_alive() and not pusher.is_alive(), "killer or pusher still running"
    assert not errors, errors
    kills = killer.kills
    studies = pusher.pushed  # the planned ones and any the killer fed
    count = len(studies)
    wait_until(node._healthy, 120, what="carina healthy after the last restart")

    # In-doubt C-STOREs: the node may or may not have committed them. Those it
    # knows must be processed without any help; the rest a modality re-sends.
    aborted = [uid for uid, res in pusher.outcome.items() if res == "aborted"]
    known_without_ack = [uid for uid in aborted if study_state(node, uid) is not None]
    resent = [(uid, path) for uid, _, path in studies if uid in aborted and uid not in known_without_ack]
    for uid, path in resent:
        assert push(node, path) == "acked", f"re-send of {uid} after the kills was not acknowledged"

    def all_settled():
        counts = node.api("/api/v1/jobs?limit=1")["counts"]
        studies_counts = node.api("/api/v1/studies?limit=1")["counts"]
        return (
            not counts.get("pending") and not counts.get("running")
            and studies_counts.get("done", 0) + studies_counts.get("failed", 0) + studies_counts.get("ignored", 0) == count
        )

    wait_until(all_settled, 150, interval=0.5, what="every job done or dead and every study settled")
    elapsed = time.monotonic() - started

    # --- count: losses, duplicates, changed content and re-sends, separately ---
    losses: list[str] = []  # acknowledged or produced, but missing or wrong
    duplicates: list[str] = []  # something recorded, processed or held twice
    changed: list[str] = []  # an object whose content differs between copies
    resends: Counter = Counter()  # study uid -> identical re-deliveries Orthanc received

    instance_rows = defaultdict(list)
    for sop_uid, path, state in carina_db_rows(node, "SELECT sop_instance_uid, path, state FROM instances"):
        instance_rows[sop_uid].append((path, state))
    jobs = defaultdict(list)
    for study_uid, stage, version, state, attempts in carina_db_rows(
        node, "SELECT s.study_uid, j.stage, j.study_version, j.state, j.attempts FROM jobs j JOIN studies s ON s.id = j.study_id"
    ):
        jobs[study_uid].append((stage, version, state, attempts))
    results = Counter(r[0] for r in carina_db_rows(node, "SELECT s.study_uid FROM results r JOIN studies s ON s.id = r.study_id"))
    outputs = defaultdict(dict)  # study uid -> {sop uid: (kind, path)}
    for study_uid, sop_uid, kind, path in carina_db_rows(
        node, "SELECT s.study_uid, o.sop_instance_uid, o.kind, o.path FROM outputs o JOIN studies s ON s.id = o.study_id"
    ):
        outputs[study_uid][sop_uid] = (kind, path)
    received = defaultdict(list)  # sop uid -> tags of each C-STORE Orthanc received from Carina
    for reception in pacs.receptions():
        if reception["calling_ae"] == CARINA_AE:
            received[reception["sop"]].append(reception["tags"])
    study_rows = len(carina_db_rows(node, "SELECT id FROM studies"))
    if study_rows != count:
        duplicates.append(f"{study_rows} study rows for {count} studies")

    for study_uid, sop_uid, path in studies:
        rows = instance_rows.get(sop_uid, [])
        if not rows:
            losses.append(f"instance {sop_uid}: acknowledged but not in the database")
        if len(rows) > 1:
            duplicates.append(f"instance {sop_uid}: {len(rows)} rows")
        for stored, state in rows:
            # The file meta is the receiver's own (implementation UID); the dataset is exactly what was sent.
            if not Path(stored).exists() or dcmread(stored) != dcmread(path):
                losses.append(f"instance {sop_uid}: stored copy missing or different from what was sent")
            if state != "scored":
                losses.append(f"instance {sop_uid}: {state}, not scored")

        view = study_state(node, study_uid)
        if view is None or view["state"] != "done":
            losses.append(f"study {study_uid}: {view and (view['state'], view['reason'])}, not done")
            continue
        if view["version"] != 1:
            duplicates.append(f"study {study_uid}: processed as version {view['version']}")
        per_stage = Counter(stage for stage, *_ in jobs[study_uid])
        for stage in STAGES[1:]:
            if per_stage[stage] < 1:
                losses.append(f"study {study_uid}: no {stage} job")
            elif per_stage[stage] > 1:
                duplicates.append(f"study {study_uid}: {per_stage[stage]} {stage} jobs")
        losses.extend(f"study {study_uid}: {stage} job {state}" for stage, _, state, _ in jobs[study_uid] if state != "done")
        if results[study_uid] != 1:
            duplicates.append(f"study {study_uid}: {results[study_uid]} results")

        # In the PACS: exactly Carina's outputs for the study, with Carina's content.
        produced = outputs[study_uid]
        expected_kinds = Counter({k: n for k, n in expected_outputs(view).items() if k in ("sr", "sc", "seg", "gsps", "pdf") and n})
        if Counter(kind for kind, _ in produced.values()) != expected_kinds:
            duplicates.append(f"study {study_uid}: outputs {Counter(k for k, _ in produced.values())}, expected {expected_kinds}")
        held = {inst["MainDicomTags"]["SOPInstanceUID"]: inst["ID"] for inst in pacs.study_instances(study_uid)}
        losses.extend(f"study {study_uid}: output {uid} not in the PACS" for uid in set(produced) - set(held))
        duplicates.extend(f"study {study_uid}: PACS holds {uid}, not a current output" for uid in set(held) - set(produced))
        for uid in set(held) & set(produced):
            copy = pacs.download(held[uid], work / "from-pacs.dcm")
            if dcmread(copy) != dcmread(produced[uid][1]):
                changed.append(f"study {study_uid}: PACS copy of {uid} differs from Carina's output")
        runs = {stage: a for stage, _, _, a in jobs[study_uid]}
        for uid in produced:
            copies = received.get(uid, [])
            if any(tags != copies[0] for tags in copies[1:]):
                changed.append(f"study {study_uid}: {uid} re-sent with different content")
            repeats = max(0, len(copies) - 1)
            resends[study_uid] += repeats
            # A re-send repeats only uncommitted work: its delivery job (the SCs' own
            # for an SC) was interrupted and claimed again.
            stage = "deliver-sc" if produced[uid][0] == "sc" else "deliver"
            if repeats and runs.get(stage, 0) < 2:
                duplicates.append(f"study {study_uid}: {uid} re-sent {repeats}x by a {stage} job that ran once")
    stray = [uid for uid in received if not any(uid in produced for produced in outputs.values())]
    duplicates.extend(f"PACS received {uid}, which is no output of Carina" for uid in stray)

    # FHIR: one report per study, and no resource written twice. A re-run
    # after a crash must not add a version (an EHR would see a spurious update).
    reports = carina_db_rows(node, "SELECT COUNT(*) FROM fhir_resources WHERE resource_type = 'DiagnosticReport'")[0][0]
    if reports != count:
        duplicates.append(f"{reports} DiagnosticReports for {count} studies")
    rewritten = carina_db_rows(
        node, "SELECT resource_type, resource_id, MAX(version_id) FROM fhir_resources GROUP BY resource_type, resource_id HAVING MAX(version_id) > 1"
    )
    duplicates.extend(f"FHIR {rtype}/{rid} written {n} times" for rtype, rid, n in rewritten)

    per_stage = Counter(stage for kill in kills for stage in landed(kill, pusher))
    attempts = Counter(a["result"] for a in pusher.attempts)
    summary = {
        "seed": SEED,
        "studies": count,
        "kills": len(kills),
        "kills by target": dict(Counter(k["target"] for k in kills)),
        "kills that landed in": dict(sorted(per_stage.items())),
        "push attempts": dict(attempts),
        "aborted mid-C-STORE, already recorded": len(known_without_ack),
        "aborted mid-C-STORE, re-sent after the kills": len(resent),
        "losses": len(losses),
        "duplicates": len(duplicates),
        "changed content": len(changed),
        "identical re-sends received by the PACS": sum(resends.values()),
        "studies re-delivered": sum(1 for n in resends.values() if n),
        "seconds": round(elapsed, 1),
    }
    print("crash test:", summary)
    print("kills:", [(k["target"], landed(k, pusher)) for k in kills])

    assert len(kills) >= 5, kills
    for stage in STAGES:
        assert per_stage[stage] >= 1, f"no kill landed in {stage}: {[(k['target'], landed(k, pusher)) for k in kills]}"
    assert attempts["failed"] == 0, [a["text"] for a in pusher.attempts if a["result"] == "failed"]
    # Every aborted association was one of ours: the node never aborts a sender by itself.
    unexplained = [a for a in pusher.attempts if a["result"] == "aborted" and not any(aborted_by(a, k) for k in kills)]
    assert unexplained == [], [a["text"] for a in unexplained]
    dead = node.api("/api/v1/jobs?state=dead")["jobs"]
    assert dead == [], f"dead-letter jobs after crashes: {dead}"
    assert losses == [], f"{len(losses)} losses: {losses[:10]}"
    assert duplicates == [], f"{len(duplicates)} duplicates: {duplicates[:10]}"
    assert changed == [], f"{len(changed)} objects with changed content: {changed[:10]}"
    # Re-sends are allowed (an interrupted delivery is repeated), each one identical; checked above.

    # What deterministic UIDs rely on, and a check of the reception log
    # itself: the PACS answers success to an identical re-send, logs the
    # reception, and keeps one copy.
    study_uid = studies[0][0]
    before = carina_outputs_in_orthanc(pacs, study_uid)
    sr_uid, (_, sr_path) = next((uid, o) for uid, o in outputs[study_uid].items() if o[0] == "sr")
    receptions_before = len(received[sr_uid])
    # dcmsend proposes the file's own SOP class; storescu's default list lacks Comprehensive 3D SR.
    proc = dcmsend(pacs.dicom_port, Path(sr_path), called_ae=pacs.ae_title, calling_ae=CARINA_AE)
    assert "with status SUCCESS  : 1" in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    assert carina_outputs_in_orthanc(pacs, study_uid) == before
    again = [r["tags"] for r in pacs.receptions() if r["sop"] == sr_uid and r["calling_ae"] == CARINA_AE]
    assert len(again) == receptions_before + 1 and again[-1] == again[0], "the reception log missed an identical re-send"

    # A modality that re-sends an identical, already processed instance gets
    # success and changes nothing: no new version, no new job, no delivery.
    # The barrier study, pushed after them, is done only once every study
    # that went quiet before it has been through completion.
    jobs_before = len(carina_db_rows(node, "SELECT id FROM jobs"))
    receptions_before = len(pacs.receptions())
    for study_uid, _, path in studies[:3]:
        assert push(node, path) == "acked"
    assert push(node, barrier[2]) == "acked"
    wait_until(lambda: (study_state(node, barrier[0]) or {}).get("state") == "done"
               and all(d["state"] == "done" for d in study_state(node, barrier[0])["deliveries"]),
               120, interval=0.3, what="the barrier study done and delivered")
    for study_uid, _, _ in studies[:3]:
        view = study_state(node, study_uid)
        assert view["state"] == "done" and view["version"] == 1, view
        assert {i["state"] for i in view["instances"]} == {"scored"}, view["instances"]
    assert len(carina_db_rows(node, "SELECT id FROM jobs")) == jobs_before + 5  # the barrier's infer, encode, capture, deliver, deliver-sc
    assert {r["study"] for r in pacs.receptions()[receptions_before:]} == {barrier[0]}
