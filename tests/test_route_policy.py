"""Every route of the real app (enumerated from FastAPI itself) against every
role, through a token and through a browser session, plus no credentials, an
expired token, a revoked token and an unknown one: 401, 403 or the route's
answer, exactly as its declared policy says. Also: the security headers on
every answer, CSRF on every state-changing session request, and the audit
records of refusals.

A route added without a policy stops `create_app` (node/api/policy.py
`check_policies`), and a route added without an example here fails
`test_every_route_has_an_example`."""
from __future__ import annotations

from contextlib import closing

import dicom_factory as f
import pytest
from sqlalchemy import select

import security_rig
from node.api.policy import GRANTS, Role, policy_of, routes
from node.db import AuditRecord
from security_rig import PASSWORD, ROLES, USER_ROLES

PNG = f.NIH_PNGS[0].read_bytes()


@pytest.fixture(scope="module")
def rig(tmp_path_factory, demo_model):
    from inference.batcher import BatchingEngine
    from inference.engine import InferenceEngine

    engine = BatchingEngine(InferenceEngine(demo_model), max_batch=4, max_wait_ms=2)
    rig, server, thread = security_rig.start(
        tmp_path_factory.mktemp("route-policy"), engine=engine,
        settings={"security": {"login_rate": {"requests": 1000, "per_seconds": 60}}})
    try:
        yield rig
    finally:
        security_rig.stop(server, thread, rig)
        engine.close()


