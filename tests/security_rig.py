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

from dicom_factory import make_dx
from inference.types import CHESTXRAY14, Finding, ModelInfo
from node.api.app import create_app
from node.api.auth import create_token
from node.config import Settings
from node.context import NodeContext
from node import results
from node.db import ApiToken, Database, Job, Output, Study, now
from node.outputs.encapsulated_pdf import build_encapsulated_pdf
from node.storage import output_path, report_pdf_path
from node.fhir_store import save_resources
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


def seed(db: Database, patient_id: str = "PAT-RIG-1", outputs_dir: Path | None = None) -> Seeded:
    ds = make_dx(np.full((16, 16), 100, np.uint8), patient_id=patient_id, accession="ACC-RIG-1")
    facts = StudyFacts.from_datasets([ds])
    findings = [Finding(label, 0.9 if label == "Effusion" else 0.1, 0.5, label == "Effusion") for label in CHESTXRAY14]
    scored = scored_from_facts(facts, {ds.SOPInstanceUID: findings}, MODEL, version=1, status="preliminary")
    resources = build_report_resources(scored, patient_system=SYSTEM)
    output = None
    if outputs_dir is not None:
        pdf = b"%PDF-1.4\n% a stand-in report for the route tests\n%%EOF\n"
        report_pdf_path(outputs_dir, "MODALITY", ds.StudyInstanceUID, 1).parent.mkdir(parents=True, exist_ok=True)
        report_pdf_path(outputs_dir, "MODALITY", ds.StudyInstanceUID, 1).write_bytes(pdf)
        output = build_encapsulated_pdf(pdf, [ds], scored)
        path = output_path(outputs_dir, "MODALITY", ds.StudyInstanceUID, "pdf", output.SOPInstanceUID)
        output.save_as(path, enforce_file_format=True)
    with db.session() as s:
        study = Study(calling_ae="MODALITY", study_uid=ds.StudyInstanceUID, patient_id=patient_id,
                      accession_number="ACC-RIG-1", state="done", version=1)
        s.add(study)
        s.flush()
        save_resources(s, resources, study.id)
        results.store(s, study.id, scored)
        if output is not None:
            s.add(Output(study_id=study.id, version=1, kind="pdf", sop_instance_uid=output.SOPInstanceUID,
                         sop_class_uid=output.SOPClassUID, series_uid=output.SeriesInstanceUID, path=str(path)))
        study_row_id = study.id
    report = next(r for r in resources if r["resourceType"] == "DiagnosticReport")
    return Seeded(patient_id, ds.StudyInstanceUID, report["id"], study_row_id,
                  output.SeriesInstanceUID if output is not None else "",
                  output.SOPInstanceUID if output is not None else "")


def start(tmp: Path, *, engine=None, settings: dict | None = None) -> tuple[Rig, uvicorn.Server, threading.Thread]:
    config = {"storage": {"data_dir": str(tmp)}} | (settings or {})
    db = Database(f"sqlite:///{tmp / 'carina.db'}")
    db.create_schema()
    ctx = NodeContext(Settings(**config), db)
    ctx.ready.update(db=True, scp=True, model=True)
    ctx.engine = engine
    rig = Rig("", ctx, create_app(ctx))
    rig.seeded = seed(db, outputs_dir=ctx.outputs_dir)
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
