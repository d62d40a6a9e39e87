"""The start-up sweep: make storage and database agree again after a crash.

A kill between the durable rename of a received file and the commit of its
row leaves a file the database does not know (an orphan); a kill inside
`write_durably` leaves a `.part` file. Before the SCP listens and before any
worker runs, the node:

- removes stale temp files: everything under `tmp/` (partial uploads, never
  acknowledged) and `*.part` files under `instances/`, `outputs/`, `work/`;
- re-registers every orphan under `instances/` that is readable DICOM, whose
  UIDs match the directory it is in and whose SOP Instance UID the study does
  not already have: it is recorded exactly as if just received (the study is
  created or reopened, so it is scored), with an `orphan_registered` event;
- quarantines every other orphan (unreadable, mismatched, a second copy of a
  known instance, or an encoded output without its row, which the encode
  or capture stage writes again anyway) by moving it to `quarantine/`, with an
  `orphan_quarantined` event. Nothing is deleted that was not a temp file.

A study directory whose modification time is older than the previous sweep
has had no file added or removed since, so it is skipped: after the first
sweep a restart costs one `stat` per study, not one query.
"""
from __future__ import annotations

import logging
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread
from sqlalchemy import select

from dicom_scp.scp import ReceivedInstance
from node.context import NodeContext
from node.db import Instance, InstanceRevision, Output, Study, get_meta, set_meta
from node.events import EventKind, record_event
from node.receiver import record_instance
from node.storage import safe_path_component, sha256_file

log = logging.getLogger(__name__)

_HASHED = re.compile(r"^h[0-9a-f]{32}$")  # node/storage.py safe_path_component's form for unsafe names
LAST_SWEEP = "sweep_started_at"  # NodeMeta key: local clock, compared with local file times
_TAGS = ["SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "PatientID", "AccessionNumber",
         "Modality"]


@dataclass
class SweepReport:
    temp_removed: int = 0
    registered: list[str] = field(default_factory=list)  # SOP Instance UIDs
    quarantined: list[str] = field(default_factory=list)  # paths relative to data_dir


def sweep(ctx: NodeContext) -> SweepReport:
    report = SweepReport()
    started = time.time()
    min_age = ctx.settings.storage.sweep_min_age_seconds
    report.temp_removed = _remove_temp_files(ctx, started - min_age)
    with ctx.db.session() as s:
        last = float(get_meta(s, LAST_SWEEP) or 0)
    for study_dir in _study_dirs(ctx.instances_dir):
        if _untouched_since(study_dir, last):
            continue
        _sweep_instances(ctx, study_dir, started - min_age, report)
    for study_dir in _study_dirs(ctx.outputs_dir):
        if _untouched_since(study_dir, last):
            continue
        _sweep_outputs(ctx, study_dir, started - min_age, report)
    with ctx.db.session() as s:
        if report.temp_removed:
            record_event(s, EventKind.STALE_TEMP_REMOVED, detail=f"{report.temp_removed} partial file(s) removed")
        set_meta(s, LAST_SWEEP, repr(started - min_age))
    if report.registered or report.quarantined or report.temp_removed:
        log.warning("start-up sweep: %d orphan(s) re-registered, %d quarantined, %d temp file(s) removed",
                    len(report.registered), len(report.quarantined), report.temp_removed)
    return report


def _untouched_since(directory: Path, last: float) -> bool:
    try:
        return last > 0 and directory.stat().st_mtime < last
    except OSError:
        return True


def _study_dirs(root: Path):
    if not root.is_dir():
        return
    for ae_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        yield from sorted(p for p in ae_dir.iterdir() if p.is_dir())


def _old_enough(path: Path, cutoff: float) -> bool:
    try:
        return path.stat().st_mtime <= cutoff
    except OSError:
        return False


def _remove_temp_files(ctx: NodeContext, cutoff: float) -> int:
    removed = 0
    if ctx.tmp_dir.is_dir():
        for entry in ctx.tmp_dir.rglob("*"):
            if entry.is_file() and _old_enough(entry, cutoff):
                entry.unlink(missing_ok=True)
                removed += 1
    for root in (ctx.instances_dir, ctx.outputs_dir, ctx.work_dir):
        if root.is_dir():
            for part in root.rglob("*.part"):
                if part.is_file() and _old_enough(part, cutoff):
                    part.unlink(missing_ok=True)
                    removed += 1
    return removed