def examples(rig) -> dict[tuple[str, str], tuple[callable, int]]:
    """(method, route path) -> (a request for it, the status an allowed caller gets)."""
    s = rig.seeded
    report = f"/fhir/DiagnosticReport/{s.report_id}"
    study = f"/dicomweb/studies/{s.study_uid}"
    series = f"{study}/series/{s.output_series_uid}"
    instance = f"{series}/instances/{s.output_sop_uid}"
    read = f"/api/v1/read/{s.study_row_id}"
    return {
        ("POST", "/api/v1/session"): (lambda: dict(json={"username": "user-viewer", "password": PASSWORD}), 200),
        ("GET", "/api/v1/session"): (lambda: {}, 200),
        ("DELETE", "/api/v1/session"): (lambda: {}, 204),
        ("GET", "/api/v1/studies"): (lambda: {}, 200),
        ("GET", "/api/v1/studies/{study_uid}"): (lambda: dict(url=f"/api/v1/studies/{s.study_uid}"), 200),
        ("GET", "/api/v1/audit"): (lambda: dict(params={"patient": s.patient_id}), 200),
        ("GET", "/api/v1/audit/export.csv"): (lambda: dict(params={"since": "2000-01-01"}), 200),
        ("GET", "/api/v1/audit/verify"): (lambda: {}, 200),
        ("GET", "/api/v1/jobs"): (lambda: {}, 200),
        ("GET", "/api/v1/jobs/{job_id}"): (lambda: dict(url=f"/api/v1/jobs/{rig.dead_job()}"), 200),
        ("POST", "/api/v1/jobs/{job_id}/retry"): (lambda: dict(url=f"/api/v1/jobs/{rig.dead_job()}/retry"), 200),
        ("GET", "/fhir/metadata"): (lambda: {}, 200),
        ("GET", "/fhir/DiagnosticReport"): (lambda: dict(params={"patient:identifier": s.patient_id}), 200),
        ("GET", "/fhir/{resource_type}"): (lambda: dict(url="/fhir/Observation"), 405),  # search not supported there
        ("GET", "/fhir/{resource_type}/{resource_id}"): (lambda: dict(url=report), 200),
        ("GET", "/fhir/{resource_type}/{resource_id}/_history"): (lambda: dict(url=f"{report}/_history"), 200),
        ("GET", "/fhir/{resource_type}/{resource_id}/_history/{version_id}"):
            (lambda: dict(url=f"{report}/_history/1"), 200),
        ("GET", "/fhir/{path:path}"): (lambda: dict(url="/fhir/a/b/c/d/e"), 404),
        ("POST", "/fhir/{path:path}"): (lambda: dict(url="/fhir/Patient"), 405),  # read-only
        ("PUT", "/fhir/{path:path}"): (lambda: dict(url="/fhir/Patient/x"), 405),
        ("PATCH", "/fhir/{path:path}"): (lambda: dict(url="/fhir/Patient/x"), 405),
        ("DELETE", "/fhir/{path:path}"): (lambda: dict(url="/fhir/Patient/x"), 405),
        ("POST", "/api/v1/predict"): (lambda: dict(files={"image": ("a.png", PNG, "image/png")}), 200),
        ("GET", "/ui"): (lambda: dict(url="/ui/common.js"), 200),
        ("GET", "/api/openapi.json"): (lambda: {}, 200),
        ("GET", "/healthz"): (lambda: {}, 200),
        ("GET", "/"): (lambda: {}, 200),
        ("GET", "/login"): (lambda: {}, 200),
        ("GET", "/audit"): (lambda: {}, 200),
        ("GET", "/readyz"): (lambda: {}, 503),  # the rig runs no SCP and loads no model: public, and not ready
        ("GET", "/metrics"): (lambda: {}, 200),
        ("GET", "/api/v1/admin/status"): (lambda: {}, 200),
        ("GET", "/api/v1/admin/dead-letters"): (lambda: {}, 200),
        ("POST", "/api/v1/admin/dead-letters/retry"): (lambda: {}, 200),
        ("GET", "/api/v1/admin/events"): (lambda: {}, 200),
        ("GET", "/api/v1/admin/failed-studies"): (lambda: {}, 200),
        ("GET", "/api/v1/shadow"): (lambda: {}, 200),
        ("GET", "/api/v1/shadow.csv"): (lambda: {}, 200),
        ("GET", "/api/v1/studies/{study_uid}/report.pdf"):
            (lambda: dict(url=f"/api/v1/studies/{s.study_uid}/report.pdf"), 200),
        # STOW-RS: a body that is not multipart/related is refused with 415 by every permitted caller.
        ("POST", "/dicomweb/studies"): (lambda: dict(content=b"x"), 415),
        ("POST", "/dicomweb/studies/{study_uid}"): (lambda: dict(url=f"/dicomweb/studies/{s.study_uid}", content=b"x"),
                                                     415),
        ("GET", "/dicomweb/studies"): (lambda: dict(params={"PatientID": s.patient_id}), 200),
        ("GET", "/dicomweb/series"): (lambda: {}, 200),
        ("GET", "/dicomweb/instances"): (lambda: {}, 200),
        ("GET", "/dicomweb/studies/{study_uid}/series"): (lambda: dict(url=f"{study}/series"), 200),
        ("GET", "/dicomweb/studies/{study_uid}/instances"): (lambda: dict(url=f"{study}/instances"), 200),
        ("GET", "/dicomweb/studies/{study_uid}/series/{series_uid}/instances"):
            (lambda: dict(url=f"{series}/instances"), 200),
        ("GET", "/dicomweb/studies/{study_uid}"): (lambda: dict(url=study), 200),
        ("GET", "/dicomweb/studies/{study_uid}/series/{series_uid}"): (lambda: dict(url=series), 200),
        ("GET", "/dicomweb/studies/{study_uid}/series/{series_uid}/instances/{sop_uid}"):
            (lambda: dict(url=instance), 200),
        ("GET", "/dicomweb/studies/{study_uid}/metadata"): (lambda: dict(url=f"{study}/metadata"), 200),
        ("GET", "/dicomweb/studies/{study_uid}/series/{series_uid}/metadata"):
            (lambda: dict(url=f"{series}/metadata"), 200),
        ("GET", "/dicomweb/studies/{study_uid}/series/{series_uid}/instances/{sop_uid}/metadata"):
            (lambda: dict(url=f"{instance}/metadata"), 200),
        ("GET", "/dicomweb/studies/{study_uid}/series/{series_uid}/instances/{sop_uid}/bulkdata/{tag}"):
            (lambda: dict(url=f"{instance}/bulkdata/00420011"), 200),
        # The reading app: its pages, the data they read, feedback, upload, the admin pages' API.
        ("GET", "/worklist/rows"): (lambda: {}, 200),
        ("GET", "/studies/{study_id}"): (lambda: dict(url=f"/studies/{s.study_row_id}"), 200),
        ("GET", "/upload"): (lambda: {}, 200),
        ("GET", "/admin/models"): (lambda: {}, 200),
        ("GET", "/admin/system"): (lambda: {}, 200),
        ("GET", "/api/v1/read/{study_id}/images/{sop_uid}.png"):
            (lambda: dict(url=f"{read}/images/{s.sop_uid}.png", params={"version": 1}), 200),
        ("GET", "/api/v1/read/{study_id}/heatmaps/{sop_uid}/{label}.png"):
            (lambda: dict(url=f"{read}/heatmaps/{s.sop_uid}/Effusion.png", params={"version": 1}), 200),
        ("GET", "/api/v1/read/{study_id}/outputs/{output_id}"): (lambda: dict(url=f"{read}/outputs/{s.output_id}"), 200),
        ("GET", "/api/v1/read/{study_id}/fhir.json"): (lambda: dict(url=f"{read}/fhir.json"), 200),
        ("GET", "/api/v1/read/{study_id}/feedback"): (lambda: dict(url=f"{read}/feedback"), 200),
        ("PUT", "/api/v1/read/{study_id}/feedback"): (lambda: dict(url=f"{read}/feedback", json={
            "version": 1, "sop_instance_uid": s.sop_uid, "label": "Effusion", "verdict": "agree"}), 200),
        ("PATCH", "/api/v1/feedback/{feedback_id}"):
            (lambda: dict(url="/api/v1/feedback/999999", json={"verdict": "agree"}), 404),  # no such row
        ("GET", "/api/v1/feedback/export.csv"): (lambda: {}, 200),
        ("POST", "/api/v1/upload"): (lambda: dict(files={"file": ("a.png", PNG, "image/png")}), 200),
        ("GET", "/api/v1/admin/models"): (lambda: {}, 200),
        ("POST", "/api/v1/admin/models/activate"): (lambda: dict(json={"ref": "none@0"}), 404),  # no such model
        ("POST", "/api/v1/admin/models/rollback"): (lambda: dict(json={}), 409),  # nothing activated before
        ("GET", "/api/v1/admin/destinations/health"): (lambda: {}, 200),  # none configured here
    }


