"""Images in, findings with heatmaps and regions out: the one entry point callers use.

The work for one image is split into three steps so that a batcher can run
them on different threads (see `inference.batcher`):

1. `prepare`: crop, scale and resize (CPU, any thread);
2. `score`: the forward pass and the class activation maps of a whole batch
   (the model's device; serialised by a lock, so the engine is thread-safe);
3. `assemble`: thresholds, severity grades and region outlines (CPU, any thread).

`predict` runs the three in a row for callers that need no batching.
"""
from __future__ import annotations

import io
import os
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pydicom
import torch

from inference.cam import heatmaps_for_batch
from inference.dicom_file import InflateLimitExceeded, dcmread_bounded
from inference.decode import DEFAULT_MAX_PIXELS, DecodeError, decode_dicom, decode_dicom_file, decode_png_or_jpeg
from inference.model import LoadedModel
from inference.preprocess import INPUT_SIZE, ModelInput, prepare_input
from inference.regions import DEFAULT_LEVEL, find_regions
from inference.severity import SeverityBands
from inference.types import CHESTXRAY14, DecodedImage, Finding, Heatmaps, ImageResult, ModelInfo

DEFAULT_MAX_BATCH = 8  # on 2 CPU cores larger batches gain nothing per image and cost memory


@dataclass(frozen=True)
class Scored:
    """The model's raw answer for one image of a batch, before thresholds and regions."""

    probabilities: np.ndarray  # float64 [14], sigmoid of the logits
    heatmaps: Heatmaps
    engine: "InferenceEngine"  # which weights produced it (a batcher may swap engines)
    timings_ms: dict[str, float] = field(default_factory=dict)  # this image's share of the batch


class InferenceEngine:
    """Runs a loaded model on decoded images.

    `timings_ms` of each result: "preprocess", "forward" (the batch's forward
    pass divided by its size), "cam", "regions", "total" per image, plus
    "decode" from the predict_dicom/predict_file conveniences.
    """

    def __init__(
        self,
        model: LoadedModel,
        *,
        region_threshold: float = DEFAULT_LEVEL,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        severity_bands: SeverityBands | None = None,
    ) -> None:
        self.model = model
        self.region_threshold = region_threshold  # relative CAM level outlining a region (config name)
        self.max_batch = max(1, max_batch)
        self.max_pixels = max_pixels
        self.severity_bands = severity_bands or SeverityBands.from_pairs()
        self._thresholds = model.op_thresholds[: len(CHESTXRAY14)]
        self._cam_weight = model.classifier_weight
        # torch modules are not documented as safe to call from several threads at once.
        self._lock = threading.Lock()

    @property
    def model_info(self) -> ModelInfo:
        return self.model.info

    # Which input `prepare` makes: a batcher re-prepares an image queued for an
    # engine whose key differs (e.g. across a swap to an ensemble). Every
    # DenseNet-121 here (torch or ONNX Runtime) sees the same xrv 224 input.
    preprocessing: tuple = ("xrv", INPUT_SIZE)

    # --- the three steps ----------------------------------------------------------

    def prepare(self, image: DecodedImage) -> ModelInput:
        return prepare_input(image)

    def score(self, inputs: list[ModelInput], source_shapes: list[tuple[int, int]]) -> list[Scored]:
        """Forward pass and CAMs for one batch (at most `max_batch` is the caller's business)."""
        n = len(inputs)
        batch = torch.from_numpy(np.stack([inp.array for inp in inputs]))
        if self.model.device.type == "cuda":
            batch = batch.pin_memory()  # lets the host-to-device copy run asynchronously
        with self._lock, torch.inference_mode():
            t0 = time.perf_counter()
            logits, features = self.model.forward(batch)
            probabilities = torch.sigmoid(logits)[:, : len(CHESTXRAY14)].double().numpy()
            t1 = time.perf_counter()
            heatmaps = heatmaps_for_batch(features, self._cam_weight, [inp.crop for inp in inputs], source_shapes)
            t2 = time.perf_counter()
        share = {"forward": (t1 - t0) * 1000 / n, "cam": (t2 - t1) * 1000 / n}
        return [Scored(p, maps, self, dict(share)) for p, maps in zip(probabilities, heatmaps)]

    def assemble(self, image: DecodedImage, scored: Scored, timings_ms: dict[str, float] | None = None) -> ImageResult:
        """Thresholds, severity and regions for one scored image (must be this engine's)."""
        if scored.engine is not self:
            raise ValueError("scored by another engine; assemble with scored.engine")
        r0 = time.perf_counter()
        findings = tuple(self._finding(i, float(p), scored.heatmaps) for i, p in enumerate(scored.probabilities))
        timings = {**(timings_ms or {}), **scored.timings_ms, "regions": (time.perf_counter() - r0) * 1000}
        timings["total"] = sum(timings.values())
        return ImageResult(findings=findings, heatmaps=scored.heatmaps, image=image, model=self.model.info, timings_ms=timings)

    # --- synchronous conveniences ---------------------------------------------------

    def predict(self, images: list[DecodedImage]) -> list[ImageResult]:
        results: list[ImageResult] = []
        for start in range(0, len(images), self.max_batch):
            chunk = images[start : start + self.max_batch]
            t0 = time.perf_counter()
            inputs = [self.prepare(image) for image in chunk]
            preprocess_ms = (time.perf_counter() - t0) * 1000 / len(chunk)
            scored = self.score(inputs, [image.source_shape for image in chunk])
            results.extend(self.assemble(image, s, {"preprocess": preprocess_ms}) for image, s in zip(chunk, scored))
        return results

    def predict_dicom(self, ds: pydicom.Dataset) -> ImageResult:
        t0 = time.perf_counter()
        image = decode_dicom(ds, max_pixels=self.max_pixels)
        decode_ms = (time.perf_counter() - t0) * 1000
        return _with_decode_time(self.predict([image])[0], decode_ms)

    def predict_file(self, path: str | os.PathLike) -> ImageResult:
        """A DICOM file (by its DICM preamble, else tried last) or a PNG/JPEG."""
        t0 = time.perf_counter()
        image = decode_image(Path(path), max_pixels=self.max_pixels)
        decode_ms = (time.perf_counter() - t0) * 1000
        return _with_decode_time(self.predict([image])[0], decode_ms)

    # ---------------------------------------------------------------------------

    def _finding(self, index: int, probability: float, maps: Heatmaps) -> Finding:
        threshold = float(self._thresholds[index])
        positive = probability >= threshold
        regions = find_regions(maps, index, level=self.region_threshold) if positive else ()
        return Finding(
            label=CHESTXRAY14[index],
            probability=probability,
            threshold=threshold,
            positive=positive,
            regions=regions,
            severity=self.severity_bands.grade(probability, threshold),
        )


