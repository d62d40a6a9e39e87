"""The FHIR API served by uvicorn on loopback, driven by a real FHIR client (fhirpy)."""
from __future__ import annotations

import copy
import datetime as dt
import threading
import time

import httpx
import numpy as np
import pytest
import uvicorn
from fastapi import FastAPI
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.capabilitystatement import CapabilityStatement
from fhir.resources.R4B.operationoutcome import OperationOutcome as OutcomeModel
from fhirpy import SyncFHIRClient
from fhirpy.base.exceptions import AuthorizationError, OperationOutcome, ResourceNotFound
from fhirpy.base.searchset import Raw

from dicom_factory import make_dx
from inference.types import CHESTXRAY14, Finding, ModelInfo
from node.api.auth import create_token
from node.api.fhir_routes import router
from node.config import Settings
from node.context import NodeContext
from node.db import Database
from node.fhir_store import save_resources
from node.outputs.fhir_report import build_report_resources
from node.outputs.study_facts import StudyFacts
from peers import free_port

SYSTEM = "urn:oid:1.2.826.0.1.3680043.10.1249.1"
MODEL = ModelInfo("densenet121-res224-all", "demo-seed0", demo=True)
ISSUED = dt.datetime(2026, 11, 22, 8, 0, tzinfo=dt.timezone.utc)


def _findings(positive: dict[str, float]) -> list[Finding]:
    return [
        Finding(label, positive.get(label, 0.1), 0.5, positive.get(label, 0.1) >= 0.5) for label in CHESTXRAY14
    ]


def _study(patient_id: str, study_date: str, accession: str):
    ds = make_dx(np.full((16, 16), 100, np.uint8), patient_id=patient_id, accession=accession)
    ds.StudyDate = study_date
    return StudyFacts.from_datasets([ds]), ds.SOPInstanceUID


def _build(facts, sop_uid, positive, *, status="preliminary", version=1):
    return build_report_resources(
        facts, {sop_uid: _findings(positive)}, MODEL, study_version=version, status=status,
        issued=ISSUED, patient_system=SYSTEM, calling_ae="MODALITY",
    )


def _report(resources):
    return next(r for r in resources if r["resourceType"] == "DiagnosticReport")


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fhir-api")
    settings = Settings(storage={"data_dir": str(tmp)})
    db = Database(f"sqlite:///{tmp / 'carina.db'}")
    db.create_schema()
    token = create_token(db, "ehr", "integration")

    studies = {
        "a1": (_study("PAT-A", "20261120", "ACC-A1"), {"Effusion": 0.9}, "preliminary"),
        "a2": (_study("PAT-A", "20261121", "ACC-A2"), {"Cardiomegaly": 0.7, "Mass": 0.6}, "final"),
        "b1": (_study("PAT-B", "20261001", "ACC-B1"), {}, "preliminary"),
    }
    built = {}
    for key, ((facts, sop_uid), positive, status) in studies.items():
        built[key] = dict(facts=facts, sop=sop_uid, resources=_build(facts, sop_uid, positive, status=status))
        with db.session() as s:
            save_resources(s, built[key]["resources"], None)

    app = FastAPI()
    app.include_router(router)
    app.state.node = NodeContext(settings, db)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    base = f"http://127.0.0.1:{port}/fhir"
    try:
        yield dict(base=base, db=db, token=token, built=built, client=SyncFHIRClient(base, authorization=f"Bearer {token}"))
    finally:
        server.should_exit = True
        thread.join(10)
        db.dispose()


def _ids(resources) -> set[str]:
    return {r.id if hasattr(r, "id") else r["id"] for r in resources}


def test_capability_statement_is_public_and_valid(node):
    rsp = httpx.get(f"{node['base']}/metadata")
    assert rsp.status_code == 200
    assert rsp.headers["content-type"].startswith("application/fhir+json")
    statement = rsp.json()
    CapabilityStatement.model_validate(statement)
    assert statement["fhirVersion"] == "4.0.1"
    assert statement["implementation"]["url"] == node["base"]
    report = next(r for r in statement["rest"][0]["resource"] if r["type"] == "DiagnosticReport")
    assert {p["name"] for p in report["searchParam"]} == {"patient", "subject", "identifier", "date", "status"}
    assert report["searchInclude"] == ["DiagnosticReport:result"]


def test_search_by_patient_identifier(node):
    reports = node["client"].resources("DiagnosticReport")
    a = reports.search(Raw(**{"patient:identifier": f"{SYSTEM}|PAT-A"})).fetch_all()
    assert _ids(a) == {_report(node["built"][k]["resources"])["id"] for k in ("a1", "a2")}
    assert [r.effectiveDateTime[:10] for r in a] == ["2026-11-21", "2026-11-20"]  # newest first
    b = reports.search(Raw(**{"subject:identifier": "PAT-B"})).fetch_all()  # value only: any system
    assert _ids(b) == {_report(node["built"]["b1"]["resources"])["id"]}
    assert reports.search(Raw(**{"patient:identifier": "urn:other|PAT-A"})).fetch_all() == []
    both = reports.search(Raw(**{"patient:identifier": f"{SYSTEM}|PAT-A,{SYSTEM}|PAT-B"})).fetch_all()
    assert len(both) == 3


