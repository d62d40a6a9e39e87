"""A labelled set scored by a model, through the pipeline's own path.

Each image is read by `inference.engine.decode_image` (DICOM, PNG or JPEG:
the decoder the node and `/api/v1/predict` use) and scored by an
`InferenceEngine` (or ensemble), which prepares it exactly as for a routed
study. There is no second decoding or preprocessing path to drift from the
one the node runs.
"""
from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from inference.types import CHESTXRAY14, ModelInfo
from node.governance.labels import LabelledSet


@dataclass(frozen=True)
class ScoredSet:
    names: tuple[str, ...]  # the images scored, in labels-file order
    probabilities: np.ndarray  # float64 [n, 14]
    thresholds: np.ndarray  # float64 [14], the model's operating points
    labels: np.ndarray  # float64 [n, 14]: 1, 0, or NaN where the image is not labelled for that pathology
    missing: tuple[str, ...]  # listed in the labels, not found under the images directory
    unreadable: tuple[tuple[str, str], ...]  # (name, reason): found but not decodable
    dataset_sha256: str  # of the labels file and every scored image's bytes
    model: ModelInfo

    def column(self, label: str) -> tuple[np.ndarray, np.ndarray]:
        """(y, s) for one pathology over the images labelled for it."""
        i = CHESTXRAY14.index(label)
        mask = ~np.isnan(self.labels[:, i])
        return self.labels[mask, i].astype(np.int8), self.probabilities[mask, i]


def dataset_digest(labels_sha256: str, files: list[tuple[str, Path]]) -> str:
    """SHA-256 over the labels file's hash and, per image in order, its name and its bytes' hash."""
    h = hashlib.sha256(labels_sha256.encode())
    for name, path in files:
        h.update(b"\0" + name.encode() + b"\0")
        h.update(hashlib.sha256(path.read_bytes()).hexdigest().encode())
    return h.hexdigest()


def score_set(engine, labelled: LabelledSet, images_dir: str | Path, *, progress: bool = True) -> ScoredSet:
    from tqdm import tqdm

    from inference.decode import DecodeError
    from inference.engine import decode_image

    images_dir = Path(images_dir)
    present, missing = [], []
    for image in labelled.images:
        path = images_dir / image.name
        (present if path.is_file() else missing).append((image, path))
    missing = [image.name for image, _ in missing]
    if not present:
        raise FileNotFoundError(f"none of the {len(labelled.images)} images of {labelled.path} is under {images_dir}")

    names, probabilities, thresholds, unreadable, files = [], [], None, [], []
    batch_size = max(1, getattr(engine, "max_batch", 4))
    bar = tqdm(total=len(present), desc=f"scoring with {engine.model_info.ref}", unit="image",
               disable=not progress, file=sys.stderr)
    for start in range(0, len(present), batch_size):
        chunk, decoded = present[start : start + batch_size], []
        for image, path in chunk:
            try:
                decoded.append((image, path, decode_image(path, max_pixels=engine.max_pixels)))
            except DecodeError as exc:
                unreadable.append((image.name, str(exc)))
        results = engine.predict([d for _, _, d in decoded]) if decoded else []
        for (image, path, _), result in zip(decoded, results):
            names.append(image.name)
            files.append((image.name, path))
            probabilities.append([f.probability for f in result.findings])
            thresholds = [f.threshold for f in result.findings]
        bar.update(len(chunk))
    bar.close()
    if not names:
        raise ValueError(f"no image of {labelled.path} under {images_dir} could be decoded: {unreadable[:3]}")
    by_name = {image.name: image for image in labelled.images}
    labels = np.array([[by_name[n].labels.get(label, np.nan) for label in CHESTXRAY14] for n in names], dtype=np.float64)
    return ScoredSet(
        names=tuple(names), probabilities=np.asarray(probabilities, dtype=np.float64),
        thresholds=np.asarray(thresholds, dtype=np.float64), labels=labels, missing=tuple(missing),
        unreadable=tuple(unreadable), dataset_sha256=dataset_digest(labelled.sha256, files), model=engine.model_info,
    )
