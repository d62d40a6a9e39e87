"""Crash-safe file placement: after these return, the bytes survive power loss."""
from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path


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
