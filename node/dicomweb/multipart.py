"""multipart/related, both ways, with bounded memory.

In: `PartWriter` is fed the request body chunk by chunk (python-multipart's
streaming `MultipartParser` finds the boundaries) and writes each part to its
own temp file, so a 2 GB STOW-RS request holds one chunk in memory, never a
part. A part past `max_part_bytes` is drained without being written and comes
out marked too large; the request's total is the caller's to cap.

Out: `stream_parts` yields a multipart/related body from files, read in
chunks, for WADO-RS and STOW-RS out.
"""
from __future__ import annotations

import os
import secrets
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator

from python_multipart.multipart import MultipartParser, parse_options_header

CHUNK = 1 << 16


class BadMultipart(ValueError):
    """The body is not the multipart/related it claims to be."""


def media_type(content_type: str) -> tuple[str, dict[str, str]]:
    """("multipart/related", {"type": "application/dicom", "boundary": ...}), lower-cased type."""
    value, options = parse_options_header(content_type or "")
    params = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in options.items()}
    return value.decode("latin-1").lower().strip(), params


@dataclass
class Part:
    """One received part: its headers (lower-case names), its temp file, its size."""

    headers: dict[str, str] = field(default_factory=dict)
    path: Path | None = None
    size: int = 0
    too_large: bool = False

    @property
    def content_type(self) -> str:
        return media_type(self.headers.get("content-type", ""))[0]

    def discard(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)


class PartWriter:
    """Feed it the body; collect the finished parts from `done()` after each `feed`."""

    def __init__(self, boundary: str, tmp_dir: Path, max_part_bytes: int):
        if not boundary:
            raise BadMultipart("multipart/related without a boundary parameter")
        self.tmp_dir, self.max_part_bytes = Path(tmp_dir), max_part_bytes
        self._finished: list[Part] = []
        self._part: Part | None = None
        self._file: BinaryIO | None = None
        self._field = self._value = b""
        self.ended = False
        try:
            self._parser = MultipartParser(boundary, callbacks={
                "on_part_begin": self._begin, "on_header_field": self._header_field,
                "on_header_value": self._header_value, "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished, "on_part_data": self._data,
                "on_part_end": self._end, "on_end": self._on_end,
            })
        except Exception as exc:
            raise BadMultipart(f"unusable boundary: {exc}") from exc

    # -- feeding ------------------------------------------------------------------------
    def feed(self, chunk: bytes) -> None:
        try:
            self._parser.write(chunk)
        except Exception as exc:  # MultipartParseError and friends: the framing is broken
            self.abort()
            raise BadMultipart(f"malformed multipart body: {type(exc).__name__}") from exc

    def finish(self) -> None:
        """The body ended: complain if its last part was cut off."""
        if not self.ended:
            self.abort()
            raise BadMultipart("the multipart body ended before its closing boundary")

    def done(self) -> list[Part]:
        """Parts finished since the last call, in order; the caller owns their files."""
        finished, self._finished = self._finished, []
        return finished

    def abort(self) -> None:
        """Drop the part being written (its file) and any finished part not yet collected."""
        self._close_file()
        if self._part is not None:
            self._part.discard()
            self._part = None
        for part in self.done():
            part.discard()

    # -- parser callbacks ----------------------------------------------------------------
    def _begin(self) -> None:
        self._part = Part()

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        name = self._field.decode("latin-1").strip().lower()
        self._part.headers[name] = self._value.decode("latin-1").strip()
        self._field = self._value = b""

    def _headers_finished(self) -> None:
        fd, name = tempfile.mkstemp(prefix="stow-", suffix=".part", dir=self.tmp_dir)
        self._file = os.fdopen(fd, "wb")
        self._part.path = Path(name)

    def _data(self, data: bytes, start: int, end: int) -> None:
        part = self._part
        part.size += end - start
        if part.size > self.max_part_bytes:
            if not part.too_large:  # drain the rest without keeping it
                part.too_large = True
                self._close_file()
                part.discard()
                part.path = None
            return
        self._file.write(data[start:end])

    def _end(self) -> None:
        self._close_file()
        if self._part is not None:
            self._finished.append(self._part)
            self._part = None

    def _on_end(self) -> None:
        self.ended = True

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def new_boundary() -> str:
    return f"carina-{secrets.token_hex(16)}"


def stream_parts(parts: Iterable[tuple[Path, str]], boundary: str) -> Iterator[bytes]:
    """A multipart/related body of (file, its Content-Type) pairs, read in chunks."""
    for path, content_type in parts:
        yield f"--{boundary}\r\nContent-Type: {content_type}\r\n\r\n".encode()
        with open(path, "rb") as fh:
            while chunk := fh.read(CHUNK):
                yield chunk
        yield b"\r\n"
    yield f"--{boundary}--\r\n".encode()


def parts_length(parts: Iterable[tuple[Path, str]], boundary: str) -> int:
    """The byte length of `stream_parts(parts, boundary)`, for a Content-Length
    (some servers refuse a chunked request body)."""
    total = len(f"--{boundary}--\r\n")
    for path, content_type in parts:
        total += len(f"--{boundary}\r\nContent-Type: {content_type}\r\n\r\n".encode()) + path.stat().st_size + 2
    return total


def body_parts(body: bytes, boundary: str) -> list[tuple[dict[str, str], bytes]]:
    """Parse a small multipart body in memory (a peer's response, a test): [(headers, data)]."""
    with tempfile.TemporaryDirectory() as tmp:
        writer = PartWriter(boundary, Path(tmp), max_part_bytes=len(body) + 1)
        writer.feed(body)
        writer.finish()
        out = []
        for part in writer.done():
            out.append((part.headers, part.path.read_bytes() if part.path else b""))
            part.discard()
        return out
