"""A real `create_app` on uvicorn (loopback) with seeded data, users and tokens of
every role, for the route-policy, header, rate-limit and fuzzing tests."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import uvicorn

from dicom_factory import make_dx, write
from pydicom.uid import generate_uid
from inference.types import CHESTXRAY14, Finding, ModelInfo
from node.api.app import create_app
from node.api.auth import create_token
from node.config import Settings
from node.context import NodeContext
from node import results
from node.db import ApiToken, Database, Instance, Job, Output, Study, now
from node.outputs.encapsulated_pdf import build_encapsulated_pdf
from node.fhir_store import save_resources
from node.storage import instance_path, output_path, report_pdf_path
from node.outputs.fhir_report import build_report_resources
from node.study_facts import StudyFacts
from node.users import add_user
from peers import free_port
from scored_factory import scored_from_facts

PASSWORD = "correct horse battery staple"
ROLES = ("viewer", "radiologist", "integration", "admin")
USER_ROLES = ("viewer", "radiologist", "admin")
SYSTEM = "urn:oid:1.2.826.0.1.3680043.10.1249.1"
MODEL = ModelInfo("densenet121-res224-all", "demo-seed0", demo=True)


@dataclass
class Seeded:
    patient_id: str
    study_uid: str
    report_id: str
    study_row_id: int
    sop_uid: str = ""  # its one scored image (stored under instances/, scored, with an SR output)
    output_id: int = 0
    # One Carina output (an Encapsulated PDF) for the DICOMweb routes, and the report PDF.
    output_series_uid: str = ""
    output_sop_uid: str = ""


@dataclass
class Rig:
    base: str
    ctx: NodeContext
    app: object
    tokens: dict[str, str] = field(default_factory=dict)  # role or "expired"/"revoked" -> token
    seeded: Seeded | None = None

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.base, timeout=60, **kwargs)

    def login(self, user: str, password: str = PASSWORD) -> tuple[httpx.Client, str]:
        """A client holding a session cookie for `user`, and the session's CSRF token."""
        client = self.client()
        rsp = client.post("/api/v1/session", json={"username": user, "password": password})
        assert rsp.status_code == 200, rsp.text
        return client, rsp.json()["csrf_token"]

    def dead_job(self) -> int:
        with self.ctx.db.session() as s:
            job = Job(study_id=self.seeded.study_row_id, stage="deliver", destination=f"pacs-{time.monotonic_ns()}",
                      study_version=1, state="dead", attempts=3, last_error="pacs refused: DICOM status 0xA700")
            s.add(job)
            s.flush()
            return job.id


