"""`carina serve --role`: what each role's HTTP face serves and when it is ready (node/roles.py,
node/api/app.py create_probe_app, node/api/ops.py). The roles as real processes are
tests/test_scale_multiprocess.py; this is the per-role HTTP contract the deployment files rely on."""
from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from node.api.app import create_app, create_probe_app
from node.api.policy import routes
from node.config import Settings
from node.context import NodeContext
from node.db import Job, Study, now
from node.roles import ROLE_PARTS, ROLES, runs
from node.states import JobState

# On SQLite and on PostgreSQL (tests/conftest.py both_backends).
pytestmark = pytest.mark.usefixtures("both_backends")

PROBES = {"/healthz", "/readyz", "/metrics"}


def context(tmp_path, role: str) -> NodeContext:
    settings = Settings(storage={"data_dir": str(tmp_path / "var"), "min_free_mb": 0})
    from node.db import Database

    db = Database(settings.database_url)
    db.create_schema()
    (tmp_path / "var").mkdir(exist_ok=True)
    ctx = NodeContext(settings=settings, db=db, role=role, ready={part: False for part in ROLE_PARTS[role]})
    ctx.metrics.bind(ctx)
    ctx.ready["db"] = True
    return ctx


def paths(app) -> set[str]:
    return {route.path for route in routes(app)}


def test_receiver_and_worker_serve_only_the_probes_and_metrics(tmp_path):
    ctx = context(tmp_path, "worker")
    try:
        app = create_probe_app(ctx)
        assert paths(app) == PROBES
        client = TestClient(app)
        assert client.get("/api/v1/studies").status_code == 404
        assert client.get("/ui/").status_code == 404
        body = client.get("/healthz").json()
        assert body == {"status": "starting", "role": "worker", "parts": {"db": True, "model": False}}
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["checks"]["model"] is False
        assert "scp" not in ready.json()["checks"]  # a worker has no SCP to wait for
        assert "carina_queue_depth" in client.get("/metrics").text
        # The api role serves everything the single process does.
        assert PROBES | {"/api/v1/studies", "/fhir/metadata"} <= paths(create_app(ctx))
    finally:
        ctx.db.dispose()


def test_the_api_role_is_ready_without_model_or_scp_and_dead_letters_do_not_unready_it(tmp_path):
    ctx = context(tmp_path, "api")
    try:
        client = TestClient(create_app(ctx))
        ready = client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["status"] == "ready", ready.json()
        assert set(ready.json()["checks"]) == {"database", "storage", "dead_letters"}
        with ctx.db.session() as s:
            study = Study(calling_ae="MOD", study_uid="1.2.3", version=1)
            s.add(study)
            s.flush()
            s.add(Job(study_id=study.id, stage="deliver", destination="pacs", study_version=1, state=JobState.DEAD,
                      finished_at=now() - 60, last_error="DIMSE 0xA700"))
        degraded = client.get("/readyz")
        # The site has a dead letter; this replica still takes traffic (the single process would answer 503).
        assert degraded.status_code == 200 and degraded.json()["status"] == "degraded", degraded.json()
        assert degraded.json()["dead_letters"]["count"] == 1
    finally:
        ctx.db.dispose()


def test_every_part_runs_in_exactly_the_documented_roles():
    table = {part: {role for role in ROLES if runs(role, part)} for part in
             ("scp", "hl7_listener", "schedulers", "sweep", "syslog", "workers", "model", "http_api")}
    assert table == {
        "scp": {"all", "receiver"}, "hl7_listener": {"all", "receiver"}, "schedulers": {"all", "receiver"},
        "sweep": {"all", "receiver"}, "syslog": {"all", "receiver"}, "workers": {"all", "worker"},
        "model": {"all", "worker", "api"}, "http_api": {"all", "api"},
    }
