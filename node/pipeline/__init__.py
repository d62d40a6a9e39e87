"""Pipeline stages. Each stage is a module with three functions, run by the
worker (node/worker.py) for one claimed job of the study's current version:

    load(ctx, session, study, job) -> Work     # database reads only
    run(ctx, work) -> Outcome                  # files, model, network; no database
    settle(ctx, session, study, outcome)       # database writes, committed with "job done"

The typed values between them are the data flow a reader can follow:

    infer:   InferWork (candidate instances)  -> Inferred (ScoredStudy + instance verdicts)
    encode:  EncodeWork (ScoredStudy, files)  -> Encoded (SR, GSPS, SEG, PDF + FHIR resources)
    capture: CaptureWork (ScoredStudy, files) -> Captured (heatmap SCs)
    deliver: a sender's work (ScoredStudy or output files, one destination) -> delivered / error

Encode queues the report's deliveries (`deliver`), capture and the SCs'
deliveries (`deliver-sc`, which wait for capture: node/jobs.py) together, so
the SR, FHIR and HL7 go out while the SCs are drawn; capture concludes the
study. With two workers the SR's C-STORE and the drawing overlap.

A crash between stages loses nothing: each stage's outcome is persisted in
the same transaction that marks its job done, and the next stage reads it back.
"""
from __future__ import annotations

from node.db import Study
from node.states import StudyState


def conclude(study: Study, state: StudyState, reason: str = "") -> None:
    """Move a processing study to its final state for this version.

    Only from PROCESSING: a late instance that reopened the study meanwhile
    (state RECEIVED, same version until it completes again) must not be
    buried under this version's outcome, or the study would never re-run."""
    if study.state == StudyState.PROCESSING:
        study.state, study.reason = state, reason[:2000]