def seed(db: Database, data_dir: Path, patient_id: str = "PAT-RIG-1") -> Seeded:
    """One done study: its scored version 1 (Effusion positive), the received file, an SR output
    file, an Encapsulated PDF output with its report PDF, and its FHIR resources, so every
    reading-app and DICOMweb route has something to read."""
    ds = make_dx(np.full((16, 16), 100, np.uint8), patient_id=patient_id, accession="ACC-RIG-1")
    facts = StudyFacts.from_datasets([ds])
    findings = [Finding(label, 0.9 if label == "Effusion" else 0.1, 0.5, label == "Effusion") for label in CHESTXRAY14]
    scored = scored_from_facts(facts, {ds.SOPInstanceUID: findings}, MODEL, version=1, status="preliminary",
                               shapes={ds.SOPInstanceUID: (16, 16)})
    resources = build_report_resources(scored, patient_system=SYSTEM)
    source = instance_path(Path(data_dir) / "instances", "MODALITY", ds.StudyInstanceUID, ds.SOPInstanceUID)
    source.parent.mkdir(parents=True, exist_ok=True)
    write(ds, source)
    sr = Path(data_dir) / "outputs" / "sr-rig.dcm"
    sr.parent.mkdir(parents=True, exist_ok=True)
    sr.write_bytes(source.read_bytes())  # any DICOM file: the route serves the bytes it finds
    outputs_dir = Path(data_dir) / "outputs"
    pdf = b"%PDF-1.4\n% a stand-in report for the route tests\n%%EOF\n"
    report_pdf_path(outputs_dir, "MODALITY", ds.StudyInstanceUID, 1).parent.mkdir(parents=True, exist_ok=True)
    report_pdf_path(outputs_dir, "MODALITY", ds.StudyInstanceUID, 1).write_bytes(pdf)
    encapsulated = build_encapsulated_pdf(pdf, [ds], scored)
    pdf_path = output_path(outputs_dir, "MODALITY", ds.StudyInstanceUID, "pdf", encapsulated.SOPInstanceUID)
    encapsulated.save_as(pdf_path, enforce_file_format=True)
    with db.session() as s:
        study = Study(calling_ae="MODALITY", study_uid=ds.StudyInstanceUID, patient_id=patient_id,
                      accession_number="ACC-RIG-1", state="done", version=1, patient_name="Rig^Patient",
                      study_date="20261121")
        s.add(study)
        s.flush()
        save_resources(s, resources, study.id)
        results.store(s, study.id, scored)
        s.add(Instance(study_id=study.id, sop_instance_uid=ds.SOPInstanceUID, sop_class_uid=ds.SOPClassUID,
                       path=str(source), state="scored"))
        output = Output(study_id=study.id, version=1, kind="sr", sop_instance_uid=generate_uid(),
                        sop_class_uid="1.2.840.10008.5.1.4.1.1.88.34", series_uid=generate_uid(), path=str(sr))
        s.add(output)
        s.add(Output(study_id=study.id, version=1, kind="pdf", sop_instance_uid=encapsulated.SOPInstanceUID,
                     sop_class_uid=encapsulated.SOPClassUID, series_uid=encapsulated.SeriesInstanceUID,
                     path=str(pdf_path)))
        s.flush()
        study_row_id, output_id = study.id, output.id
    report = next(r for r in resources if r["resourceType"] == "DiagnosticReport")
    return Seeded(patient_id, ds.StudyInstanceUID, report["id"], study_row_id, ds.SOPInstanceUID, output_id,
                  encapsulated.SeriesInstanceUID, encapsulated.SOPInstanceUID)


def start(tmp: Path, *, engine=None, settings: dict | None = None,
          database_url: str | None = None) -> tuple[Rig, uvicorn.Server, threading.Thread]:
    """`database_url`: a migrated PostgreSQL schema (tests/conftest.py module_backend); default SQLite in `tmp`."""
    config = {"storage": {"data_dir": str(tmp)}} | (settings or {})
    db = Database(database_url or f"sqlite:///{tmp / 'carina.db'}")
    db.create_schema()
    ctx = NodeContext(Settings(**config), db)
    ctx.ready.update(db=True, scp=True, model=True)
    ctx.engine = engine
    rig = Rig("", ctx, create_app(ctx))
    rig.seeded = seed(db, tmp)
    for role in ROLES:
        rig.tokens[role] = create_token(db, f"tok-{role}", role, expires_days=1)
    rig.tokens["expired"] = create_token(db, "tok-expired", "admin", expires_days=1)
    rig.tokens["revoked"] = create_token(db, "tok-revoked", "admin", expires_days=1)
    with db.session() as s:
        for row in s.query(ApiToken).filter(ApiToken.name.in_(["tok-expired", "tok-revoked"])):
            if row.name == "tok-expired":
                row.expires_at = now() - 1
            else:
                row.revoked_at = now()
    for role in USER_ROLES:
        add_user(db, f"user-{role}", role, PASSWORD, min_length=12)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(rig.app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    rig.base = f"http://127.0.0.1:{port}"
    return rig, server, thread


def stop(server: uvicorn.Server, thread: threading.Thread, rig: Rig) -> None:
    server.should_exit = True
    thread.join(10)
    rig.ctx.db.dispose()
