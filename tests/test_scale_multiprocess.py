"""Issue 12, scale beyond one box: one receiver, two workers and one api, each its own
`carina serve --role ...` OS process, on PostgreSQL and one shared storage
directory, delivering to a real Orthanc.

What README.md ("Scale-out") claims, checked here:
- 50 studies pushed to the receiver with dcmsend are all processed (once:
  version 1, one job per stage, one result) and delivered;
- a worker SIGKILLed while it holds a leased infer or encode job loses
  nothing: the job is taken over by the other worker once its lease has
  expired (not before), and every output reaches the PACS exactly once, as
  counted by Orthanc's own reception log (a Lua hook on every C-STORE);
- the api process serves the operator API over the same database, and every
  role answers /healthz, /readyz and /metrics;
- importing and activating a model once (`carina model import --activate` on
  the shared storage) reaches every worker process, and a replacement worker
  started later joins the queue.

The kill is aimed, not timed: the worker is SIGSTOPped, what it holds is read
from the jobs table (lease owners name the pid), and it is SIGKILLed only when
it holds an infer or encode job (else it is resumed and the aim repeated).
"""
from __future__ import annotations

import os
import signal
import subprocess
import threading
import urllib.error
import urllib.request
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from dicom_factory import make_dx, small_chest_pixels, write
from peers import CarinaNode, Orthanc, dcmsend, expected_outputs, http_json, study_state, wait_until

STUDIES = 50
LEASE_SECONDS = 6.0  # short, so the takeover comes within seconds; heartbeats renew every 2 s
CARINA_AE = "CARINA"
AIMS = 200  # SIGSTOP/inspect/resume rounds before giving up on catching an infer or encode job


class Cluster:
    """The four processes, the PACS, and a read-only view of the shared database."""

    def __init__(self, work: Path, database_url: str):
        self.work = work
        self.database_url = database_url
        self.pacs = Orthanc(work / "orthanc").start()
        self.shared = work / "shared"  # storage.data_dir of every role: an NFS or CSI volume in production
        self.engine = create_engine(database_url)
        self.nodes: dict[str, CarinaNode] = {}

    def node(self, name: str, role: str) -> CarinaNode:
        node = CarinaNode(
            self.work / name, role=role, stable_seconds=1.0,
            destinations=[{"name": "pacs", "type": "dicom", "ae_title": self.pacs.ae_title, "host": "127.0.0.1",
                           "port": self.pacs.dicom_port}],
            extra={"storage": {"data_dir": str(self.shared), "min_free_mb": 0},
                   # One worker thread per process, so a kill interrupts exactly the job the rows show.
                   "pipeline": {"workers": 1, "lease_seconds": LEASE_SECONDS, "poll_seconds": 0.1},
                   "inference": {"model_poll_seconds": 0.5}},
            env={"CARINA_DATABASE__URL": self.database_url},  # the container way: config by environment
        )
        self.nodes[name] = node
        return node

    def rows(self, sql: str, **params) -> list[tuple]:
        with self.engine.connect() as conn:
            return [tuple(r) for r in conn.execute(text(sql), params)]

    def db_now(self) -> float:
        return self.rows("SELECT extract(epoch FROM clock_timestamp())")[0][0]

    def held_by(self, pid: int) -> list[tuple]:
        """(id, stage, lease_until, lease_owner) of the jobs a worker process holds: owners are host:pid:nonce:n."""
        return self.rows("SELECT id, stage, lease_until, lease_owner FROM jobs "
                         "WHERE state = 'running' AND lease_owner LIKE :owner", owner=f"%:{pid}:%")

    def stop(self) -> None:
        for node in self.nodes.values():
            if node.proc and node.proc.poll() is None:
                try:
                    os.kill(node.proc.pid, signal.SIGCONT)  # a stopped process cannot act on SIGTERM
                except OSError:
                    pass
            node.stop()
        self.pacs.stop()
        self.engine.dispose()


@pytest.fixture
def cluster(tmp_path, postgres_url):
    from conftest import postgres_schema

    url, drop = postgres_schema(postgres_url)
    c = Cluster(tmp_path, url)
    try:
        yield c
    finally:
        c.stop()
        drop()


def small_studies(work: Path, count: int) -> list[tuple[str, str, Path]]:
    out = []
    for n in range(count):
        ds = make_dx(small_chest_pixels(n, 256), patient_id=f"SCALE-{n:03d}", accession=f"SC{n:05d}")
        out.append((str(ds.StudyInstanceUID), str(ds.SOPInstanceUID), write(ds, work / f"study{n:03d}.dcm")))
    return out


