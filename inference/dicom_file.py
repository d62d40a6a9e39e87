"""Reading DICOM files without unbounded inflation.

pydicom reads a Deflated Explicit VR Little Endian dataset with one
`zlib.decompress` of the rest of the file, so a 1 MB file can become 1 GB in
memory before any check runs (deflate reaches ~1000:1 on uniform pixels).
Every reader of input from the network or an upload goes through here
instead: the dataset is inflated in chunks and the read stops at a byte cap.
Other transfer syntaxes go to pydicom unchanged.

Pure (zlib and pydicom): the SCP, the pipeline and the predict API share it.
"""
from __future__ import annotations

import os
import zlib
from contextlib import contextmanager
from typing import BinaryIO, Iterator

from pydicom import dcmread
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import _read_file_meta_info, read_dataset, read_preamble
from pydicom.tag import Tag

DEFLATED = "1.2.840.10008.1.2.1.99"
# 60 MP of 16-bit pixels (the decode budget, inference/decode.py) plus room for the header.
DEFAULT_MAX_INFLATED_BYTES = 128 * 2**20
# The SCP reads its few header values from at most this much of the inflated
# start; the values it needs sit in groups 0008-0020, long before any pixels.
HEADER_PREFIX_BYTES = 2**20
_READ = 1 << 16  # compressed bytes per read
_OUT = 1 << 20  # inflated bytes per zlib call: the most held at once while counting

Source = str | os.PathLike | BinaryIO


class InflateLimitExceeded(ValueError):
    """The deflated dataset inflates beyond the configured cap."""

    def __init__(self, limit: int):
        size = f"{limit // 2**20} MiB" if limit >= 2**20 else f"{limit:,} bytes"
        super().__init__(f"deflated dataset inflates beyond the {size} limit")
        self.limit = limit


@contextmanager
def _opened(source: Source) -> Iterator[BinaryIO]:
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as fp:
            yield fp
    else:
        start = source.tell()
        try:
            yield source
        finally:
            source.seek(start)


def _meta(fp: BinaryIO) -> tuple[bytes | None, FileMetaDataset]:
    """Preamble and File Meta; `fp` is left at the start of the dataset."""
    preamble = read_preamble(fp, force=True)
    return preamble, _read_file_meta_info(fp)


def is_deflated(meta: FileMetaDataset) -> bool:
    return str(meta.get("TransferSyntaxUID", "")) == DEFLATED


def inflate(fp: BinaryIO, *, limit: int, keep: int | None = None) -> tuple[bytes, int]:
    """Inflate the raw deflate stream that starts at `fp`'s position.

    Returns the first `keep` inflated bytes (all of them when None) and the
    total inflated size. Raises InflateLimitExceeded past `limit` bytes and
    zlib.error for a corrupt or truncated stream. Memory held: what is kept
    plus one chunk."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    want = limit if keep is None else min(keep, limit)
    kept = bytearray()
    total = 0
    while not inflater.eof:
        data = fp.read(_READ)
        if not data:
            break
        while True:
            # At most _OUT bytes per call; zlib keeps the rest of the input in
            # unconsumed_tail, and may hold output even when that is empty.
            out = inflater.decompress(data, _OUT)
            total += len(out)
            if total > limit:
                raise InflateLimitExceeded(limit)
            if len(kept) < want:
                kept += out[: want - len(kept)]
            data = inflater.unconsumed_tail
            if inflater.eof or (not data and len(out) < _OUT):
                break
    if not inflater.eof:
        raise zlib.error("incomplete or truncated deflate stream")
    return bytes(kept), total


def _at_pixel_data(tag, vr, length) -> bool:
    return tag in (0x7FE00010, 0x7FE00009, 0x7FE00008)


def _file_dataset(name, dataset: Dataset, preamble, meta: FileMetaDataset) -> FileDataset:
    ds = FileDataset(name, dataset, preamble, meta, is_implicit_VR=False, is_little_endian=True)
    ds.set_original_encoding(False, True, dataset._character_set)
    return ds


def _parse(inflated: bytes, *, stop_before_pixels: bool, specific_tags, stop_after_last_tag: bool = False) -> Dataset:
    fp = DicomBytesIO(inflated)
    fp.is_little_endian, fp.is_implicit_VR = True, False
    tags = [Tag(t) for t in specific_tags] if specific_tags else None
    stop_when = _at_pixel_data if stop_before_pixels else None
    if tags and stop_after_last_tag:
        last = max(tags)
        stop_when = lambda tag, vr, length: tag > last or _at_pixel_data(tag, vr, length)  # noqa: E731
    return read_dataset(fp, is_implicit_VR=False, is_little_endian=True, stop_when=stop_when, specific_tags=tags)


def dcmread_bounded(source: Source, *, max_inflated_bytes: int = DEFAULT_MAX_INFLATED_BYTES,
                    stop_before_pixels: bool = False, defer_size: str | int | None = None,
                    specific_tags: list | None = None, force: bool = False) -> FileDataset:
    """`pydicom.dcmread`, except that a Deflated dataset is inflated in chunks
    and refused (InflateLimitExceeded) beyond `max_inflated_bytes`."""
    with _opened(source) as fp:
        preamble, meta = _meta(fp)
        if is_deflated(meta):
            inflated, _ = inflate(fp, limit=max_inflated_bytes)
            dataset = _parse(inflated, stop_before_pixels=stop_before_pixels, specific_tags=specific_tags)
            name = str(source) if isinstance(source, (str, os.PathLike)) else getattr(source, "name", None)
            return _file_dataset(name, dataset, preamble, meta)
    return dcmread(source, defer_size=defer_size, stop_before_pixels=stop_before_pixels,
                   specific_tags=specific_tags, force=force)


def read_header(path: str | os.PathLike, tags: list, *, max_inflated_bytes: int = DEFAULT_MAX_INFLATED_BYTES,
                prefix_bytes: int = HEADER_PREFIX_BYTES) -> Dataset:
    """The `tags` of a received file's header, reading no pixel data.

    A Deflated dataset is inflated once, in chunks, to check its whole size
    against `max_inflated_bytes`; only its first `prefix_bytes` are kept, and
    parsed up to the last of `tags`. Raises InflateLimitExceeded, zlib.error,
    or whatever pydicom raises on a malformed header."""
    with open(path, "rb") as fp:
        preamble, meta = _meta(fp)
        if not is_deflated(meta):
            fp.seek(0)
            return dcmread(fp, stop_before_pixels=True, specific_tags=tags)
        prefix, total = inflate(fp, limit=max_inflated_bytes, keep=prefix_bytes)
    dataset = _parse(prefix, stop_before_pixels=True, specific_tags=tags, stop_after_last_tag=True)
    return _file_dataset(str(path), dataset, preamble, meta)


__all__ = ["DEFAULT_MAX_INFLATED_BYTES", "DEFLATED", "InflateLimitExceeded", "dcmread_bounded",
           "inflate", "is_deflated", "read_header"]