# --- format sniffing ------------------------------------------------------------------

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"


def sniff_format(head: bytes) -> str | None:
    """'dicom', 'png', 'jpeg' or None, from the first 132+ bytes of a file.

    A DICOM file has 'DICM' after its 128-byte preamble; a bare dataset (no
    preamble, no file meta) starts with a group 0x0002 or 0x0008 tag, little endian.
    """
    if head[128:132] == b"DICM":
        return "dicom"
    if head.startswith(PNG_MAGIC):
        return "png"
    if head.startswith(JPEG_MAGIC):
        return "jpeg"
    if head[:2] in (b"\x02\x00", b"\x08\x00") and len(head) >= 8:
        return "dicom"
    return None


def decode_image(source: bytes | str | os.PathLike, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedImage:
    """A DICOM (Part 10 or bare), PNG or JPEG, from bytes or a path; DecodeError otherwise."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        kind = sniff_format(data[:256])
        if kind == "dicom":
            try:
                ds = dcmread_bounded(io.BytesIO(data), force=True)  # Deflated: inflated in chunks, capped
            except InflateLimitExceeded as exc:
                raise DecodeError(str(exc)) from exc
            except Exception as exc:
                raise DecodeError(f"not a readable DICOM file: {exc}") from exc
            return decode_dicom(ds, max_pixels=max_pixels)
        return decode_png_or_jpeg(data, max_pixels=max_pixels)
    path = Path(source)
    with open(path, "rb") as f:
        head = f.read(256)
    if head[128:132] == b"DICM":
        return decode_dicom_file(path, max_pixels=max_pixels)
    try:
        return decode_png_or_jpeg(path, max_pixels=max_pixels)
    except DecodeError as not_an_image:
        try:  # a bare dataset without preamble and meta is still DICOM
            return decode_dicom_file(path, max_pixels=max_pixels)
        except DecodeError:
            raise not_an_image from None


def _with_decode_time(result: ImageResult, decode_ms: float) -> ImageResult:
    timings = {**result.timings_ms, "decode": decode_ms}
    timings["total"] += decode_ms
    return replace(result, timings_ms=timings)