def route_keys(app) -> dict[tuple[str, str], object]:
    keys = {}
    for route in routes(app):
        methods = (getattr(route, "methods", None) or {"GET"}) - {"HEAD"}
        for method in methods:
            keys[(method, route.path)] = route
    return keys


def test_every_route_has_a_policy_and_an_example(rig):
    keys = route_keys(rig.app)
    for route in keys.values():
        policy_of(rig.app, route)  # raises for a route without exactly one policy
    assert set(keys) == set(examples(rig)), "a route was added or removed: give it an example here"


def test_a_route_without_a_policy_cannot_be_served(rig):
    from fastapi import APIRouter, FastAPI

    from node.api.policy import check_policies

    app = FastAPI()
    router = APIRouter()

    @router.get("/forgotten")
    def forgotten():
        return {}

    app.include_router(router)
    with pytest.raises(RuntimeError, match="GET /forgotten: 0 policies"):
        check_policies(app)


PUBLIC = "public"


def _principals(rig):
    """name -> (how to authenticate a client, role or None)."""
    out = {"none": (lambda c: None, None), "unknown token": (_bearer("crn_not-a-token"), None)}
    out["expired token"] = (_bearer(rig.tokens["expired"]), None)
    out["revoked token"] = (_bearer(rig.tokens["revoked"]), None)
    for role in ROLES:
        out[f"{role} token"] = (_bearer(rig.tokens[role]), role)
    return out


def _bearer(token):
    def apply(client):
        client.headers["Authorization"] = f"Bearer {token}"
    return apply


def _expected(policy, role, success: int) -> int:
    if policy.permission is None:
        return success
    if role is None:
        return 401
    return success if policy.permission in GRANTS[Role(role)] else 403


def _check_headers(rsp, path: str):
    h = rsp.headers
    assert "'unsafe-inline'" not in h["content-security-policy"]
    assert "frame-ancestors 'none'" in h["content-security-policy"]
    assert h["x-content-type-options"] == "nosniff"
    assert h["referrer-policy"] == "no-referrer"
    if path.startswith("/ui/"):
        assert h["cache-control"] == "no-cache"
    elif rsp.status_code == 200 and path.startswith("/api/v1/read/") and any(
            part in path for part in ("/images/", "/heatmaps/", "/outputs/")):
        assert h["cache-control"] == "private, no-store"  # a patient's pictures and files
    else:
        assert h["cache-control"] == "no-store"
    assert "strict-transport-security" not in h  # plain HTTP here; test_http_tls checks HSTS


def test_matrix_tokens(rig):
    """Every route x (no credentials, unknown, expired, revoked token, each role's token)."""
    table = examples(rig)
    keys = route_keys(rig.app)
    seen = []
    for (method, path), route in sorted(keys.items()):
        policy = policy_of(rig.app, route)
        make, success = table[(method, path)]
        for name, (authenticate, role) in _principals(rig).items():
            request = make()
            url = request.pop("url", path)
            with rig.client() as client:
                authenticate(client)
                rsp = client.request(method, url, **request)
            want = _expected(policy, role, success)
            assert rsp.status_code == want, f"{method} {url} as {name}: {rsp.status_code} != {want}: {rsp.text[:300]}"
            _check_headers(rsp, url)
            seen.append(rsp.status_code)
    assert {401, 403, 200} <= set(seen)