def _known_instance_paths(ctx: NodeContext, study_dir: Path, files: list[Path]) -> tuple[set[str], dict[str, Study]]:
    """Paths the database has for the studies stored in `study_dir`, and those studies by calling AE."""
    ae_name, uid_name = study_dir.parent.name, study_dir.name
    uids = {uid_name}
    if uid_name != safe_path_component(uid_name) or _HASHED.match(uid_name):
        uids |= {_study_uid_of(p) for p in files}  # an unsafe UID was stored under its hash
    with ctx.db.session() as s:
        studies = [st for st in s.scalars(select(Study).where(Study.study_uid.in_(uids - {""})))
                   if safe_path_component(st.calling_ae) == ae_name and safe_path_component(st.study_uid) == uid_name]
        ids = [st.id for st in studies]
        paths: set[str] = set()
        if ids:
            paths |= set(s.scalars(select(Instance.path).where(Instance.study_id.in_(ids))))
            paths |= set(s.scalars(select(InstanceRevision.path).join(Instance, Instance.id == InstanceRevision.instance_id)
                                   .where(Instance.study_id.in_(ids))))
        for st in studies:
            s.expunge(st)
    return paths, {st.calling_ae: st for st in studies}


def _study_uid_of(path: Path) -> str:
    try:
        return str(dcmread(path, stop_before_pixels=True, specific_tags=["StudyInstanceUID"]).get("StudyInstanceUID", ""))
    except Exception:
        return ""


def _sweep_instances(ctx: NodeContext, study_dir: Path, cutoff: float, report: SweepReport) -> None:
    files = [p for p in sorted(study_dir.iterdir()) if p.is_file() and p.suffix == ".dcm" and _old_enough(p, cutoff)]
    if not files:
        return
    known, studies = _known_instance_paths(ctx, study_dir, files)
    for path in files:
        if str(path) in known:
            continue
        why = _register(ctx, path, study_dir, studies)
        if why:
            _quarantine(ctx, path, why, report)
        else:
            report.registered.append(path.name)


def _register(ctx: NodeContext, path: Path, study_dir: Path, studies: dict[str, Study]) -> str:
    """Record an orphan as received; returns why it cannot be, or ""."""
    try:
        header = dcmread(path, stop_before_pixels=True, specific_tags=_TAGS)
        fields = {k: str(header.get(k, "") or "").strip() for k in _TAGS}
        syntax = str(header.file_meta.TransferSyntaxUID)
    except Exception as exc:
        return f"unreadable DICOM ({type(exc).__name__})"
    sop, study_uid = fields["SOPInstanceUID"], fields["StudyInstanceUID"]
    if not sop or not study_uid or not fields["SOPClassUID"]:
        return "missing SOP Class, SOP Instance or Study Instance UID"
    if safe_path_component(study_uid) != study_dir.name or not path.name.startswith(safe_path_component(sop) + "."):
        return "its UIDs do not match where it is stored"
    ae_name = study_dir.parent.name
    calling_ae = next(iter(studies), None)
    if calling_ae is None:
        if safe_path_component(ae_name) != ae_name or len(ae_name) > 16:
            return "the calling AE of its directory cannot be recovered"
        calling_ae = ae_name
    with ctx.db.session() as s:
        exists = s.scalar(select(Instance.id).join(Study, Study.id == Instance.study_id).where(
            Study.calling_ae == calling_ae, Study.study_uid == study_uid, Instance.sop_instance_uid == sop))
    if exists is not None:
        return "another file of this instance is registered"
    received = ReceivedInstance(
        calling_ae=calling_ae, peer_address="start-up sweep", sop_class_uid=fields["SOPClassUID"],
        sop_instance_uid=sop, study_uid=study_uid, series_uid=fields["SeriesInstanceUID"],
        transfer_syntax_uid=syntax, patient_id=fields["PatientID"], accession_number=fields["AccessionNumber"],
        modality=fields["Modality"], temp_path=path, size_bytes=path.stat().st_size,
    )
    record_instance(ctx.db, received, path, sha256_file(path))
    with ctx.db.session() as s:
        study = s.scalar(select(Study).where(Study.calling_ae == calling_ae, Study.study_uid == study_uid))
        record_event(s, EventKind.ORPHAN_REGISTERED, study=study, sop_instance_uid=sop,
                     detail=f"{path.relative_to(ctx.data_dir)} had no row (a crash between storing and recording); "
                            "registered as received")
    return ""


def _sweep_outputs(ctx: NodeContext, study_dir: Path, cutoff: float, report: SweepReport) -> None:
    files = [p for p in sorted(study_dir.iterdir()) if p.is_file() and p.suffix == ".dcm" and _old_enough(p, cutoff)]
    if not files:
        return
    with ctx.db.session() as s:
        known = set(s.scalars(select(Output.path).where(Output.path.in_([str(p) for p in files]))))
    for path in files:
        if str(path) not in known:
            _quarantine(ctx, path, "encoded output without its row (the encode or capture stage writes it again)", report)


def _quarantine(ctx: NodeContext, path: Path, why: str, report: SweepReport) -> None:
    relative = path.relative_to(ctx.data_dir)
    target = ctx.quarantine_dir / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        target = target.with_name(f"{target.name}.{int(time.time() * 1000)}")
    shutil.move(str(path), target)
    report.quarantined.append(str(relative))
    with ctx.db.session() as s:
        record_event(s, EventKind.ORPHAN_QUARANTINED, detail=f"{relative} -> {target.relative_to(ctx.data_dir)}: {why}")
    log.warning("quarantined %s: %s", relative, why)
