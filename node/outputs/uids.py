"""Deterministic UIDs for everything Carina writes.

Processing the same input with the same model must yield the same UIDs, so a
re-run after a crash updates the PACS copy instead of adding a second one.
UIDs use the 2.25 root with a name-based (v5) UUID, as PS3.5 B.2 / ISO 9834-8
allow: no registered org root is needed. (pydicom's generate_uid ignores
entropy_srcs when prefix is None and returns a random UID, so it is not used.)
"""
from __future__ import annotations

import uuid

_NAMESPACE = uuid.UUID("6f0c6f2e-5a47-4c8e-9a51-0c4a7a1e2f10")  # Carina output UIDs, v1


def derived_uid(*parts: str) -> str:
    # The unit separator keeps ("ab", "c") and ("a", "bc") apart.
    return f"2.25.{uuid.uuid5(_NAMESPACE, chr(31).join(parts)).int}"


# `model_ref` is ModelInfo.ref ("name@version"): two models that share a
# version string must still write different objects.


# `qualifiers` (node/scored_study.py `output_uid_qualifiers`) are empty in the
# ordinary case, so those UIDs never change; they are set when the same names
# would otherwise give a UID that was (or may have been) issued for other
# content: a source re-sent with changed bytes (its revision), and every
# output of a node restored from a backup (its UID salt).


def sc_instance_uid(source_sop_uid: str, model_ref: str, kind: str, *qualifiers: str) -> str:
    """`kind` is 'summary' or a finding label."""
    return derived_uid("sc", source_sop_uid, model_ref, kind, *[q for q in qualifiers if q])


def sr_instance_uid(source_sop_uids: list[str], model_ref: str, study_version: int, *qualifiers: str) -> str:
    # The study version keeps a re-run's SR distinct from the one it supersedes
    # even when the same images are scored again.
    return derived_uid("sr", *sorted(source_sop_uids), model_ref, str(study_version), *[q for q in qualifiers if q])


def series_uid(study_uid: str, model_ref: str, kind: str) -> str:
    """One series per output kind (sr, sc, seg, gsps, pdf), study and model version."""
    return derived_uid("series", study_uid, model_ref, kind)


def device_uid(model_name: str, model_version: str, weights_sha256: str | None) -> str:
    """IHE AIR: a new Device UID whenever the model changes."""
    return derived_uid("device", model_name, model_version, weights_sha256 or "demo")


def seg_instance_uid(source_sop_uid: str, model_ref: str, *qualifiers: str) -> str:
    """One SEG per scored image and model (like its SCs: same findings, same object)."""
    return derived_uid("seg", source_sop_uid, model_ref, *[q for q in qualifiers if q])


def gsps_instance_uid(source_sop_uid: str, model_ref: str, *qualifiers: str) -> str:
    """One GSPS per scored image and model."""
    return derived_uid("gsps", source_sop_uid, model_ref, *[q for q in qualifiers if q])


def pdf_instance_uid(source_sop_uids: list[str], model_ref: str, study_version: int, *qualifiers: str) -> str:
    """The Encapsulated PDF of one report version: like the SR, one per version."""
    return derived_uid("pdf", *sorted(source_sop_uids), model_ref, str(study_version), *[q for q in qualifiers if q])
