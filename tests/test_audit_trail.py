"""The audit trail: DICOM audit messages (PS3.15 A.5) in a hash chain that
`carina audit verify` checks, "who saw patient X" from the CLI, and one record
per DICOM association from the SCP's callback (a plain dataclass stands in for
the SCP's event object here; the callback is duck-typed)."""
from __future__ import annotations

import base64
import csv
import io
import subprocess
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass

import pytest
import yaml
from sqlalchemy import delete, select, update

from node.audit import events, messages as m
from node.audit.associations import association_auditor
from node.audit.trail import AuditTrail
from node.db import AuditPatient, AuditRecord, Database, Study


@pytest.fixture
def node_config(tmp_path):
    path = tmp_path / "carina.yaml"
    path.write_text(yaml.safe_dump({"storage": {"data_dir": str(tmp_path / "var")}}))
    return path


def carina(config, *args, input=None):
    return subprocess.run([sys.executable, "-m", "node.cli", *args, "--config", str(config)],
                          capture_output=True, text=True, timeout=120, input=input)


def _db(config) -> Database:
    data = yaml.safe_load(config.read_text())["storage"]["data_dir"]
    db = Database(f"sqlite:///{data}/carina.db")
    db.create_schema()
    return db


def _fill(trail: AuditTrail) -> None:
    viewer = events.Actor("alice", "viewer", "10.1.2.3")
    events.login(trail, viewer, success=True)
    events.record_read(trail, viewer, "/api/v1/studies/1.2.3", [("PAT-X", "1.2.3")])
    events.query(trail, events.Actor("token:ehr", "integration", "10.9.9.9"), "DiagnosticReport?patient:identifier=PAT-X",
                 [("PAT-X", ""), ("PAT-Y", "")])
    events.login(trail, events.Actor("mallory", "", "10.6.6.6"), success=False, why="wrong password")
    events.record_read(trail, events.Actor("bob", "radiologist", "10.1.2.4"), "/api/v1/studies/1.2.4", [("PAT-Y", "1.2.4")])


# The A.5.1 schema's element order, attribute values and required parts.
def assert_dicom_audit_message(xml: str) -> ET.Element:
    root = ET.fromstring(xml)
    assert root.tag == "AuditMessage"
    tags = [child.tag for child in root]
    assert tags[0] == "EventIdentification"
    n_participants = 0
    while tags[1 + n_participants] == "ActiveParticipant":
        n_participants += 1
    assert n_participants >= 1
    assert tags[1 + n_participants] == "AuditSourceIdentification"
    assert set(tags[2 + n_participants:]) <= {"ParticipantObjectIdentification"}
    ident = root[0]
    assert ident.get("EventActionCode") in ("C", "R", "U", "D", "E")
    assert ident.get("EventOutcomeIndicator") in ("0", "4", "8", "12")
    assert ident.get("EventDateTime")
    children = [c.tag for c in ident]
    assert children[0] == "EventID" and set(children[1:]) <= {"EventTypeCode", "EventOutcomeDescription"}
    for coded in list(root.iter("EventID")) + list(root.iter("EventTypeCode")) + list(root.iter("RoleIDCode")):
        assert coded.get("csd-code") and coded.get("codeSystemName") and coded.get("originalText")
    for p in root.iter("ActiveParticipant"):
        assert p.get("UserID") and p.get("UserIsRequestor") in ("true", "false")
        assert p.get("NetworkAccessPointTypeCode", "2") in ("1", "2", "3", "4", "5")
    source = root.find("AuditSourceIdentification")
    assert source.get("AuditSourceID") and source.find("AuditSourceTypeCode").get("csd-code") == "4"
    for o in root.iter("ParticipantObjectIdentification"):
        assert o.get("ParticipantObjectID") and o.get("ParticipantObjectTypeCode") in ("1", "2", "3", "4")
        parts = [c.tag for c in o]
        assert parts[0] == "ParticipantObjectIDTypeCode"
        query = o.find("ParticipantObjectQuery")
        if query is not None:
            base64.b64decode(query.text, validate=True)
    return root


