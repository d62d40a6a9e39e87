"""An ensemble of models that answers like one engine.

Each member prepares the image with its own preprocessing (`prepare` keeps one
input per distinct preprocessing, so members that share one share the work)
and scores it with its own weights. The ensemble's probability for a label is
the mean of its members' sigmoid outputs; its heatmap is the mean of the
members' class activation maps (each already scaled to 0..1 per class), scaled
again so its peak is 1, which keeps the region threshold's meaning ("this
fraction of the strongest evidence"). Thresholds (operating points) are the
ensemble's own, from its registry entry: members' operating points do not
carry over to a mean.

Members' maps are averaged cell by cell, so all members must see the same
crop of the source (they do: every network here takes xrv's centre crop);
a member that did not would be refused when scoring.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from inference.engine import InferenceEngine, Scored
from inference.preprocess import ModelInput
from inference.regions import DEFAULT_LEVEL
from inference.severity import SeverityBands
from inference.types import CHESTXRAY14, DecodedImage, Heatmaps, ModelInfo


@dataclass(frozen=True)
class EnsembleInput:
    """One prepared input per distinct member preprocessing."""

    inputs: dict[tuple, ModelInput]

    @property
    def crop(self) -> tuple[int, int, int]:
        return next(iter(self.inputs.values())).crop


@dataclass(frozen=True)
class EnsembleModel:
    """What an engine reads from its model: identity, thresholds, device."""

    info: ModelInfo
    op_thresholds: tuple[float, ...]
    members: tuple[InferenceEngine, ...]

    @property
    def device(self) -> torch.device:
        return self.members[0].model.device


class EnsembleEngine(InferenceEngine):
    def __init__(
        self,
        members: list[InferenceEngine],
        info: ModelInfo,
        op_thresholds: tuple[float, ...],
        *,
        region_threshold: float = DEFAULT_LEVEL,
        max_batch: int | None = None,
        severity_bands: SeverityBands | None = None,
    ) -> None:
        if len(members) < 2:
            raise ValueError("an ensemble needs at least two members")
        if len(op_thresholds) < len(CHESTXRAY14):
            raise ValueError(f"an ensemble needs {len(CHESTXRAY14)} operating points, got {len(op_thresholds)}")
        self.members = tuple(members)
        self.model = EnsembleModel(info, tuple(op_thresholds), self.members)
        self.region_threshold = region_threshold
        self.max_batch = max(1, max_batch or min(m.max_batch for m in members))
        self.max_pixels = min(m.max_pixels for m in members)
        self.severity_bands = severity_bands or SeverityBands.from_pairs()
        self._thresholds = self.model.op_thresholds[: len(CHESTXRAY14)]
        keys = []
        for member in members:
            if member.preprocessing not in keys:
                keys.append(member.preprocessing)
        self._keys = tuple(keys)
        self.preprocessing = ("ensemble", *self._keys)

    def prepare(self, image: DecodedImage) -> EnsembleInput:
        by_key = {}
        for member in self.members:
            if member.preprocessing not in by_key:
                by_key[member.preprocessing] = member.prepare(image)
        return EnsembleInput(by_key)

    def score(self, inputs: list[EnsembleInput], source_shapes: list[tuple[int, int]]) -> list[Scored]:
        t0 = time.perf_counter()
        per_member = [
            member.score([inp.inputs[member.preprocessing] for inp in inputs], source_shapes) for member in self.members
        ]
        elapsed = (time.perf_counter() - t0) * 1000 / max(1, len(inputs))
        out = []
        for i in range(len(inputs)):
            answers = [scored[i] for scored in per_member]
            crops = {a.heatmaps.crop for a in answers}
            if len(crops) != 1:
                raise ValueError(f"ensemble members saw different crops {sorted(crops)}; their maps cannot be averaged")
            probabilities = np.mean([a.probabilities for a in answers], axis=0)
            maps = np.mean([a.heatmaps.maps for a in answers], axis=0, dtype=np.float64)
            peak = maps.max(axis=(1, 2), keepdims=True)
            maps = np.where(peak > 0, maps / np.where(peak > 0, peak, 1.0), 0.0).astype(np.float32)
            heatmaps = Heatmaps(maps=np.ascontiguousarray(maps), crop=answers[0].heatmaps.crop,
                                source_shape=tuple(source_shapes[i]))
            out.append(Scored(probabilities, heatmaps, self, {"forward": elapsed}))
        return out


def ensemble_info(name: str, version: str, members: list[ModelInfo]) -> ModelInfo:
    """The ensemble's identity: demo if any member is, and a weights digest made
    of its members' (so its Device UID changes whenever a member does)."""
    import hashlib

    digest = hashlib.sha256("\n".join(f"{m.ref}:{m.weights_sha256 or 'demo'}" for m in members).encode()).hexdigest()
    return ModelInfo(name=name, version=version, demo=any(m.demo for m in members), weights_sha256=digest,
                     members=tuple(members))
