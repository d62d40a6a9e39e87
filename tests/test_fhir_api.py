"""The FHIR API served by uvicorn on loopback, driven by a real FHIR client (fhirpy)."""
from __future__ import annotations

import copy
import json
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
from node.api import fhir_capability
from node.api.fhir_routes import router
from node.config import Settings
from node.context import NodeContext
from node.db import Database
from node.fhir_store import save_resources
from node.outputs.fhir_report import build_report_resources
from node.report import patient_id
from node.study_facts import StudyFacts
from scored_factory import scored_from_facts
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
    # Carina issues preliminary and amended reports; "final" stands for a report
    # a radiologist signed elsewhere and that the store serves all the same.
    study = scored_from_facts(facts, {sop_uid: _findings(positive)}, MODEL, version=version,
                              status=None if status == "final" else status, issued=ISSUED)
    resources = build_report_resources(study, patient_system=SYSTEM)
    for resource in resources:
        if resource["resourceType"] in ("DiagnosticReport", "Observation"):
            resource["status"] = status
    return resources


def _report(resources):
    return next(r for r in resources if r["resourceType"] == "DiagnosticReport")


@pytest.fixture(scope="module")
def node(tmp_path_factory, module_backend):
    """The FHIR API over SQLite, then over PostgreSQL (tests/conftest.py module_backend)."""
    tmp = tmp_path_factory.mktemp("fhir-api")
    settings = Settings(storage={"data_dir": str(tmp)})
    db = Database(module_backend or f"sqlite:///{tmp / 'carina.db'}")
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
    assert {p["name"] for p in report["searchParam"]} == {
        "patient", "subject", "identifier", "based-on", "category", "code", "date", "issued", "status", "_lastUpdated",
    }
    assert report["searchInclude"] == ["DiagnosticReport:result", "DiagnosticReport:subject"]
    assert report["searchRevInclude"] == ["Provenance:target"]


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
    with pytest.raises(OperationOutcome) as err:
        node["client"].resources("DiagnosticReport").search(performer="Practitioner/1").fetch()
    assert "performer" in str(err.value)
    auth = {"Authorization": f"Bearer {node['token']}"}
    rsp = httpx.get(f"{node['base']}/DiagnosticReport", params={"performer": "Practitioner/1"}, headers=auth)
    assert rsp.status_code == 400 and rsp.json()["resourceType"] == "OperationOutcome"
    OutcomeModel.model_validate(rsp.json())
    for bad in ({"date": "yesterday"}, {"_count": "-1"}, {"_include": "DiagnosticReport:performer"},
                {"_revinclude": "AuditEvent:entity"}, {"_summary": "true"}, {"_sort": "date"},
                {"code:text": "chest"}, {"based-on": "ServiceRequest/1"}, {"_elements": "nonsense"}):
        rsp = httpx.get(f"{node['base']}/DiagnosticReport", params=bad, headers=auth)
        assert rsp.status_code == 400, bad
        assert rsp.json()["resourceType"] == "OperationOutcome"
    # Prefer: handling=lenient ignores unknown parameters (and leaves them out of the self link) ...
    lenient = httpx.get(
        f"{node['base']}/DiagnosticReport",
        params={"performer": "Practitioner/1", "_include": "DiagnosticReport:performer", "status": "final"},
        headers={**auth, "Prefer": "handling=lenient"},
    )
    assert lenient.status_code == 200 and lenient.json()["total"] == 1
    assert "performer" not in lenient.json()["link"][0]["url"] and "status=final" in lenient.json()["link"][0]["url"]
    # ... but a known parameter with an invalid value is still an error.
    still_bad = httpx.get(f"{node['base']}/DiagnosticReport", params={"date": "yesterday"},
                          headers={**auth, "Prefer": "handling=lenient"})
    assert still_bad.status_code == 400


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
    missing_type = httpx.get(f"{node['base']}/Encounter/1", headers=auth)
    assert missing_type.status_code == 404 and missing_type.json()["resourceType"] == "OperationOutcome"
    assert httpx.get(f"{node['base']}/Observation", headers=auth).status_code == 405
    # The API is read-only, and every answer under /fhir is FHIR.
    write = httpx.post(f"{node['base']}/DiagnosticReport", json={"resourceType": "DiagnosticReport"}, headers=auth)
    assert write.status_code == 405 and write.json()["resourceType"] == "OperationOutcome"
    nested = httpx.get(f"{node['base']}/DiagnosticReport/{report['id']}/_history/1/extra", headers=auth)
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