def test_messages_follow_the_dicom_audit_schema(sqlite_db):
    trail = AuditTrail(sqlite_db, source_id="carina@test")
    _fill(trail)
    events.application(trail, started=True)
    events.delivery(trail, destination="pacs", kind="dicom", peer_id="ORTHANC", peer_address="127.0.0.1",
                    patient_id="PAT-X", study_uid="1.2.3", outcome=m.SUCCESS)
    events.predict_import(trail, events.Actor("token:client", "integration", "127.0.0.1"), kind="dicom",
                          patient_id="PAT-Z", study_uid="1.2.9", outcome=m.SUCCESS)
    records = trail.records()
    for record in records:
        assert_dicom_audit_message(record.xml)
    by_event = {(r.event_id, r.event_type) for r in records}
    assert {("110114", "110122"), ("110110", ""), ("110112", ""), ("110100", "110120"), ("110104", ""),
            ("110107", "")} <= by_event
    query = next(r for r in records if r.event_id == "110112")
    root = ET.fromstring(query.xml)
    asked = next(o for o in root.iter("ParticipantObjectIdentification") if o.get("ParticipantObjectTypeCodeRole") == "24")
    assert base64.b64decode(asked.find("ParticipantObjectQuery").text) == b"DiagnosticReport?patient:identifier=PAT-X"
    patients = [o.get("ParticipantObjectID") for o in root.iter("ParticipantObjectIdentification")
                if o.get("ParticipantObjectTypeCodeRole") == "1"]
    assert patients == ["PAT-X", "PAT-Y"]  # every patient the search returned


@pytest.mark.parametrize("tamper", ["edit", "delete", "truncate", "index"])
def test_verify_names_the_first_broken_record(node_config, tamper):
    db = _db(node_config)
    _fill(AuditTrail(db))
    ok = carina(node_config, "audit", "verify")
    assert ok.returncode == 0 and "intact: 5 records" in ok.stdout, ok.stdout + ok.stderr
    with db.session() as s:
        if tamper == "edit":  # hide who read PAT-X's study
            s.execute(update(AuditRecord).where(AuditRecord.seq == 2)
                      .values(xml=AuditRecord.xml.op("||")(""), user_id="somebody-else"))
            expected = "record 2: its content does not match its hash (edited)"
        elif tamper == "delete":
            s.execute(delete(AuditPatient).where(AuditPatient.record_seq == 3))
            s.execute(delete(AuditRecord).where(AuditRecord.seq == 3))
            expected = "record 3: missing"
        elif tamper == "truncate":
            s.execute(delete(AuditPatient).where(AuditPatient.record_seq == 5))
            s.execute(delete(AuditRecord).where(AuditRecord.seq == 5))
            expected = "records removed from the end"
        else:  # drop PAT-Y from "who saw" without touching the message
            s.execute(delete(AuditPatient).where(AuditPatient.record_seq == 5))
            expected = "record 5: its patient index does not match the message"
    broken = carina(node_config, "audit", "verify")
    assert broken.returncode == 1, broken.stdout
    assert "BROKEN" in broken.stdout and expected in broken.stdout, broken.stdout
    db.dispose()


def test_export_answers_who_saw_a_patient_and_is_itself_audited(node_config):
    db = _db(node_config)
    _fill(AuditTrail(db))
    out = carina(node_config, "audit", "export", "--since", "2000-01-01", "--patient", "PAT-Y")
    assert out.returncode == 0, out.stderr
    rows = list(csv.DictReader(io.StringIO(out.stdout)))
    assert [(r["user"], r["event"]) for r in rows] == [("token:ehr", "110112 Query"), ("bob", "110110 Patient Record")]
    assert all("PAT-Y" in r["patients"] for r in rows)
    everything = list(csv.DictReader(io.StringIO(carina(node_config, "audit", "export", "--since", "2000-01-01").stdout)))
    export = everything[-1]  # the first export, recorded with every patient its rows named
    assert export["event"] == "110106 Export" and export["patients"] == "PAT-X PAT-Y" and "carina CLI" in export["user"]
    future = carina(node_config, "audit", "export", "--since", "2999-01-01")
    assert future.stdout.strip().splitlines() == [",".join(
        ("seq", "time_utc", "event", "event_type", "action", "outcome", "user", "role", "address", "patients",
         "studies", "description"))]
    assert carina(node_config, "audit", "export", "--since", "yesterday").returncode == 2
    db.dispose()


def test_csv_cells_cannot_become_spreadsheet_formulas(node_config):
    db = _db(node_config)
    events.login(AuditTrail(db), events.Actor("=HYPERLINK(\"http://x\")", "", "1.2.3.4"), success=False, why="x")
    rows = list(csv.DictReader(io.StringIO(carina(node_config, "audit", "export", "--since", "2000-01-01").stdout)))
    assert rows[0]["user"].startswith("'=")
    db.dispose()


