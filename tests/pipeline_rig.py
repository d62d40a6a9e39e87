"""Drive Carina's real encode and deliver stages without a model.

A study is stored the way the SCP leaves it (instance file, Study/Instance
rows) and settled by the real infer stage's `scored_study` and `settle` with
findings the test chooses instead of the model's, so triage and delivery can
be tested for a critical and a normal study in seconds. Then the real
`encode` stage runs and the real worker (`node.worker.run_one`) claims and
settles the deliver jobs, retries and dead-letters included.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from sqlalchemy import select

from dicom_factory import make_dx, write
from inference import decode_dicom
from inference.types import CHESTXRAY14, Finding, Heatmaps, ImageResult, ModelInfo, Region
from node import triage
from node.config import Settings
from node.context import NodeContext
from node.db import Database, Instance, Job, Study, now
from node.jobs import delivery_per_destination, enqueue
from node.pipeline import infer
from node.states import DELIVERY_STAGES, InstanceState, OutputKind, Stage, StudyState
from node.worker import run_one
from peers import wait_until

DEMO = ModelInfo("densenet121-res224-all", "demo-seed0", demo=True)
PATIENT_SYSTEM = "urn:oid:1.2.826.0.1.3680043.10.1249.1"


def image_result(ds, positives: dict[str, float], model: ModelInfo = DEMO) -> ImageResult:
    """14 findings (threshold 0.5); each positive gets a box region and a hot map patch."""
    image = decode_dicom(ds)
    rows, cols = image.source_shape
    maps = np.zeros((14, 7, 7), dtype=np.float32)
    findings = []
    for index, label in enumerate(CHESTXRAY14):
        probability = positives.get(label, round(0.05 + 0.01 * index, 2))
        positive = probability >= 0.5
        regions: tuple[Region, ...] = ()
        if positive:
            maps[index, 2:5, 2:4] = 1.0
            x0, y0, w, h = cols * 0.25, rows * 0.3, cols * 0.2, rows * 0.15
            polygon = np.array([[x0, y0], [x0 + w, y0], [x0 + w, y0 + h], [x0, y0 + h], [x0, y0]])
            regions = (Region(polygon, (int(x0), int(y0), int(x0 + w) + 1, int(y0 + h) + 1), int(w * h)),)
        findings.append(Finding(label, probability, 0.5, positive, regions))
    side = min(rows, cols)
    heatmaps = Heatmaps(maps=maps, crop=((rows - side) // 2, (cols - side) // 2, side), source_shape=(rows, cols))
    return ImageResult(findings=tuple(findings), heatmaps=heatmaps, image=image, model=model)


class PipelineRig:
    def __init__(self, workdir: Path, *, destinations: list[dict] | None = None, **sections):
        self.workdir = Path(workdir)
        config = {
            "storage": {"data_dir": str(self.workdir / "var"), "min_free_mb": 0},
            "pipeline": {"backoff_base_seconds": 0.05, "backoff_max_seconds": 0.2, "max_attempts": 4,
                         "poll_seconds": 0.05},
            # Deliveries give up by time: a second of failing here.
            "delivery": {"base_seconds": 0.05, "max_seconds": 0.2, "give_up_after_seconds": 1.0},
            "destinations": destinations or [],
            **sections,
        }
        self.settings = Settings(**config)
        self.db = Database(self.settings.database_url)
        self.db.create_schema()
        self.ctx = NodeContext(self.settings, self.db)
        for d in (self.ctx.instances_dir, self.ctx.outputs_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.pixels = np.tile(np.linspace(20, 230, 64, dtype=np.uint8), (64, 1))

    def add_study(self, positives: dict[str, float], *, calling_ae: str = "MODALITY", ds=None, **dx) -> tuple[int, object]:
        """A received, scored study (version 1); returns (study id, source dataset)."""
        ds = ds if ds is not None else make_dx(self.pixels, **dx)
        path = write(ds, self.ctx.instances_dir / f"{ds.SOPInstanceUID}.dcm")
        with self.db.session() as s:
            study = Study(calling_ae=calling_ae, study_uid=str(ds.StudyInstanceUID), patient_id=str(ds.PatientID),
                          accession_number=str(ds.AccessionNumber), state=StudyState.PROCESSING, version=1,
                          completed_at=now())
            s.add(study)
            s.flush()
            s.add(Instance(study_id=study.id, sop_instance_uid=str(ds.SOPInstanceUID), sop_class_uid=str(ds.SOPClassUID),
                           series_uid=str(ds.SeriesInstanceUID), path=str(path), state=InstanceState.STORED))
            study_id = study.id
        self._infer(study_id, ds, positives)
        return study_id, ds

    def rescore(self, study_id: int, ds, positives: dict[str, float]) -> int:
        """A re-run (e.g. after a late instance): the next version with new findings."""
        with self.db.session() as s:
            study = s.get(Study, study_id)
            study.version += 1
            study.state = StudyState.PROCESSING
            version = study.version
        self._infer(study_id, ds, positives)
        return version

    def _infer(self, study_id: int, ds, positives: dict[str, float]) -> None:
        """What the infer stage does for this study version, with the chosen findings as the model's answer."""
        with self.db.session() as s:
            study = s.get(Study, study_id)
            instance = s.scalar(select(Instance).where(Instance.study_id == study_id))
            candidate = infer.Candidate(instance.id, instance.sop_instance_uid, Path(instance.path))
            work = infer.InferWork(study.id, study.calling_ae, study.study_uid, study.version, (candidate,),
                                   earlier_triage=triage.previous(s, study.id))
        result = image_result(ds, positives)
        scored = infer.scored_study(self.ctx, work, [ds], [result])
        infer.keep_display(self.ctx, work, candidate.sop_uid, result.image)
        with self.db.session() as s:
            assessed = (infer.Assessment(candidate, InstanceState.SCORED),)
            infer.settle(self.ctx, s, s.get(Study, study_id), infer.Inferred(assessed, scored))

    def encode(self, study_id: int, timeout: float = 60.0) -> None:
        """Run the real encode stage, and the capture stage it queues when SCs are
        among the kinds, claimed by the real worker, for the study's current version;
        they store the outputs and FHIR resources and enqueue the deliver jobs,
        which only `run_deliveries` runs (a test sets its peer up in between)."""
        with self.db.session() as s:
            version = s.get(Study, study_id).version
            enqueue(s, study_id, Stage.ENCODE, version)
        stages = {Stage.ENCODE, Stage.CAPTURE} if OutputKind.SC in self.ctx.settings.outputs.kinds else {Stage.ENCODE}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.db.session() as s:
                jobs = s.scalars(select(Job).where(Job.study_id == study_id, Job.study_version == version,
                                                   Job.stage.in_(stages))).all()
                states = {job.stage: (job.state, job.last_error) for job in jobs}
            assert all(state != "dead" for state, _ in states.values()), states
            if set(states) == stages and all(state == "done" for state, _ in states.values()):
                return
            run_one(self.ctx, "test-worker", stages=tuple(stages))  # the deliveries are run_deliveries' to run
        raise AssertionError(f"encode did not finish: {states}")

    def delivery_jobs(self, study_id: int) -> list[Job]:
        """The study's deliver and deliver-sc jobs, every destination and version."""
        with self.db.session() as s:
            jobs = s.scalars(select(Job).where(Job.study_id == study_id, Job.stage.in_(DELIVERY_STAGES))).all()
            for job in jobs:
                s.expunge(job)
        return list(jobs)

    def deliveries(self, study_id: int) -> dict[str, Job]:
        """Each destination's delivery (node/jobs.py `delivery_per_destination`: the
        least advanced of its deliver and deliver-sc jobs of the newest version)."""
        return delivery_per_destination(self.delivery_jobs(study_id))

    def run_deliveries(self, study_id: int, timeout: float = 30.0) -> dict[str, Job]:
        """Run the worker until every deliver and deliver-sc job of the study is done or dead."""
        def settled() -> bool:
            while run_one(self.ctx, "test-worker"):  # everything runnable now; a retry waits for its backoff
                pass
            jobs = self.delivery_jobs(study_id)
            return bool(jobs) and all(j.state in ("done", "dead") for j in jobs)

        try:
            wait_until(settled, timeout, interval=0.05, what="the study's deliveries done or dead")
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {[(j.destination, j.state, j.last_error) for j in self.delivery_jobs(study_id)]}")
        return self.deliveries(study_id)

    def error_detail(self, job: Job) -> str:
        """The full text of a job's failed attempts (node/jobs.py StageError.detail), as admins read it."""
        from node.db import JobError

        with self.db.session() as s:
            return "\n".join(s.scalars(select(JobError.detail).where(JobError.job_id == job.id).order_by(JobError.id)))

    def close(self) -> None:
        self.db.dispose()
