"""What a reading-app upload holds: one image, or a zip of images, bounded.

Nothing is ever extracted to disk: members are read into memory one at a
time, each scored and dropped. A hostile archive is refused before anything
is scored when what it declares is out of bounds:

- more than `max_members` files, or a name that is absolute, climbs out with
  `..`, uses a drive letter or backslashes, or holds a NUL (path traversal);
- an encrypted member;
- declared sizes over `max_total_mb` in all, or a member over the single-image
  limit, or a member over 1 MB declaring more than `max_ratio` times its
  compressed size (a zip bomb).

Declared sizes can lie, so reading is capped too: a member yielding more
bytes than the single-image limit, or an archive yielding more than
`max_total_mb`, stops there (the member is reported, the rest skipped). An
archive inside the archive is not opened. macOS resource forks (`__MACOSX/`,
`._*`) are skipped.
"""
from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import BinaryIO, Iterator

MB = 1024 * 1024
RATIO_CHECK_MIN_BYTES = 1 * MB
ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")  # a local file header; an empty archive's end record


class ArchiveRefused(ValueError):
    """The zip is refused as a whole; the message says why."""


@dataclass(frozen=True)
class Limits:
    member_bytes: int  # one image (inference.predict_max_upload_mb)
    max_members: int
    total_bytes: int  # all members, uncompressed
    max_ratio: float

    @classmethod
    def from_settings(cls, settings) -> "Limits":
        upload = settings.ui.upload
        return cls(int(settings.inference.predict_max_upload_mb * MB), upload.max_members,
                   int(upload.max_total_mb * MB), upload.max_ratio)


@dataclass(frozen=True)
class Member:
    name: str
    data: bytes = b""
    problem: str = ""  # why it was not read (the rest of the archive still is)


def is_zip(head: bytes) -> bool:
    return head[:4] in ZIP_MAGICS


def _junk(name: str) -> bool:
    path = PurePosixPath(name)
    return name.startswith("__MACOSX/") or path.name.startswith("._") or path.name == ".DS_Store"


def unsafe_name(name: str) -> bool:
    """True for a member name that would escape a directory it were extracted to."""
    if not name or "\x00" in name or "\\" in name or name.startswith("/"):
        return True
    if len(name) > 1 and name[1] == ":":  # C:foo, a drive letter
        return True
    return any(part == ".." for part in PurePosixPath(name).parts)


def open_archive(fileobj: BinaryIO, limits: Limits) -> tuple[int, Iterator[Member]]:
    """(number of images, their members read lazily); ArchiveRefused for a bad archive."""
    try:
        archive = zipfile.ZipFile(fileobj)
        infos = [i for i in archive.infolist() if not i.is_dir() and not _junk(i.filename)]
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError) as exc:
        raise ArchiveRefused(f"not a readable zip archive: {exc}") from None
    if not infos:
        raise ArchiveRefused("the zip archive holds no files")
    if len(infos) > limits.max_members:
        raise ArchiveRefused(f"the zip archive holds {len(infos)} files; at most {limits.max_members} "
                             "(ui.upload.max_members)")
    for info in infos:
        if unsafe_name(info.filename):
            raise ArchiveRefused(f"member name {info.filename[:120]!r} is not a plain relative path (path traversal)")
        if info.flag_bits & 0x1:
            raise ArchiveRefused(f"member {info.filename[:120]!r} is encrypted")
        if info.file_size > limits.member_bytes:
            raise ArchiveRefused(f"member {info.filename[:120]!r} declares {info.file_size:,} bytes; one image is at "
                                 f"most {limits.member_bytes:,} (inference.predict_max_upload_mb)")
        if info.file_size > RATIO_CHECK_MIN_BYTES and info.file_size > limits.max_ratio * max(info.compress_size, 1):
            raise ArchiveRefused(f"member {info.filename[:120]!r} inflates {info.file_size / max(info.compress_size, 1):.0f}"
                                 f"-fold; at most {limits.max_ratio:g} (ui.upload.max_ratio): a zip bomb")
    declared = sum(i.file_size for i in infos)
    if declared > limits.total_bytes:
        raise ArchiveRefused(f"the zip archive declares {declared:,} bytes uncompressed; at most "
                             f"{limits.total_bytes:,} (ui.upload.max_total_mb)")
    return len(infos), _read(archive, infos, limits)


def _read(archive: zipfile.ZipFile, infos: list[zipfile.ZipInfo], limits: Limits) -> Iterator[Member]:
    total = 0
    with archive:
        for n, info in enumerate(infos):
            name = info.filename
            if total >= limits.total_bytes:
                yield Member(name, problem="not read: the archive already gave ui.upload.max_total_mb")
                continue
            try:
                with archive.open(info) as member:
                    head = member.read(4)
                    if is_zip(head):
                        yield Member(name, problem="a zip inside the zip is not opened")
                        continue
                    cap = min(limits.member_bytes, limits.total_bytes - total)
                    data = head + member.read(cap + 1 - len(head))
            except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError) as exc:
                yield Member(name, problem=f"cannot read this member: {type(exc).__name__}: {exc}")
                continue
            total += len(data)
            if len(data) > cap:
                # It inflated past what it declared: stop reading this archive's lies here.
                yield Member(name, problem="inflates beyond its declared size and the limits; refused (zip bomb)")
                for rest in infos[n + 1:]:
                    yield Member(rest.filename, problem="not read: an earlier member of this archive was a zip bomb")
                return
            yield Member(name, data)
