"""Deterministic UIDs for everything Carina writes.

Processing the same input with the same model must yield the same UIDs, so a
re-run after a crash updates the PACS copy instead of adding a second one.
UIDs use the 2.25 (UUID-derived) root: no registered org root is needed and
collisions are as unlikely as SHA-512 collisions.
"""
from __future__ import annotations

from pydicom.uid import generate_uid

_NAMESPACE = "carina-output-uid-v1"


def derived_uid(*parts: str) -> str:
    return generate_uid(prefix=None, entropy_srcs=[_NAMESPACE, *parts])


def sc_instance_uid(source_sop_uid: str, model_version: str, kind: str) -> str:
    """`kind` is 'summary' or a finding label."""
    return derived_uid("sc", source_sop_uid, model_version, kind)


def sr_instance_uid(source_sop_uids: list[str], model_version: str, study_version: int) -> str:
    # The study version keeps a re-run's SR distinct from the one it supersedes
    # even when the same images are scored again.
    return derived_uid("sr", *sorted(source_sop_uids), model_version, str(study_version))


def series_uid(study_uid: str, model_version: str, kind: str) -> str:
    """One SR series and one SC series per study and model version."""
    return derived_uid("series", study_uid, model_version, kind)


def device_uid(model_name: str, model_version: str, weights_sha256: str | None) -> str:
    """IHE AIR: a new Device UID whenever the model changes."""
    return derived_uid("device", model_name, model_version, weights_sha256 or "demo")