def healthz(node: CarinaNode) -> dict:
    return http_json(f"{node.url}/healthz")


def model_ref(node: CarinaNode) -> str | None:
    model = healthz(node).get("model")
    return model and f"{model['name']}@{model['version']}"


def test_receiver_two_workers_and_api_on_postgresql_survive_a_worker_sigkill(cluster, tmp_path, demo_model):
    receiver = cluster.node("receiver", "receiver")
    worker_a, worker_b = cluster.node("worker-a", "worker"), cluster.node("worker-b", "worker")
    api = cluster.node("api", "api")

    # The release procedure: migrate once, then start the nodes (which refuse an unmigrated database).
    upgraded = api.carina("db", "upgrade")
    assert "upgraded from nothing" in upgraded.stdout, upgraded.stdout
    api.create_token()
    for node in (receiver, worker_a, worker_b, api):
        node.start(wait_ready=False)
    for node in (receiver, worker_a, worker_b, api):
        wait_until(node._healthy, 180, what=f"{node.role} at {node.workdir.name} healthy")

    # Every role serves the probes and the metrics; only the api role serves the API.
    for node, parts in ((receiver, {"db", "scp"}), (worker_a, {"db", "model"}), (api, {"db"})):
        body = healthz(node)
        assert body["role"] == node.role and set(body["parts"]) == parts, body
        assert http_json(f"{node.url}/readyz")["status"] == "ready"
        with urllib.request.urlopen(f"{node.url}/metrics", timeout=10) as rsp:
            assert b"carina_queue_depth" in rsp.read()
    for node in (receiver, worker_a):
        with pytest.raises(urllib.error.HTTPError) as refused:
            http_json(f"{node.url}/api/v1/studies", token=api.token)
        assert refused.value.code == 404

    studies = small_studies(tmp_path, STUDIES)
    pushed: list[subprocess.CompletedProcess] = []
    pusher = threading.Thread(target=lambda: pushed.append(
        dcmsend(receiver.dicom_port, *(path for _, _, path in studies))))
    pusher.start()

    # Aim: once worker A has finished some jobs (both workers share the queue), freeze it,
    # read what it holds, and kill it only inside an infer or encode job.
    victim = worker_a.proc.pid
    wait_until(lambda: cluster.rows("SELECT count(*) FROM jobs WHERE state = 'done' AND lease_owner LIKE :owner",
                                    owner=f"%:{victim}:%")[0][0] >= 5, 300, what="worker A done with 5 jobs")
    kill = None
    for _ in range(AIMS):
        # Deliveries are most of a worker's time: wait for an infer or encode job to show.
        wait_until(lambda: any(stage in ("infer", "encode") for _, stage, _, _ in cluster.held_by(victim)), 120,
                   interval=0.005, what="worker A holding an infer or encode job")
        os.kill(victim, signal.SIGSTOP)
        held = cluster.held_by(victim)
        if held and all(stage in ("infer", "encode") for _, stage, _, _ in held):
            worker_a.kill()  # SIGKILL, then reap: a stopped process dies as well
            kill = {"jobs": held, "at": cluster.db_now()}
            break
        os.kill(victim, signal.SIGCONT)
    assert kill is not None, f"worker A never held an infer or encode job in {AIMS} aims"
    pusher.join(600)
    assert pushed and "with status SUCCESS  : %d" % STUDIES in pushed[0].stdout + pushed[0].stderr, pushed

    # The dead worker's jobs are taken over by worker B, after their leases expired (the database's clock).
    survivor = worker_b.proc.pid
    for job_id, stage, lease_until, owner in kill["jobs"]:
        def taken_over():
            row = cluster.rows("SELECT lease_owner, attempts FROM jobs WHERE id = :id", id=job_id)[0]
            return row if row[0] != owner else None

        new_owner, attempts = wait_until(taken_over, 120, interval=0.05, what=f"{stage} job {job_id} taken over")
        assert cluster.db_now() > lease_until, f"{stage} job {job_id} was taken over before its lease expired"
        assert f":{survivor}:" in new_owner and attempts == 2, (new_owner, attempts)

    def all_settled():
        counts = api.api("/api/v1/jobs?limit=1")["counts"]
        states = api.api("/api/v1/studies?limit=1")["counts"]
        return not counts.get("pending") and not counts.get("running") and states.get("done", 0) == STUDIES

    wait_until(all_settled, 600, interval=1.0, what="every study done and every job settled (via the api role)")

    # --- processed once ---
    problems: list[str] = []
    jobs = defaultdict(list)
    for uid, stage, version, state in cluster.rows(
            "SELECT s.study_uid, j.stage, j.study_version, j.state FROM jobs j JOIN studies s ON s.id = j.study_id"):
        jobs[uid].append((stage, version, state))
    results = Counter(r[0] for r in cluster.rows("SELECT s.study_uid FROM results r JOIN studies s ON s.id = r.study_id"))
    outputs = defaultdict(dict)
    for uid, sop, kind in cluster.rows(
            "SELECT s.study_uid, o.sop_instance_uid, o.kind FROM outputs o JOIN studies s ON s.id = o.study_id"):
        outputs[uid][sop] = kind
    assert len(cluster.rows("SELECT id FROM studies")) == STUDIES
    received = Counter(r["sop"] for r in cluster.pacs.receptions() if r["calling_ae"] == CARINA_AE)
    for uid, _, _ in studies:
        view = study_state(api, uid)
        if view["state"] != "done" or view["version"] != 1:
            problems.append(f"{uid}: {view['state']} v{view['version']}")
            continue
        per_stage = Counter(stage for stage, _, _ in jobs[uid])
        if per_stage != Counter({"infer": 1, "encode": 1, "capture": 1, "deliver": 1, "deliver-sc": 1}):
            problems.append(f"{uid}: jobs {dict(per_stage)}")
        problems.extend(f"{uid}: {stage} {state}" for stage, _, state in jobs[uid] if state != "done")
        if results[uid] != 1:
            problems.append(f"{uid}: {results[uid]} results")
        expected = Counter({k: n for k, n in expected_outputs(view).items() if k in ("sr", "sc", "seg", "gsps", "pdf") and n})
        if Counter(outputs[uid].values()) != expected:
            problems.append(f"{uid}: outputs {Counter(outputs[uid].values())}, expected {expected}")
        # --- delivered exactly once, counted at the PACS ---
        held = {i["MainDicomTags"]["SOPInstanceUID"] for i in cluster.pacs.study_instances(uid)}
        if held != set(outputs[uid]):
            problems.append(f"{uid}: the PACS holds {len(held)} objects, Carina produced {len(outputs[uid])}")
        problems.extend(f"{uid}: {sop} received {received[sop]} times" for sop in outputs[uid] if received[sop] != 1)
    stray = set(received) - {sop for produced in outputs.values() for sop in produced}
    problems.extend(f"the PACS received {sop}, no output of Carina" for sop in stray)
    assert problems == [], f"{len(problems)} problems: {problems[:10]}"

    # Both workers took jobs; the survivor finished the dead one's.
    owners = Counter(owner.split(":")[1] for (owner,) in cluster.rows("SELECT lease_owner FROM jobs"))
    assert owners[str(victim)] >= 5 and owners[str(survivor)] > 0, owners
    assert set(owners) == {str(victim), str(survivor)}, owners

    # --- the model registry is shared: one activation reaches every worker ---
    replacement = cluster.node("worker-c", "worker").start()  # as an orchestrator replaces a dead pod
    from model_factory import write_xrv_pickle

    path, digest = write_xrv_pickle(tmp_path / "cxr-v1.pt", demo_model.module.state_dict(), seed=1)
    imported = api.carina("model", "import", str(path), "--name", "cxr", "--version", "v1", "--sha256", digest,
                          "--activate")
    assert "cxr@v1 is now active" in imported.stdout, imported.stdout
    for node in (worker_b, replacement, api):
        wait_until(lambda: model_ref(node) == "cxr@v1", 120, what=f"{node.workdir.name} running cxr@v1")
    (tmp_path / "after").mkdir()
    last_uid, _, last_path = small_studies(tmp_path / "after", 1)[0]
    sent = dcmsend(receiver.dicom_port, last_path)
    assert "with status SUCCESS  : 1" in sent.stdout + sent.stderr
    wait_until(lambda: (study_state(api, last_uid) or {}).get("state") == "done", 180, what="a study scored after the swap")
    assert cluster.rows("SELECT r.model_name, r.model_version FROM results r JOIN studies s ON s.id = r.study_id "
                        "WHERE s.study_uid = :uid", uid=last_uid) == [("cxr", "v1")]
    print(f"multi-process: {STUDIES} studies, killed worker pid {victim} in {[s for _, s, _, _ in kill['jobs']]}, "
          f"jobs by worker pid {dict(owners)}")