# --- every documented search, through fhirpy, against the served CapabilityStatement ----------

def _report_id(node, key):
    return _report(node["built"][key]["resources"])["id"]


def _search_examples(node):
    """For each documented DiagnosticReport search parameter: (query, expected report keys) pairs.

    A parameter in the CapabilityStatement without examples here fails the test, so
    nothing can be advertised without being exercised."""
    pat_a = patient_id(SYSTEM, "PAT-A")
    a2 = _report(node["built"]["a2"]["resources"])
    before = dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=1)
    return {
        "patient": [
            ({"patient": f"Patient/{pat_a}"}, {"a1", "a2"}),
            ({"patient": pat_a}, {"a1", "a2"}),
            ({"patient:identifier": f"{SYSTEM}|PAT-B"}, {"b1"}),
            ({"patient": "Patient/nobody"}, set()),
        ],
        "subject": [
            ({"subject": f"Patient/{pat_a}"}, {"a1", "a2"}),
            ({"subject:identifier": "PAT-B"}, {"b1"}),
        ],
        "identifier": [
            ({"identifier": f"{a2['identifier'][0]['system']}|{a2['identifier'][0]['value']}"}, {"a2"}),
            ({"identifier": f"urn:ietf:rfc:3986|urn:uuid:{a2['id']}"}, {"a2"}),
        ],
        "based-on": [
            ({"based-on:identifier": "ACC-A1"}, {"a1"}),
            ({"based-on:identifier": "ACC-A1,ACC-B1"}, {"a1", "b1"}),
            ({"based-on:identifier": "NO-SUCH-ACC"}, set()),
        ],
        "category": [
            ({"category": "http://loinc.org|LP29684-5"}, {"a1", "a2", "b1"}),
            ({"category": "http://terminology.hl7.org/CodeSystem/v2-0074|RAD"}, {"a1", "a2", "b1"}),
            ({"category": "http://loinc.org|LP00000-0"}, set()),
        ],
        "code": [
            ({"code": "http://loinc.org|36554-4"}, {"a1", "a2", "b1"}),
            ({"code": "18748-4"}, {"a1", "a2", "b1"}),
            ({"code": "http://loinc.org|36643-5"}, set()),
        ],
        "date": [
            ({"date": "2026-11-20"}, {"a1"}),
            ({"date": "ge2026-11-21"}, {"a2"}),
            ({"date": ["ge2026-10-01", "lt2026-11-20"]}, {"b1"}),
        ],
        "issued": [
            ({"issued": "2026-11-22"}, {"a1", "a2", "b1"}),
            ({"issued": "gt2026-11-22T08:00:00Z"}, set()),
            ({"issued": "le2026-11-22T08:00:00Z"}, {"a1", "a2", "b1"}),
        ],
        "status": [
            ({"status": "final"}, {"a2"}),
        ],
        "_lastUpdated": [
            ({"_lastUpdated": f"gt{before.isoformat(timespec='seconds')}"}, {"a1", "a2", "b1"}),
            ({"_lastUpdated": f"lt{before.isoformat(timespec='seconds')}"}, set()),
        ],
    }


def test_every_documented_search_parameter_works(node):
    client = node["client"]
    statement = client.execute("metadata", method="get")
    report = next(r for r in statement["rest"][0]["resource"] if r["type"] == "DiagnosticReport")
    examples = _search_examples(node)
    documented = [p["name"] for p in report["searchParam"]]
    assert set(documented) == set(examples), "every documented parameter needs examples here, and no more"
    ids = {key: _report_id(node, key) for key in node["built"]}
    for name in documented:
        for query, expected in examples[name]:
            found = client.resources("DiagnosticReport").search(Raw(**query)).fetch_all()
            assert _ids(found) == {ids[k] for k in expected}, (name, query)


def test_include_subject_and_revinclude_provenance(node):
    bundle = (
        node["client"].resources("DiagnosticReport")
        .search(Raw(**{"based-on:identifier": "ACC-B1"}))
        .include("DiagnosticReport", "subject")
        .revinclude("Provenance", "target")
        .fetch_raw()
    )
    by_type = {}
    for entry in bundle.entry:
        by_type.setdefault(entry.resource.resourceType, []).append(entry)
    assert [e.search.mode for e in by_type["DiagnosticReport"]] == ["match"]
    patient = by_type["Patient"][0]
    assert patient.search.mode == "include" and patient.resource.identifier[0].value == "PAT-B"
    assert by_type["DiagnosticReport"][0].resource.subject.reference == f"Patient/{patient.resource.id}"
    provenance = by_type["Provenance"][0]
    assert provenance.search.mode == "include"
    assert provenance.resource.target[0].reference == f"DiagnosticReport/{_report_id(node, 'b1')}"
    assert provenance.resource.agent[0].who.reference.startswith("Device/")
    # Patient and Provenance are readable on their own too.
    assert node["client"].reference("Patient", patient.resource.id).to_resource().identifier[0].value == "PAT-B"
    assert node["client"].reference("Provenance", provenance.resource.id).to_resource().id == provenance.resource.id


