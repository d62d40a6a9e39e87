"""schemathesis against the authenticated OpenAPI schema of the real app (uvicorn
on loopback, seeded data, the demo model behind predict): every operation,
fuzzed as an admin (who may call all of them) and as a viewer (refused with
403 where the role lacks the permission), never answers 5xx.

Bounded: `EXAMPLES` per operation and role (the run prints how many calls it made)."""
from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings

import security_rig

EXAMPLES = 20
CALLS: list[tuple[str, str, int]] = []


@pytest.fixture(scope="module")
def fuzz_rig(tmp_path_factory, demo_model):
    from inference.batcher import BatchingEngine
    from inference.engine import InferenceEngine

    engine = BatchingEngine(InferenceEngine(demo_model), max_batch=4, max_wait_ms=2)
    rig, server, thread = security_rig.start(
        tmp_path_factory.mktemp("fuzz"), engine=engine,
        settings={"security": {"login_rate": {"requests": 100000, "per_seconds": 1},
                               "predict_rate": {"requests": 100000, "per_seconds": 1}}})
    try:
        yield rig
    finally:
        security_rig.stop(server, thread, rig)
        engine.close()
        print(f"\nschemathesis: {len(CALLS)} calls over {len({(m, p) for m, p, _ in CALLS})} operations; "
              f"statuses {sorted({c for _, _, c in CALLS})}")


def _schema(rig):
    # The schema itself needs a credential: anonymous callers get 401.
    import httpx

    assert httpx.get(f"{rig.base}/api/openapi.json").status_code == 401
    return schemathesis.openapi.from_url(f"{rig.base}/api/openapi.json",
                                         headers={"Authorization": f"Bearer {rig.tokens['admin']}"})


def _fuzz(rig, role: str) -> None:
    """Every operation of the schema, `EXAMPLES` generated cases each (schemathesis's
    strategies driven by Hypothesis directly: its pytest plugin predates pytest 9)."""
    operations = [result.ok() for result in _schema(rig).get_all_operations()]
    assert len(operations) >= 15, [op.label for op in operations]
    for operation in operations:
        @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                  phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def call(case):
            response = case.call(base_url=rig.base, headers={"Authorization": f"Bearer {rig.tokens[role]}"},
                                 timeout=60)
            CALLS.append((case.method, case.path, response.status_code))
            assert response.status_code < 500, \
                f"{case.method} {case.formatted_path} as {role}: {response.status_code} {response.text[:300]}"

        call()


def test_no_server_errors_as_admin(fuzz_rig):
    _fuzz(fuzz_rig, "admin")


def test_no_server_errors_as_viewer(fuzz_rig):
    _fuzz(fuzz_rig, "viewer")