def test_include_results_returns_the_observations(node):
    bundle = (
        node["client"].resources("DiagnosticReport")
        .search(Raw(**{"patient:identifier": f"{SYSTEM}|PAT-B"}))
        .include("DiagnosticReport", "result")
        .fetch_raw()
    )
    modes = [entry.search.mode for entry in bundle.entry]
    assert modes.count("match") == 1 and modes.count("include") == 14
    observations = [e.resource for e in bundle.entry if e.search.mode == "include"]
    assert {o.resourceType for o in observations} == {"Observation"}
    assert [o.code.text for o in observations] == list(CHESTXRAY14)
    for entry in bundle.entry:
        assert entry.fullUrl == f"{node['base']}/{entry.resource.resourceType}/{entry.resource.id}"


def test_searchset_bundle_is_valid_r4(node):
    rsp = httpx.get(
        f"{node['base']}/DiagnosticReport",
        params={"_include": "DiagnosticReport:result", "_count": "2"},
        headers={"Authorization": f"Bearer {node['token']}"},
    )
    assert rsp.status_code == 200 and rsp.headers["content-type"].startswith("application/fhir+json")
    bundle = rsp.json()
    Bundle.model_validate(bundle)
    assert bundle["type"] == "searchset" and bundle["total"] == 3
    assert len([e for e in bundle["entry"] if e["search"]["mode"] == "match"]) == 2
    assert len([e for e in bundle["entry"] if e["search"]["mode"] == "include"]) == 28
    links = {link["relation"]: link["url"] for link in bundle["link"]}
    assert links["self"].startswith(f"{node['base']}/DiagnosticReport?") and "_include=" in links["self"]
    assert links["next"].startswith(f"{node['base']}/DiagnosticReport?") and "_offset=2" in links["next"]


def test_paging_follows_next_links(node):
    reports = node["client"].resources("DiagnosticReport")
    first_page = reports.limit(1).fetch_raw()
    assert first_page.total == 3 and len(first_page.entry) == 1
    assert any(link.relation == "next" for link in first_page.link)
    everything = reports.limit(1).fetch_all()  # fhirpy walks the next links
    assert len(everything) == 3
    assert _ids(everything) == {_report(b["resources"])["id"] for b in node["built"].values()}


def test_date_search_with_prefixes(node):
    reports = node["client"].resources("DiagnosticReport")
    newest = _report(node["built"]["a2"]["resources"])["id"]
    older_a = _report(node["built"]["a1"]["resources"])["id"]
    b = _report(node["built"]["b1"]["resources"])["id"]
    assert _ids(reports.search(date__ge="2026-11-21").fetch_all()) == {newest}
    assert _ids(reports.search(date__gt="2026-11-20").fetch_all()) == {newest}
    assert _ids(reports.search(date="2026-11-20").fetch_all()) == {older_a}
    assert _ids(reports.search(date__lt="2026-11").fetch_all()) == {b}
    assert _ids(reports.search(date__le="2026-11-20").fetch_all()) == {older_a, b}
    ranged = reports.search(Raw(date=["ge2026-11-01", "lt2026-11-21"])).fetch_all()
    assert _ids(ranged) == {older_a}
    # At full precision the study instant itself is "ge" but not "gt" (offset '+' must survive the URL).
    instant = _report(node["built"]["a2"]["resources"])["effectiveDateTime"]
    assert _ids(reports.search(date__ge=instant).fetch_all()) == {newest}
    assert _ids(reports.search(date__gt=instant).fetch_all()) == set()
    assert _ids(reports.search(date=instant).fetch_all()) == {newest}


def test_status_and_identifier_search(node):
    reports = node["client"].resources("DiagnosticReport")
    final = _report(node["built"]["a2"]["resources"])
    assert _ids(reports.search(status="final").fetch_all()) == {final["id"]}
    # Comma = OR; "amended" too, since another test amends a report of this module.
    assert len(reports.search(status="preliminary,final,amended").fetch_all()) == 3
    identifier = final["identifier"][0]
    found = reports.search(identifier=f"{identifier['system']}|{identifier['value']}").fetch_all()
    assert _ids(found) == {final["id"]}
    assert reports.search(identifier="urn:dicom:uid|urn:oid:1.2.3").fetch_all() == []


def test_authentication_is_required(node):
    anonymous = SyncFHIRClient(node["base"])
    with pytest.raises(AuthorizationError):
        anonymous.resources("DiagnosticReport").fetch()
    impostor = SyncFHIRClient(node["base"], authorization="Bearer crn_not-a-real-token")
    with pytest.raises(AuthorizationError):
        impostor.resources("DiagnosticReport").fetch()
    report_id = _report(node["built"]["a1"]["resources"])["id"]
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic abc"}):
        rsp = httpx.get(f"{node['base']}/DiagnosticReport/{report_id}", headers=headers)
        assert rsp.status_code == 401
        assert rsp.headers["content-type"].startswith("application/fhir+json")
        assert "Bearer" in rsp.headers["www-authenticate"]
        OutcomeModel.model_validate(rsp.json())
        assert rsp.json()["issue"][0]["code"] == "login"