def test_matrix_sessions_with_csrf(rig):
    """Every route x each user role through a browser session: the same answers as a
    token, and every state-changing request needs the session's CSRF token."""
    table = examples(rig)
    for (method, path), route in sorted(route_keys(rig.app).items()):
        policy = policy_of(rig.app, route)
        make, success = table[(method, path)]
        for role in USER_ROLES:
            client, csrf = rig.login(f"user-{role}")
            with closing(client):
                want = _expected(policy, role, success)
                if method not in ("GET", "HEAD") and policy.permission is not None and want == success:
                    request = make()
                    url = request.pop("url", path)
                    refused = client.request(method, url, **request)
                    assert refused.status_code == 403 and "CSRF" in refused.text, (method, url, role, refused.text)
                    request = make()
                    url = request.pop("url", path)
                    wrong = client.request(method, url, headers={"X-CSRF-Token": "forged"}, **request)
                    assert wrong.status_code == 403, (method, url, role)
                request = make()
                url = request.pop("url", path)
                rsp = client.request(method, url, headers={"X-CSRF-Token": csrf}, **request)
                assert rsp.status_code == want, f"{method} {url} as {role} session: {rsp.status_code} != {want}"
                _check_headers(rsp, url)


def test_refusals_are_audited(rig):
    with rig.client(headers={"Authorization": f"Bearer {rig.tokens['viewer']}"}) as client:
        assert client.get("/api/v1/jobs").status_code == 403
    with rig.client(headers={"Authorization": f"Bearer {rig.tokens['revoked']}"}) as client:
        assert client.get("/api/v1/studies").status_code == 401
    with rig.ctx.db.session() as s:
        recent = s.scalars(select(AuditRecord).order_by(AuditRecord.seq.desc()).limit(2)).all()
    denied, refused = recent[1], recent[0]
    assert (denied.event_id, denied.event_type, denied.outcome, denied.user_id) == ("110113", "110132", 4, "token:tok-viewer")
    assert "GET /api/v1/jobs" in denied.xml and "lacks admin" in denied.xml
    assert (refused.event_id, refused.outcome, refused.user_id) == ("110114", 4, "token:tok-revoked")
    assert "token revoked" in refused.xml


def test_session_cookie_flags_and_logout(rig):
    client, csrf = rig.login("user-viewer")
    with closing(client):
        cookie = next(c for c in client.cookies.jar if c.name == "carina_session")
        raw = client.post("/api/v1/session", json={"username": "user-viewer", "password": PASSWORD})
        set_cookie = raw.headers["set-cookie"].lower()
        assert "httponly" in set_cookie and "samesite=strict" in set_cookie and "secure" not in set_cookie
        assert cookie.value and client.get("/api/v1/studies").status_code == 200
        assert client.delete("/api/v1/session", headers={"X-CSRF-Token": raw.json()["csrf_token"]}).status_code == 204
    # The first session still works; the one logged out does not.
    with rig.client(cookies={"carina_session": cookie.value}) as first:
        assert first.get("/api/v1/studies").status_code == 200


def test_login_refuses_wrong_passwords_foreign_origins_and_forms(rig):
    with rig.client() as client:
        assert client.post("/api/v1/session", json={"username": "user-viewer", "password": "wrong"}).status_code == 401
        assert client.post("/api/v1/session", json={"username": "nobody", "password": "wrong"}).status_code == 401
        foreign = client.post("/api/v1/session", json={"username": "user-viewer", "password": PASSWORD},
                              headers={"Origin": "https://evil.example"})
        assert foreign.status_code == 403
        # A cross-site HTML form can only send form encodings, which the login refuses.
        form = client.post("/api/v1/session", data={"username": "user-viewer", "password": PASSWORD})
        assert form.status_code == 422
        assert "set-cookie" not in form.headers and "set-cookie" not in foreign.headers
    with rig.ctx.db.session() as s:
        failures = s.scalars(select(AuditRecord).where(AuditRecord.event_id == "110114", AuditRecord.outcome == 4,
                                                       AuditRecord.event_type == "110122")).all()
    reasons = " ".join(r.xml for r in failures)
    assert "wrong password" in reasons and "unknown user" in reasons and "cross-origin login refused" in reasons
