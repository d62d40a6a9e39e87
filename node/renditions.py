"""Display renditions handed from the infer stage to the encode stage in memory.

The infer stage keeps each scored image's display rendition under `work/`
(node/storage.py `display_path`) for the reading app and for an encode or
capture that runs after a restart. It is kept uncompressed, as a NumPy `.npy`
array (4 MB for 2048^2): PNG, even at its fastest level, cost 0.1-0.18
core-seconds per image, as much as the forward pass and the largest single
consumer of CPU in a burst (issue 12), to save disk that the 12.5 MB source
beside it dwarfs. The reading app compresses the one picture a radiologist
opens (node/rendering.py).

The file is written on a background thread while the later stages, usually in
this same process moments later, take the pixels from here. The last stage
that draws on them waits for the file before it finishes, so once a study
version is done its renditions are on disk. If the process dies before a
write completes, the file is simply missing: the stages and the reading app
then decode the source again (their existing fallback).
"""
from __future__ import annotations

import io
import logging
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from node.storage import write_durably

log = logging.getLogger(__name__)


def rendition_bytes(picture: np.ndarray) -> bytes:
    """The `.npy` file of an 8-bit rendition (grey [h, w] or RGB [h, w, 3])."""
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.ascontiguousarray(picture, dtype=np.uint8), allow_pickle=False)
    return buffer.getvalue()


def read_rendition(path: Path) -> np.ndarray:
    """A kept rendition; never unpickles. FileNotFoundError when it is not there,
    ValueError when the file is not an 8-bit picture."""
    try:
        picture = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise
    except Exception as exc:  # cut short by a crash, or not a .npy: numpy raises several kinds
        raise ValueError(f"unreadable rendition: {type(exc).__name__}") from None
    if picture.dtype != np.uint8 or picture.ndim not in (2, 3):
        raise ValueError(f"not an 8-bit rendition: {picture.dtype} {picture.shape}")
    return picture


class Renditions:
    """Pixels kept in memory (bounded, newest first) until encode has used them."""

    def __init__(self, keep: int = 16):  # 16 renditions of 2048^2: 64 MB at most
        self._keep = keep
        self._pictures: OrderedDict[Path, tuple[np.ndarray, Future]] = OrderedDict()
        self._lock = threading.Lock()
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rendition-writer")

    def keep(self, path: Path, picture: np.ndarray) -> None:
        """Write `picture` at `path` in the background; serve it from memory meanwhile."""
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
            write_durably(rendition_bytes(picture), path)
        except Exception:  # a missing rendition is decoded again where it is needed
            log.exception("could not keep a display rendition")
