"""Labelled sets made in the test, where the right answer is known.

Images: seeded synthetic chest phantoms (inference.model.synthetic_chest_phantoms)
written as 8-bit PNGs. Labels: drawn from the demo model's own probabilities,
y ~ Bernoulli(p), so the model is calibrated by construction and the
population AUROC of the set is known exactly (`population_auroc`); or a
noisy threshold of them (`threshold_labels`), which makes the model a strong
predictor of its labels (for the fine-tune guard).
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from inference.engine import InferenceEngine
from inference.model import synthetic_chest_phantoms
from inference.types import CHESTXRAY14


def phantom_pngs(directory: Path, n: int, seed: int = 7, size: int = 256) -> list[str]:
    directory.mkdir(parents=True, exist_ok=True)
    images = synthetic_chest_phantoms(torch.Generator().manual_seed(seed), n, size=size)
    names = []
    for i, image in enumerate(images):
        pixels = ((image[0].numpy() + 1024.0) / 2048.0 * 255.0).round().clip(0, 255).astype(np.uint8)
        name = f"phantom{i:03d}.png"
        Image.fromarray(pixels).save(directory / name)
        names.append(name)
    return names


def model_probabilities(model, directory: Path, names: list[str]) -> np.ndarray:
    """[n, 14] probabilities of `model` (a LoadedModel) for each image, scored one by one."""
    engine = InferenceEngine(model)
    return np.array([[f.probability for f in engine.predict_file(directory / name).findings] for name in names])


def bernoulli_labels(p: np.ndarray, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).random(p.shape) < p).astype(int)


def threshold_labels(p: np.ndarray, seed: int, flip: float = 0.1) -> np.ndarray:
    """1 above each column's median, then a `flip` fraction of labels flipped (known label noise)."""
    y = (p > np.median(p, axis=0)).astype(int)
    flips = np.random.default_rng(seed).random(p.shape) < flip
    return np.where(flips, 1 - y, y)


def population_auroc(q: np.ndarray, s: np.ndarray) -> float:
    """The AUROC these scores have when image i is positive with probability q_i:
    sum over ordered pairs i != j of q_i (1 - q_j) [s_i > s_j] (1/2 for ties), normalised."""
    weight = np.outer(q, 1 - q)
    np.fill_diagonal(weight, 0.0)
    order = (s[:, None] > s[None, :]) + 0.5 * (s[:, None] == s[None, :])
    return float((weight * order).sum() / weight.sum())


def write_columns_csv(path: Path, names: list[str], labels: dict[str, list], extra: dict[str, list] | None = None) -> Path:
    """image + one column per pathology (None: empty cell, not labelled) + extra columns."""
    extra = extra or {}
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", *labels, *extra])
        for i, name in enumerate(names):
            writer.writerow([name, *("" if labels[k][i] is None else int(labels[k][i]) for k in labels),
                             *(extra[k][i] for k in extra)])
    return path


def label_index(label: str) -> int:
    return CHESTXRAY14.index(label)