def test_summary_count_and_elements(node):
    auth = {"Authorization": f"Bearer {node['token']}"}
    counted = httpx.get(f"{node['base']}/DiagnosticReport", params={"_summary": "count", "subject:identifier": "PAT-A"},
                        headers=auth).json()
    Bundle.model_validate(counted)
    assert counted["total"] == 2 and "entry" not in counted
    only_total = node["client"].resources("DiagnosticReport").search(Raw(_summary="count")).fetch_raw()
    assert only_total.total == 3 and "entry" not in only_total
    subset = httpx.get(f"{node['base']}/DiagnosticReport",
                       params={"_elements": "identifier,effective", "_include": "DiagnosticReport:result",
                               "based-on:identifier": "ACC-A1"}, headers=auth).json()
    Bundle.model_validate(subset)
    match = next(e["resource"] for e in subset["entry"] if e["search"]["mode"] == "match")
    assert set(match) == {"resourceType", "id", "meta", "status", "code", "identifier", "effectiveDateTime"}
    assert {"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "SUBSETTED",
            "display": "subsetted"} in match["meta"]["tag"]
    included = [e["resource"] for e in subset["entry"] if e["search"]["mode"] == "include"]
    assert len(included) == 14 and all("valueQuantity" in o for o in included)  # includes stay whole


def test_history_of_a_report(node):
    report_id = _report_id(node, "b1")
    with node["db"].session() as s:  # a second version of b1: a re-run found an effusion
        built = node["built"]["b1"]
        save_resources(s, _build(built["facts"], built["sop"], {"Effusion": 0.8}, status="amended", version=2), None)
    history = node["client"].execute(f"DiagnosticReport/{report_id}/_history", method="get")
    Bundle.model_validate(history)
    assert history["type"] == "history" and history["total"] == 2
    assert [e["resource"]["meta"]["versionId"] for e in history["entry"]] == ["2", "1"]  # newest first
    assert [e["resource"]["status"] for e in history["entry"]] == ["amended", "preliminary"]
    assert [e["request"]["method"] for e in history["entry"]] == ["PUT", "POST"]
    assert history["entry"][0]["response"]["etag"] == 'W/"2"'
    auth = {"Authorization": f"Bearer {node['token']}"}
    assert httpx.get(f"{node['base']}/DiagnosticReport/nope/_history", headers=auth).status_code == 404


def test_capability_statement_matches_routes_and_file():
    """The statement is generated from the tables the server dispatches on; check the
    generated statement, the file on disk and the router agree."""
    generated = fhir_capability.capability_statement()
    on_disk = json.loads(fhir_capability.CAPABILITY_PATH.read_text())
    assert on_disk == generated, "fhir/CapabilityStatement.json is stale: run python -m node.api.fhir_capability"
    routes = {(method, route.path) for route in router.routes for method in route.methods}
    interaction_routes = {
        "read": ("GET", "/fhir/{resource_type}/{resource_id}"),
        "vread": ("GET", "/fhir/{resource_type}/{resource_id}/_history/{version_id}"),
        "history-instance": ("GET", "/fhir/{resource_type}/{resource_id}/_history"),
        "search-type": ("GET", "/fhir/DiagnosticReport"),
    }
    resources = generated["rest"][0]["resource"]
    assert [r["type"] for r in resources] == list(fhir_capability.READABLE_TYPES)
    for resource in resources:
        for interaction in resource["interaction"]:
            assert interaction_routes[interaction["code"]] in routes, (resource["type"], interaction)
        if any(i["code"] == "search-type" for i in resource["interaction"]):
            assert resource["type"] in fhir_capability.SEARCHABLE_TYPES
            names = [p["name"] for p in resource["searchParam"]]
            assert names == [p.name for p in fhir_capability.REPORT_SEARCH_PARAMS]
            for param in fhir_capability.REPORT_SEARCH_PARAMS:  # every accepted form belongs to a listed name
                assert all(form.split(":")[0] == param.name for form in param.forms)
    assert ("GET", "/fhir/metadata") in routes