def test_admin_commands_are_audited(node_config):
    assert carina(node_config, "user", "add", "carol", "--role", "radiologist", input="a long passphrase\n").returncode == 0
    assert carina(node_config, "user", "passwd", "carol", input="another long passphrase\n").returncode == 0
    assert carina(node_config, "user", "role", "carol", "--role", "viewer").returncode == 0
    assert carina(node_config, "user", "disable", "carol").returncode == 0
    assert carina(node_config, "token", "create", "--name", "ehr", "--role", "integration",
                  "--expires-days", "30").returncode == 0
    assert carina(node_config, "token", "revoke", "ehr").returncode == 0
    assert carina(node_config, "jobs", "retry").returncode == 0
    rows = list(csv.DictReader(io.StringIO(carina(node_config, "audit", "export", "--since", "2000-01-01").stdout)))
    assert [(r["event_type"].split()[0], r["description"]) for r in rows] == [
        ("110136", "created with role radiologist"),
        ("110137", "password changed; sessions ended"),
        ("110136", "role set to viewer; sessions ended"),
        ("110137", "disabled; sessions ended"),
        ("110137", "token created: role integration, expires in 30 days"),
        ("110137", "token revoked"),
        ("110132", "re-queued 0 dead-letter job(s)"),
    ]
    assert all(r["event"] == "110113 Security Alert" for r in rows)
    listed = carina(node_config, "token", "list").stdout
    assert "ehr\tintegration" in listed and "token revoked" in listed


@dataclass(frozen=True)
class AssociationEvent:
    """The shape of the SCP's on_association event (dicom_scp/scp.py)."""

    kind: str
    calling_ae: str
    called_ae: str
    peer_address: str
    peer_port: int
    reason: str = ""
    study_uids: tuple[str, ...] = ()
    tls: bool = False


def test_one_record_per_association_with_its_patients(sqlite_db):
    with sqlite_db.session() as s:
        s.add(Study(calling_ae="MODALITY", study_uid="1.2.840.1", patient_id="PAT-A"))
        s.add(Study(calling_ae="MODALITY", study_uid="1.2.840.2", patient_id="PAT-B"))
        s.add(Study(calling_ae="OTHER", study_uid="1.2.840.2", patient_id="PAT-OTHER"))  # another route, same UID
    trail = AuditTrail(sqlite_db, source_id="carina@test")
    audit = association_auditor(sqlite_db, trail, "CARINA")
    audit(AssociationEvent("accepted", "MODALITY", "CARINA", "10.0.0.7", 40001))
    audit(AssociationEvent("released", "MODALITY", "CARINA", "10.0.0.7", 40001, study_uids=("1.2.840.1", "1.2.840.2"),
                           tls=True))
    audit(AssociationEvent("released", "PROBE", "CARINA", "10.0.0.8", 40002))  # a C-ECHO: nothing to record
    audit(AssociationEvent("aborted", "MODALITY", "CARINA", "10.0.0.7", 40003, reason="peer aborted",
                           study_uids=("1.2.840.1",)))
    audit(AssociationEvent("rejected", "SPOOF", "CARINA", "10.6.6.6", 40004, reason="calling AE not recognised"))
    records = trail.records()
    assert [(r.event_id, r.event_type, r.action, r.outcome) for r in records] == [
        ("110104", "", "C", 0), ("110104", "", "C", 4), ("110113", "110126", "E", 4)]
    stored, aborted, rejected = records
    for record in records:
        assert_dicom_audit_message(record.xml)
    assert (stored.user_id, stored.address) == ("MODALITY", "10.0.0.7")
    with sqlite_db.session() as s:
        named = s.scalars(select(AuditPatient.patient_id).where(AuditPatient.record_seq == stored.seq)).all()
    assert sorted(named) == ["PAT-A", "PAT-B"]  # not PAT-OTHER: studies are keyed by (calling AE, UID)
    assert "1.2.840.1" in stored.xml and "1.2.840.2" in stored.xml and "(TLS)" in stored.xml
    assert "association aborted" in aborted.xml and "PAT-A" in aborted.xml
    assert (rejected.user_id, rejected.address) == ("SPOOF", "10.6.6.6") and "calling AE not recognised" in rejected.xml
    assert trail.verify().ok
