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
weights: a study never mixes two models.
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
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # --- the InferenceEngine face ---------------------------------------------------

    @property
    def engine(self) -> InferenceEngine:
        return self._engine

    @property
    def model_info(self) -> ModelInfo:
        return self._engine.model_info

    def predict(self, images: list[DecodedImage]) -> list[ImageResult]:
        if not images:
            return []
        preparer = self._engine  # preprocessing does not depend on the weights
        prepared: list[tuple[_Item, float]] = []
        for image in images:
            t0 = time.perf_counter()
            model_input = preparer.prepare(image)
            prepare_ms = (time.perf_counter() - t0) * 1000
            prepared.append((self._submit(model_input, image.source_shape), prepare_ms))
        outcomes = [item.future.result() for item, _ in prepared]

        # A swap between two batches of this call: score the older ones again.
        while len({id(scored.engine) for scored, _ in outcomes}) > 1:
            target = self._engine
            redo = {i: self._submit(item.model_input, item.source_shape)
                    for i, ((item, _), (scored, _)) in enumerate(zip(prepared, outcomes)) if scored.engine is not target}
            self.rescored += len(redo)
            for i, item in redo.items():
                outcomes[i] = item.future.result()

        return [
            scored.engine.assemble(image, scored, {"preprocess": prepare_ms, "queue": queue_ms})
            for image, (_, prepare_ms), (scored, queue_ms) in zip(images, prepared, outcomes)
        ]

    # --- control ------------------------------------------------------------------------

    def swap(self, engine: InferenceEngine) -> InferenceEngine:
        """Use `engine` from the next batch on; returns the previous one."""
        with self._swap_lock:
            previous, self._engine = self._engine, engine
            self.swaps += 1
        log.info("inference worker: %s -> %s from the next batch", previous.model_info.ref, engine.model_info.ref)
        return previous

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

    def _submit(self, model_input: ModelInput, source_shape: tuple[int, int]) -> _Item:
        if self._closed:
            raise BatcherClosed("the inference worker is stopped")
        item = _Item(model_input, tuple(source_shape))
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
            scored = engine.score([item.model_input for item in batch], [item.source_shape for item in batch])
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
        for item, result in zip(batch, scored):
            item.future.set_result((result, (started - item.enqueued) * 1000))


__all__ = ["BatchingEngine", "BatcherClosed", "Scored"]
