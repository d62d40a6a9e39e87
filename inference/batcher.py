"""A long-lived inference worker that batches across callers.

Callers (pipeline workers, API requests) call `predict(images)` exactly as on
an `InferenceEngine`. What happens underneath:

* in the **caller's thread**, each image is cropped, scaled and resized
  (`engine.prepare`) and handed to the worker as soon as it is ready, so the
  caller prepares image k+1 while image k is already in a forward pass;
* the **worker thread** holds the warm model. It takes the oldest waiting
  image, then keeps collecting until it has `max_batch` images or the oldest
  has waited `max_wait_ms`, and runs one forward pass (plus CAMs) for them
  all, whoever submitted them. Under load the queue already holds a full
  batch and nobody waits at all;
* back in the caller's thread, thresholds, severities and region outlines are
  computed (`engine.assemble`), again overlapping the next forward pass.

`swap(engine)` replaces the model between two batches (the worker reads the
engine once per batch). A `predict` call whose images straddled a swap has
the stragglers scored again, so every result of one call comes from the same
weights: a study never mixes two models. An image prepared for an engine
whose preprocessing differs from the one that scores it (a swap to or from an
ensemble) is prepared again by the scoring engine.

Shadow mode: `set_shadow(engine)` puts a candidate model behind the same
queue. `predict_with_shadow` asks for both answers: each batch is scored by
the active engine and then, for the images that asked for it, by the shadow
engine on the same prepared inputs. The shadow never affects the active
model's answer: its failure is logged and its results are simply missing.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

from inference.engine import InferenceEngine, Scored
from inference.preprocess import ModelInput
from inference.types import DecodedImage, ImageResult, ModelInfo

log = logging.getLogger(__name__)

DEFAULT_MAX_WAIT_MS = 10.0
# Measured on the 2-core CPU VM (DenseNet-121, 224^2, fp32): per-image forward time is
# lowest at batch 2-4 (~28 ms) and rises beyond (batch 8: ~35, 16: ~46, 32: ~65 ms), the
# concatenations stop fitting in cache. GPUs keep gaining up to far larger batches.
AUTO_MAX_BATCH = {"cpu": 4, "cuda": 32}


def default_max_batch(device_type: str) -> int:
    """The batch size `inference.max_batch: 0` (auto) means on this kind of device."""
    return AUTO_MAX_BATCH.get(device_type, 4)


@dataclass
class _Item:
    model_input: ModelInput
    source_shape: tuple[int, int]
    image: DecodedImage  # kept to prepare again for an engine with other preprocessing
    preprocessing: tuple  # the key of the engine that prepared model_input
    shadow: bool = False  # also score with the shadow engine
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.perf_counter)


_STOP = object()


class BatcherClosed(RuntimeError):
    """The inference worker has been stopped."""


class BatchingEngine:
    def __init__(
        self,
        engine: InferenceEngine,
        *,
        max_batch: int | None = None,
        max_wait_ms: float = DEFAULT_MAX_WAIT_MS,
        name: str = "inference-worker",
    ) -> None:
        self._engine = engine
        self._shadow: InferenceEngine | None = None
        self.max_batch = max(1, max_batch or engine.max_batch)
        self.max_wait = max(0.0, max_wait_ms) / 1000.0
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._swap_lock = threading.Lock()
        self._closed = False
        # Observability (and what the tests look at).
        self.batch_sizes: Counter[int] = Counter()
        self.swaps = 0
        self.rescored = 0  # images scored again because their call straddled a swap
        # Called with (batch size, seconds) after each forward pass; the node
        # hangs its metrics here (this package never imports the node).
        self.on_batch: Callable[[int, float], None] | None = None
        self.shadow_batches = 0  # batches the shadow engine scored too
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # --- the InferenceEngine face ---------------------------------------------------

    @property
    def engine(self) -> InferenceEngine:
        return self._engine

    @property
    def model_info(self) -> ModelInfo:
        return self._engine.model_info

    @property
    def shadow_model_info(self) -> ModelInfo | None:
        shadow = self._shadow
        return None if shadow is None else shadow.model_info

    def predict(self, images: list[DecodedImage]) -> list[ImageResult]:
        return self._predict(images, shadow=False)[0]

    def predict_with_shadow(self, images: list[DecodedImage]) -> tuple[list[ImageResult], list[ImageResult] | None]:
        """The active model's results, and the shadow model's for the same images
        (None when there is no shadow, or it failed on any of them)."""
        return self._predict(images, shadow=True)

    def _predict(self, images: list[DecodedImage], *, shadow: bool) -> tuple[list[ImageResult], list[ImageResult] | None]:
        if not images:
            return [], ([] if shadow and self._shadow is not None else None)
        preparer = self._engine  # the worker prepares again if the scoring engine differs
        prepared: list[tuple[_Item, float]] = []
        for image in images:
            t0 = time.perf_counter()
            model_input = preparer.prepare(image)
            prepare_ms = (time.perf_counter() - t0) * 1000
            prepared.append((self._submit(model_input, image, preparer.preprocessing, shadow), prepare_ms))
        outcomes = [item.future.result() for item, _ in prepared]

        # A swap between two batches of this call: score the older ones again.
        while len({id(scored.engine) for scored, _, _ in outcomes}) > 1:
            target = self._engine
            redo = {i: self._submit(item.model_input, item.image, item.preprocessing, shadow)
                    for i, ((item, _), (scored, _, _)) in enumerate(zip(prepared, outcomes)) if scored.engine is not target}
            self.rescored += len(redo)
            for i, item in redo.items():
                outcomes[i] = item.future.result()

        results = [
            scored.engine.assemble(image, scored, {"preprocess": prepare_ms, "queue": queue_ms})
            for image, (_, prepare_ms), (scored, queue_ms, _) in zip(images, prepared, outcomes)
        ]
        shadows = [s for _, _, s in outcomes]
        if not shadow or any(s is None for s in shadows) or len({id(s.engine) for s in shadows}) != 1:
            return results, None
        return results, [s.engine.assemble(image, s) for image, s in zip(images, shadows)]

    # --- control ------------------------------------------------------------------------

    def swap(self, engine: InferenceEngine) -> InferenceEngine:
        """Use `engine` from the next batch on; returns the previous one."""
        with self._swap_lock:
            previous, self._engine = self._engine, engine
            self.swaps += 1
        log.info("inference worker: %s -> %s from the next batch", previous.model_info.ref, engine.model_info.ref)
        return previous

    def set_shadow(self, engine: InferenceEngine | None) -> None:
        """Score shadow requests with `engine` from the next batch on (None: stop)."""
        self._shadow = engine
        log.info("inference worker: shadow model %s", engine.model_info.ref if engine is not None else "off")

    def close(self, timeout: float = 10.0) -> None:
        """Finish what is queued, then stop the worker; later predict() calls fail."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(_STOP)
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # --- the worker -------------------------------------------------------------------------

    def _submit(self, model_input: ModelInput, image: DecodedImage, preprocessing: tuple, shadow: bool) -> _Item:
        if self._closed:
            raise BatcherClosed("the inference worker is stopped")
        item = _Item(model_input, tuple(image.source_shape), image, preprocessing, shadow)
        self._queue.put(item)
        return item

    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is _STOP:
                break
            batch = [first]
            deadline = first.enqueued + self.max_wait
            while len(batch) < self.max_batch:
                remaining = deadline - time.perf_counter()
                try:
                    item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stopping = True  # score what we have, then stop
                    break
                batch.append(item)
            self._score(batch)
        # Anything submitted after close() raced with the stop marker: fail it, never hang it.
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not _STOP:
                item.future.set_exception(BatcherClosed("the inference worker stopped"))

    def _score(self, batch: list[_Item]) -> None:
        engine = self._engine  # once per batch: a swap takes effect between batches
        started = time.perf_counter()
        try:
            inputs = [self._input_for(engine, item) for item in batch]
            scored = engine.score(inputs, [item.source_shape for item in batch])
        except BaseException as exc:  # an OOM or a device error: every caller of this batch hears of it
            log.exception("inference batch of %d failed", len(batch))
            for item in batch:
                item.future.set_exception(exc)
            return
        self.batch_sizes[len(batch)] += 1
        if self.on_batch is not None:
            try:
                self.on_batch(len(batch), time.perf_counter() - started)
            except Exception:
                log.exception("batch observer failed")
        shadowed = self._score_shadow(batch)
        for index, (item, result) in enumerate(zip(batch, scored)):
            item.future.set_result((result, (started - item.enqueued) * 1000, shadowed.get(index)))

    def _score_shadow(self, batch: list[_Item]) -> dict[int, Scored]:
        """The shadow engine's answers for the items that asked, by batch index; {} on failure."""
        shadow = self._shadow
        wanted = [i for i, item in enumerate(batch) if item.shadow]
        if shadow is None or not wanted:
            return {}
        try:
            inputs = [self._input_for(shadow, batch[i]) for i in wanted]
            scored = shadow.score(inputs, [batch[i].source_shape for i in wanted])
        except Exception:  # the candidate must never disturb the active model's answer
            log.exception("shadow model %s failed on a batch of %d; its results are left out",
                          shadow.model_info.ref, len(wanted))
            return {}
        self.shadow_batches += 1
        return dict(zip(wanted, scored))

    @staticmethod
    def _input_for(engine: InferenceEngine, item: _Item):
        if engine.preprocessing == item.preprocessing:
            return item.model_input
        return engine.prepare(item.image)  # e.g. queued before a swap to an ensemble


__all__ = ["BatchingEngine", "BatcherClosed", "Scored"]