def test_unknown_parameter_is_rejected_unless_lenient(node):
    with pytest.raises(OperationOutcome):
        node["client"].resources("DiagnosticReport").search(code="36554-4").fetch()
    auth = {"Authorization": f"Bearer {node['token']}"}
    rsp = httpx.get(f"{node['base']}/DiagnosticReport", params={"code": "36554-4"}, headers=auth)
    assert rsp.status_code == 400 and rsp.json()["resourceType"] == "OperationOutcome"
    OutcomeModel.model_validate(rsp.json())
    for bad in ({"date": "yesterday"}, {"_count": "-1"}, {"_include": "DiagnosticReport:subject"}):
        assert httpx.get(f"{node['base']}/DiagnosticReport", params=bad, headers=auth).status_code == 400
    lenient = httpx.get(
        f"{node['base']}/DiagnosticReport", params={"code": "36554-4", "status": "final"},
        headers={**auth, "Prefer": "handling=lenient"},
    )
    assert lenient.status_code == 200 and lenient.json()["total"] == 1
    assert "code=" not in lenient.json()["link"][0]["url"]


def test_read_with_etag_and_errors(node):
    report = _report(node["built"]["b1"]["resources"])
    resource = node["client"].reference("DiagnosticReport", report["id"]).to_resource()
    assert resource.meta.versionId == "1" and resource.status == "preliminary"
    auth = {"Authorization": f"Bearer {node['token']}"}
    rsp = httpx.get(f"{node['base']}/DiagnosticReport/{report['id']}", headers=auth)
    assert rsp.status_code == 200 and rsp.headers["content-type"].startswith("application/fhir+json")
    assert rsp.headers["etag"] == 'W/"1"'
    assert rsp.headers["last-modified"].endswith("GMT")
    assert httpx.get(rsp.request.url, headers={**auth, "If-None-Match": 'W/"1"'}).status_code == 304
    for other in (r for r in node["built"]["b1"]["resources"] if r["resourceType"] != "DiagnosticReport"):
        fetched = node["client"].reference(other["resourceType"], other["id"]).to_resource()
        assert fetched.meta.versionId == "1"
    with pytest.raises(ResourceNotFound):
        node["client"].reference("DiagnosticReport", "no-such-report").to_resource()
    missing_type = httpx.get(f"{node['base']}/Patient/PAT-A", headers=auth)
    assert missing_type.status_code == 404 and missing_type.json()["resourceType"] == "OperationOutcome"
    assert httpx.get(f"{node['base']}/Observation", headers=auth).status_code == 405
    # The API is read-only, and every answer under /fhir is FHIR.
    write = httpx.post(f"{node['base']}/DiagnosticReport", json={"resourceType": "DiagnosticReport"}, headers=auth)
    assert write.status_code == 405 and write.json()["resourceType"] == "OperationOutcome"
    nested = httpx.get(f"{node['base']}/DiagnosticReport/{report['id']}/_history", headers=auth)
    assert nested.status_code == 404 and nested.json()["resourceType"] == "OperationOutcome"


def test_changed_content_bumps_version_and_keeps_history(node):
    built = node["built"]["a1"]
    amended = _build(built["facts"], built["sop"], {"Effusion": 0.95, "Atelectasis": 0.55}, status="amended", version=2)
    with node["db"].session() as s:
        save_resources(s, amended, None)
        save_resources(s, copy.deepcopy(amended), None)  # identical content: no new version
    report_id = _report(amended)["id"]
    client = node["client"]
    current = client.reference("DiagnosticReport", report_id).to_resource()
    assert current.meta.versionId == "2" and current.status == "amended"
    assert "Atelectasis" in current.conclusion
    old = client.execute(f"DiagnosticReport/{report_id}/_history/1", method="get")
    assert old["meta"]["versionId"] == "1" and old["status"] == "preliminary"
    assert "Atelectasis" not in old["conclusion"]
    auth = {"Authorization": f"Bearer {node['token']}"}
    assert httpx.get(f"{node['base']}/DiagnosticReport/{report_id}", headers=auth).headers["etag"] == 'W/"2"'
    assert httpx.get(f"{node['base']}/DiagnosticReport/{report_id}/_history/3", headers=auth).status_code == 404
    device = next(r for r in amended if r["resourceType"] == "Device")
    assert client.reference("Device", device["id"]).to_resource().meta.versionId == "1"  # unchanged model
    # Search sees only current versions: still one report per study.
    a_reports = client.resources("DiagnosticReport").search(Raw(**{"patient:identifier": f"{SYSTEM}|PAT-A"})).fetch_all()
    assert len(a_reports) == 2
    assert {r.status for r in a_reports} == {"amended", "final"}
