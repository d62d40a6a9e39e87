"""Rate limits on login and predict: 429 with Retry-After once a key reaches its
limit, per client address and per user name for login, per caller for predict;
the refused logins are audited. Limits come from `security.*_rate`."""
from __future__ import annotations

import pytest
from sqlalchemy import select

import security_rig
from node.api.ratelimit import RateLimiter
from node.db import AuditRecord


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    rig, server, thread = security_rig.start(
        tmp_path_factory.mktemp("rate"),
        settings={"security": {"login_rate": {"requests": 3, "per_seconds": 3600},
                               "predict_rate": {"requests": 2, "per_seconds": 3600}}})
    try:
        yield rig
    finally:
        security_rig.stop(server, thread, rig)


def test_login_is_limited_per_address_with_retry_after(rig):
    with rig.client() as client:
        answers = [client.post("/api/v1/session", json={"username": "user-viewer", "password": f"guess {n}"})
                   for n in range(5)]
    assert [a.status_code for a in answers] == [401, 401, 401, 429, 429]
    retry = int(answers[3].headers["retry-after"])
    assert 3500 < retry <= 3600
    # Even the right password waits now: the limit counts attempts, not failures.
    with rig.client() as client:
        right = client.post("/api/v1/session", json={"username": "user-admin", "password": security_rig.PASSWORD})
    assert right.status_code == 429
    with rig.ctx.db.session() as s:
        limited = s.scalars(select(AuditRecord).where(AuditRecord.event_id == "110114")).all()
    assert sum("rate limited" in r.xml for r in limited) == 3


def test_predict_is_limited_per_caller(rig):
    # No model here (503) but the limit applies before the model is asked.
    for role in ("integration", "radiologist"):
        with rig.client(headers={"Authorization": f"Bearer {rig.tokens[role]}"}) as client:
            codes = [client.post("/api/v1/predict", files={"image": ("a.png", b"x", "image/png")}).status_code
                     for _ in range(3)]
            assert codes[:2] != [429, 429] and codes[2] == 429, (role, codes)


def test_sliding_window():
    t = [0.0]
    limiter = RateLimiter(2, 10, clock=lambda: t[0])
    assert limiter.hit("a") is None and limiter.hit("a") is None
    assert limiter.hit("a") == 10
    t[0] = 4.5
    assert limiter.hit("a") == 6 and limiter.hit("b") is None  # keys are independent
    t[0] = 10.0
    assert limiter.hit("a") is None and limiter.hit("a") is None  # the first two hits left the window
    assert limiter.hit("a", "c") == 10  # one key over its limit refuses the whole hit...
    assert limiter.hit("c") is None  # ...and counts nothing against the others
