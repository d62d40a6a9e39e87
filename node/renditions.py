"""Display renditions handed from the infer stage to the encode stage in memory.

The infer stage keeps each scored image's display rendition as a PNG under
`work/` (node/storage.py `display_path`) for the reading app and for an encode
that runs after a restart. Compressing a 2048^2 rendition costs more than the
forward pass, so the PNG is written on a background thread while the encode
stage, usually in this same process moments later, takes the pixels from
here. Encode waits for the file before it finishes, so once a study version is
encoded its renditions are on disk, as before. If the process dies before a
write completes, the file is simply missing: encode and the reading app then
decode the source again (their existing fallback).
"""
from __future__ import annotations

import io
import logging
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from node.storage import write_durably

log = logging.getLogger(__name__)


def png_bytes(picture: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    # Lossless and fast: level 1 costs a fraction of a decode and halves the bytes.
    Image.fromarray(np.ascontiguousarray(picture)).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


class Renditions:
    """Pixels kept in memory (bounded, newest first) until encode has used them."""

    def __init__(self, keep: int = 16):  # 16 renditions of 2048^2: 64 MB at most
        self._keep = keep
        self._pictures: OrderedDict[Path, tuple[np.ndarray, Future]] = OrderedDict()
        self._lock = threading.Lock()
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rendition-writer")

    def keep(self, path: Path, picture: np.ndarray) -> None:
        """Write `picture` as a PNG at `path` in the background; serve it from memory meanwhile."""
        written = self._writer.submit(self._write, path, picture)
        with self._lock:
            self._pictures[path] = (picture, written)
            self._pictures.move_to_end(path)
            while len(self._pictures) > self._keep:
                self._pictures.popitem(last=False)

    def get(self, path: Path) -> np.ndarray | None:
        with self._lock:
            entry = self._pictures.get(path)
        return None if entry is None else entry[0]

    def settle(self, paths: list[Path]) -> None:
        """Wait until these renditions are on disk (or their write failed), then forget their pixels."""
        with self._lock:
            entries = [self._pictures.pop(p, None) for p in paths]
        for entry in entries:
            if entry is not None:
                entry[1].result()

    @staticmethod
    def _write(path: Path, picture: np.ndarray) -> None:
        try:
            write_durably(png_bytes(picture), path)
        except Exception:  # a missing rendition is decoded again where it is needed
            log.exception("could not keep a display rendition")
