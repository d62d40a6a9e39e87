"""Images in, findings with heatmaps and regions out: the one entry point callers use."""
from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import torch

from inference.cam import heatmaps_for_batch
from inference.decode import DEFAULT_MAX_PIXELS, DecodeError, decode_dicom, decode_dicom_file, decode_png_or_jpeg
from inference.model import LoadedModel
from inference.preprocess import prepare_input
from inference.regions import DEFAULT_LEVEL, find_regions
from inference.types import CHESTXRAY14, DecodedImage, Finding, ImageResult, ModelInfo

DEFAULT_MAX_BATCH = 8  # on 2 CPU cores larger batches gain nothing per image and cost memory


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
    ) -> None:
        self.model = model
        self.region_threshold = region_threshold  # relative CAM level outlining a region (config name)
        self.max_batch = max(1, max_batch)
        self.max_pixels = max_pixels
        self._thresholds = model.op_thresholds[: len(CHESTXRAY14)]
        self._cam_weight = model.classifier_weight

    @property
    def model_info(self) -> ModelInfo:
        return self.model.info

    def predict(self, images: list[DecodedImage]) -> list[ImageResult]:
        results: list[ImageResult] = []
        for start in range(0, len(images), self.max_batch):
            results.extend(self._predict_batch(images[start : start + self.max_batch]))
        return results

    def predict_dicom(self, ds: pydicom.Dataset) -> ImageResult:
        t0 = time.perf_counter()
        image = decode_dicom(ds, max_pixels=self.max_pixels)
        decode_ms = (time.perf_counter() - t0) * 1000
        return _with_decode_time(self.predict([image])[0], decode_ms)

    def predict_file(self, path: str | os.PathLike) -> ImageResult:
        """A DICOM file (by its DICM preamble, else tried last) or a PNG/JPEG."""
        t0 = time.perf_counter()
        path = Path(path)
        with open(path, "rb") as f:
            is_part10 = f.read(132)[128:132] == b"DICM"
        if is_part10:
            image = decode_dicom_file(path, max_pixels=self.max_pixels)
        else:
            try:
                image = decode_png_or_jpeg(path, max_pixels=self.max_pixels)
            except DecodeError as not_an_image:
                try:  # a bare dataset without preamble and meta is still DICOM
                    image = decode_dicom_file(path, max_pixels=self.max_pixels)
                except DecodeError:
                    raise not_an_image from None
        decode_ms = (time.perf_counter() - t0) * 1000
        return _with_decode_time(self.predict([image])[0], decode_ms)

    # ---------------------------------------------------------------------------

    def _predict_batch(self, images: list[DecodedImage]) -> list[ImageResult]:
        n = len(images)
        t0 = time.perf_counter()
        inputs = [prepare_input(image) for image in images]
        t1 = time.perf_counter()
        batch = torch.from_numpy(np.stack([inp.array for inp in inputs]))
        with torch.inference_mode():
            logits, features = self.model.forward(batch)
            probabilities = torch.sigmoid(logits)[:, : len(CHESTXRAY14)].double().numpy()
            t2 = time.perf_counter()
            heatmaps = heatmaps_for_batch(
                features, self._cam_weight, [inp.crop for inp in inputs], [image.source_shape for image in images]
            )
        t3 = time.perf_counter()

        results = []
        for image, probs, maps in zip(images, probabilities, heatmaps):
            r0 = time.perf_counter()
            findings = tuple(self._finding(i, float(p), maps) for i, p in enumerate(probs))
            regions_ms = (time.perf_counter() - r0) * 1000
            timings = {
                "preprocess": (t1 - t0) * 1000 / n,
                "forward": (t2 - t1) * 1000 / n,
                "cam": (t3 - t2) * 1000 / n,
                "regions": regions_ms,
            }
            timings["total"] = sum(timings.values())
            results.append(
                ImageResult(findings=findings, heatmaps=maps, image=image, model=self.model.info, timings_ms=timings)
            )
        return results

    def _finding(self, index: int, probability: float, maps) -> Finding:
        threshold = float(self._thresholds[index])
        positive = probability >= threshold
        regions = find_regions(maps, index, level=self.region_threshold) if positive else ()
        return Finding(
            label=CHESTXRAY14[index],
            probability=probability,
            threshold=threshold,
            positive=positive,
            regions=regions,
        )


def _with_decode_time(result: ImageResult, decode_ms: float) -> ImageResult:
    timings = {**result.timings_ms, "decode": decode_ms}
    timings["total"] += decode_ms
    return replace(result, timings_ms=timings)
