"""The node's files: where each kind lives, and crash-safe placement.

After `move_durably` or `write_durably` return, the bytes survive power loss:
data fsynced, atomic rename, directory fsynced. Names built from network
input (AE titles, UIDs) go through `safe_path_component`, so a hostile UID
can never become `../x`.

Layout under `storage.data_dir`:
- `instances/<calling AE>/<study UID>/<SOP UID>.dcm`: what senders stored;
  a re-send with different bytes goes beside it, never over it, as
  `<SOP UID>.<sha256>.dcm` (`place_instance`);
- `outputs/<calling AE>/<study UID>/<kind>-<SOP UID>.dcm`: what Carina made;
- `outputs/<calling AE>/<study UID>/report-v<version>.pdf`: the printable
  report of a version, as the API serves it and FHIR attaches it;
- `work/<calling AE>/<study UID>/v<version>/<SOP UID>.npy`: the display
  rendition the infer stage keeps for the heatmap SCs and the reading app, so
  a source is decoded once per study version (uncompressed: node/renditions.py);
- `tmp/`: partial uploads (emptied at start-up);
- `quarantine/`: files the start-up sweep found without a row and could not
  register (node/sweep.py).

Temp files of `write_durably` and cross-filesystem moves end in `.part`; the
start-up sweep removes any a crash left behind.
"""
from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path

_SAFE_NAME = re.compile(r"^[0-9A-Za-z._-]{1,64}$")


def safe_path_component(value: str) -> str:
    # UIDs and AE titles come from the network; never let one become "../x".
    value = value.strip()
    if _SAFE_NAME.match(value) and value not in {".", ".."}:
        return value
    return "h" + hashlib.sha256(value.encode("utf-8", "replace")).hexdigest()[:32]


def study_dir(root: Path, calling_ae: str, study_uid: str) -> Path:
    return Path(root) / safe_path_component(calling_ae) / safe_path_component(study_uid)


def instance_path(root: Path, calling_ae: str, study_uid: str, sop_uid: str) -> Path:
    return study_dir(root, calling_ae, study_uid) / f"{safe_path_component(sop_uid)}.dcm"


def output_path(root: Path, calling_ae: str, study_uid: str, kind: str, sop_uid: str) -> Path:
    return study_dir(root, calling_ae, study_uid) / f"{kind}-{sop_uid}.dcm"


def report_pdf_path(root: Path, calling_ae: str, study_uid: str, version: int) -> Path:
    return study_dir(root, calling_ae, study_uid) / f"report-v{int(version)}.pdf"


def display_path(root: Path, calling_ae: str, study_uid: str, version: int, sop_uid: str) -> Path:
    return study_dir(root, calling_ae, study_uid) / f"v{version}" / f"{safe_path_component(sop_uid)}.npy"


def fsync_dir(path: Path) -> None:
    # The rename itself lives in the directory entry; without this a crash
    # right after os.replace can forget the file even though its data was synced.
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def move_durably(src: Path, dst: Path) -> None:
    """Move `src` to `dst` atomically and durably, replacing any older `dst`."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    _fsync_file(src)
    try:
        os.replace(src, dst)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        # Different filesystem: copy next to the target first so the final
        # step is still an atomic same-directory rename.
        tmp = dst.with_name(f".{dst.name}.{os.getpid()}.part")
        shutil.copyfile(src, tmp)
        _fsync_file(tmp)
        os.replace(tmp, dst)
        os.unlink(src)
    fsync_dir(dst.parent)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def revision_path(base: Path, sha256: str) -> Path:
    """Where a changed re-send of `base`'s SOP instance goes: beside it, named by its content."""
    return base.with_name(f"{base.stem}.{sha256}{base.suffix}")


def place_instance(src: Path, base: Path, sha256: str) -> Path:
    """Put a received file (hashed: `sha256`) durably at `base`, or, when
    `base` holds other bytes, beside it at `revision_path`. Never overwrites:
    a hard link fails if the name exists. When the name already holds these
    very bytes (a crash between the rename and the commit, then a re-send),
    that file is used and `src` dropped. Returns the path used."""
    base.parent.mkdir(parents=True, exist_ok=True)
    _fsync_file(src)
    for candidate in (base, revision_path(base, sha256)):
        try:
            _link_no_replace(src, candidate)
        except FileExistsError:
            if candidate != base or sha256_file(candidate) == sha256:
                os.unlink(src)  # the content-named file can only hold these bytes
                return candidate
            continue
        os.unlink(src)
        fsync_dir(candidate.parent)
        return candidate
    raise AssertionError("unreachable: the content-named path always resolves")


def _link_no_replace(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        # Different filesystem: copy beside the target, then link that (still no replace).
        tmp = dst.with_name(f".{dst.name}.{os.getpid()}.part")
        shutil.copyfile(src, tmp)
        _fsync_file(tmp)
        try:
            os.link(tmp, dst)
        finally:
            os.unlink(tmp)


def write_durably(data: bytes, dst: Path) -> None:
    """Write `data` to `dst` via temp file + fsync + rename."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".part", dir=dst.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(dst.parent)


def free_mb(path: Path) -> float:
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize / (1024 * 1024)
