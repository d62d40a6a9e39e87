"""The long-lived batching worker: same answers as the engine, merges callers, respects
its limits, overlaps preparation with the forward pass, swaps models between batches,
and the device plan's AMP/channels_last path."""
from __future__ import annotations

import copy
import threading
import time
from dataclasses import replace

import dicom_factory as f
import numpy as np
import pytest
import torch

from inference.batcher import BatcherClosed, BatchingEngine
from inference.decode import decode_dicom_file, decode_png_or_jpeg
from inference.engine import InferenceEngine
from inference.model import DevicePlan, LoadedModel
from inference.types import ModelInfo


@pytest.fixture(scope="module")
def engine(demo_model):
    return InferenceEngine(demo_model)


@pytest.fixture(scope="module")
def other_engine(demo_model):
    """Same architecture, different classifier: visibly different answers, another ModelInfo."""
    module = copy.deepcopy(demo_model.module)
    with torch.no_grad():
        module.classifier.weight.mul_(-1.0)
    model = LoadedModel(module, ModelInfo("densenet121-res224-all", "other-1", False, "f" * 64), demo_model.op_thresholds,
                        demo_model.plan)
    return InferenceEngine(model)


@pytest.fixture(scope="module")
def images():
    return [
        decode_png_or_jpeg(f.NIH_PNGS[0]),
        decode_png_or_jpeg(f.NIH_PNGS[1]),
        decode_dicom_file(f.SIIM_MONO2),
    ]


@pytest.fixture(scope="module")
def expected(engine, images):
    return engine.predict(images)


def probs(result) -> np.ndarray:
    return np.array([x.probability for x in result.findings])


@pytest.fixture
def batcher_factory():
    made = []

    def make(engine, **kwargs):
        b = BatchingEngine(engine, **kwargs)
        made.append(b)
        return b

    yield make
    for b in made:
        b.close()


def test_same_answers_as_the_engine_and_same_interface(engine, images, expected, batcher_factory):
    batcher = batcher_factory(engine, max_batch=8, max_wait_ms=5)
    results = batcher.predict(images)
    assert batcher.model_info is engine.model_info
    assert len(results) == len(images)
    for image, got, want in zip(images, results, expected):
        assert got.image is image and got.model == want.model
        np.testing.assert_allclose(probs(got), probs(want), atol=1e-4)
        np.testing.assert_allclose(got.heatmaps.maps, want.heatmaps.maps, atol=1e-3)
        assert [x.positive for x in got.findings] == [x.positive for x in want.findings]
        assert [x.severity for x in got.findings] == [x.severity for x in want.findings]
        assert {"preprocess", "queue", "forward", "cam", "regions", "total"} <= got.timings_ms.keys()
    assert batcher.predict([]) == []


def test_concurrent_callers_are_merged_into_shared_batches(engine, images, expected, batcher_factory):
    batcher = batcher_factory(engine, max_batch=8, max_wait_ms=400)
    callers = 6
    start = threading.Barrier(callers)
    out: dict[int, object] = {}

    def call(i: int) -> None:
        start.wait()
        out[i] = batcher.predict([images[i % len(images)]])[0]

    threads = [threading.Thread(target=call, args=(i,)) for i in range(callers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(out) == list(range(callers))
    for i, result in out.items():
        np.testing.assert_allclose(probs(result), probs(expected[i % len(images)]), atol=1e-4)
    sizes = batcher.batch_sizes
    assert sum(n * count for n, count in sizes.items()) == callers
    assert sum(sizes.values()) < callers and max(sizes) >= 3, sizes  # merged across callers


def test_max_batch_is_respected_and_order_kept(engine, images, expected, batcher_factory):
    batcher = batcher_factory(engine, max_batch=2, max_wait_ms=50)
    many = images * 3
    results = batcher.predict(many)
    assert max(batcher.batch_sizes) <= 2 and sum(n * c for n, c in batcher.batch_sizes.items()) == len(many)
    for i, result in enumerate(results):
        assert result.image is many[i]
        np.testing.assert_allclose(probs(result), probs(expected[i % len(images)]), atol=1e-4)


def test_a_full_batch_does_not_wait_for_max_wait(engine, images, batcher_factory):
    batcher = batcher_factory(engine, max_batch=2, max_wait_ms=60_000)
    started = time.monotonic()
    batcher.predict(images[:2])  # two images fill the batch: no reason to wait a minute
    assert time.monotonic() - started < 30
    assert batcher.batch_sizes == {2: 1}


def test_zero_wait_runs_a_lone_image_at_once(engine, images, batcher_factory):
    batcher = batcher_factory(engine, max_batch=8, max_wait_ms=0)
    batcher.predict(images[:1])
    assert batcher.batch_sizes == {1: 1}


def test_preparation_runs_in_the_caller_and_the_forward_in_the_worker(engine, images, batcher_factory, monkeypatch):
    seen: dict[str, set[str]] = {"prepare": set(), "score": set(), "assemble": set()}
    for step in seen:
        original = getattr(InferenceEngine, step)

        def spy(self, *args, _step=step, _original=original, **kwargs):
            seen[_step].add(threading.current_thread().name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(InferenceEngine, step, spy)
    batcher = batcher_factory(engine, max_batch=4, max_wait_ms=5, name="the-worker")
    caller = threading.current_thread().name
    batcher.predict(images)
    assert seen["prepare"] == {caller} and seen["assemble"] == {caller}
    assert seen["score"] == {"the-worker"}


def test_swap_takes_effect_between_batches_and_a_call_never_mixes_models(
    engine, other_engine, images, expected, batcher_factory
):
    batcher = batcher_factory(engine, max_batch=2, max_wait_ms=1)
    stop = threading.Event()
    mixed, calls = [], []

    def hammer() -> None:
        while not stop.is_set():
            results = batcher.predict(images)  # 3 images, max_batch 2: always at least two batches
            models = {r.model for r in results}
            calls.append(models)
            if len(models) != 1:
                mixed.append(models)

    threads = [threading.Thread(target=hammer) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for target in (other_engine, engine, other_engine):
            time.sleep(0.3)
            batcher.swap(target)
        time.sleep(0.3)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert not mixed, mixed
    assert batcher.swaps == 3
    assert {m for models in calls for m in models} == {engine.model_info, other_engine.model_info}
    after = batcher.predict(images)
    assert all(r.model == other_engine.model_info for r in after)
    direct = other_engine.predict(images)
    for got, want in zip(after, direct):
        np.testing.assert_allclose(probs(got), probs(want), atol=1e-4)
    assert np.abs(probs(after[0]) - probs(expected[0])).max() > 0.05  # really another model


def test_a_call_straddling_a_swap_is_rescored_on_the_new_model(engine, other_engine, images, batcher_factory, monkeypatch):
    batcher = batcher_factory(engine, max_batch=2, max_wait_ms=200)
    original = InferenceEngine.score
    batches = []

    def score_then_swap(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        batches.append(self.model_info.version)
        if len(batches) == 1:
            batcher.swap(other_engine)  # lands between this call's first and second batch
        return out

    monkeypatch.setattr(InferenceEngine, "score", score_then_swap)
    results = batcher.predict(images)  # 3 images, batches of 2 + 1
    assert batches[:2] == ["demo-seed0", "other-1"]
    assert batcher.rescored == 2 and all(r.model == other_engine.model_info for r in results)
    for got, want in zip(results, other_engine.predict(images)):
        np.testing.assert_allclose(probs(got), probs(want), atol=1e-4)


def test_a_failing_batch_reaches_its_callers_and_the_worker_survives(engine, images, batcher_factory, monkeypatch):
    batcher = batcher_factory(engine, max_batch=8, max_wait_ms=1)
    original = InferenceEngine.score
    failures = iter([RuntimeError("CUDA out of memory (simulated)")])

    def flaky(self, *args, **kwargs):
        exc = next(failures, None)
        if exc is not None:
            raise exc
        return original(self, *args, **kwargs)

    monkeypatch.setattr(InferenceEngine, "score", flaky)
    with pytest.raises(RuntimeError, match="simulated"):
        batcher.predict(images[:1])
    assert len(batcher.predict(images[:1])) == 1
    assert batcher.alive


def test_closed_worker_refuses_new_work(engine, images):
    batcher = BatchingEngine(engine, max_batch=4, max_wait_ms=1)
    batcher.predict(images[:1])
    batcher.close()
    assert not batcher.alive
    with pytest.raises(BatcherClosed):
        batcher.predict(images[:1])


def test_amp_and_channels_last_path_runs_on_cpu(demo_model, images, expected):
    """The CUDA plan's code path (autocast + channels_last), exercised on CPU with bf16:
    nothing in it assumes fp32 or contiguous NCHW, and the answers stay close."""
    module = copy.deepcopy(demo_model.module).to(memory_format=torch.channels_last)
    plan = DevicePlan(torch.device("cpu"), torch.bfloat16, True)
    amp = InferenceEngine(replace(demo_model, module=module, plan=plan))
    results = amp.predict(images)
    for got, want in zip(results, expected):
        assert got.heatmaps.maps.dtype == np.float32
        np.testing.assert_allclose(probs(got), probs(want), atol=0.05)  # bf16 has ~3 significant digits
