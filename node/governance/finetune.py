"""`carina model finetune`: a candidate trained from a registered model.

What is trained:
- on CUDA, the whole network;
- on CPU (or when CUDA is absent or fails), the last dense block, the final
  norm and the classifier. The frozen trunk's output for each training image
  is computed once, so an epoch costs only the head: minutes on two cores.
BatchNorm layers keep their running statistics (they are in eval mode while
their scale and shift train): small local batches would otherwise replace
statistics learnt on hundreds of thousands of images.

Images go through the pipeline's own decoding and preprocessing
(`decode_image`, `prepare_input`). The loss is binary cross-entropy over the
14 ChestX-ray14 outputs, counting only the pathologies each image is
labelled for. A seeded split holds out `--holdout` of the images; they are
never trained on. On them the candidate and its parent are both scored
through an `InferenceEngine` and compared per pathology: AUROC of each and a
paired-bootstrap 95 % CI of the difference. That comparison (`heldout`) is
written into the candidate's registry entry, which the activation guard
reads (node/models.py `activation_guard`); the candidate's own held-out
evaluation is recorded beside it. The candidate keeps its parent's
operating points (calibrate it to set new ones) and is never activated here.
"""
from __future__ import annotations

import copy
import logging
import math
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from inference.types import CHESTXRAY14, ModelInfo
from node.governance import metrics
from node.governance.evaluate import evaluation_record, registry_copy
from node.governance.labels import LabelledSet
from node.governance.scoring import score_set
from node.models import ModelEntry, ModelRegistry, RegistryError, current_user, utc_now_iso

log = logging.getLogger(__name__)
HEAD = ("denseblock4", "norm5")  # the part of `features` trained on CPU, with the classifier


@dataclass(frozen=True)
class Finetuned:
    entry: ModelEntry
    record: dict  # what went into the entry's `finetune`
    heldout: dict  # what went into the entry's `heldout`


def split(names: list[str], holdout: float, seed: int) -> tuple[list[str], list[str]]:
    """(training, held-out) names: a seeded permutation, at least one image in each."""
    if len(names) < 4:
        raise ValueError(f"fine-tuning needs at least 4 labelled images, found {len(names)}")
    order = np.random.default_rng(seed).permutation(len(names))
    n_hold = min(len(names) - 2, max(2, round(holdout * len(names))))
    held = {names[i] for i in order[:n_hold]}
    return [n for n in names if n not in held], [n for n in names if n in held]


def _inputs(labelled: LabelledSet, images_dir, names: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(inputs [n,1,224,224], labels [n,14], mask [n,14]) through the pipeline's decode and preprocessing."""
    from inference.engine import decode_image
    from inference.preprocess import prepare_input

    by_name = {image.name: image for image in labelled.images}
    xs, ys, ms = [], [], []
    for name in names:
        xs.append(prepare_input(decode_image(images_dir / name)).array)
        labels = by_name[name].labels
        ys.append([float(labels.get(label, 0)) for label in CHESTXRAY14])
        ms.append([float(label in labels) for label in CHESTXRAY14])
    return torch.from_numpy(np.stack(xs)), torch.tensor(ys), torch.tensor(ms)


def _masked_bce(logits: torch.Tensor, y: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    loss = F.binary_cross_entropy_with_logits(logits[:, : len(CHESTXRAY14)], y, reduction="none")
    return (loss * m).sum() / m.sum().clamp(min=1)


class _Trainer:
    """One network, trained whole (`full`) or head only on cached trunk outputs."""

    def __init__(self, module: nn.Module, device: torch.device, full: bool):
        self.module, self.device, self.full = module.to(device), device, full
        module.eval()  # BatchNorm statistics stay as learnt (see the module docstring)
        module.requires_grad_(False)
        trainable = [module] if full else [getattr(module.features, n) for n in HEAD] + [module.classifier]
        for part in trainable:
            part.requires_grad_(True)
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.trunk = nn.Sequential(*[m for n, m in module.features.named_children() if n not in HEAD])

    def prepare(self, x: torch.Tensor, batch_size: int) -> torch.Tensor:
        if self.full:
            return x
        with torch.no_grad():
            return torch.cat([self.trunk(x[i : i + batch_size].to(self.device)).cpu() for i in range(0, len(x), batch_size)])

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device)
        if self.full:
            features = self.module.features(x)
        else:
            features = self.module.features.norm5(self.module.features.denseblock4(x))
        return self.module.classifier(F.adaptive_avg_pool2d(F.relu(features), (1, 1)).flatten(1))

    def mean_loss(self, x, y, m, batch_size: int) -> float:
        with torch.no_grad():
            total = sum(float(_masked_bce(self.logits(x[i : i + batch_size]), y[i : i + batch_size].to(self.device),
                                          m[i : i + batch_size].to(self.device))) * float(m[i : i + batch_size].sum())
                        for i in range(0, len(x), batch_size))
        return total / max(float(m.sum()), 1.0)

    def train(self, x, y, m, *, epochs: int, lr: float, batch_size: int, seed: int, progress: bool) -> list[float]:
        from tqdm import tqdm

        optimiser = torch.optim.Adam(self.params, lr=lr)
        g = torch.Generator().manual_seed(seed)
        history = []
        for _ in tqdm(range(epochs), desc="fine-tuning", unit="epoch", disable=not progress, file=sys.stderr):
            order = torch.randperm(len(x), generator=g)
            total, weight = 0.0, 0.0
            for i in range(0, len(x), batch_size):
                idx = order[i : i + batch_size]
                yb, mb = y[idx].to(self.device), m[idx].to(self.device)
                loss = _masked_bce(self.logits(x[idx]), yb, mb)
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                total += float(loss) * float(mb.sum())
                weight += float(mb.sum())
            history.append(total / max(weight, 1.0))
        return history


def _train(module: nn.Module, data, *, device: str, epochs: int, lr: float, batch_size: int, seed: int,
           progress: bool) -> tuple[nn.Module, dict]:
    """Train on CUDA (whole network) when asked/available, falling back to CPU (head)."""
    x, y, m = data
    attempts = []
    if device in ("auto", "cuda") and torch.cuda.is_available():
        attempts.append((torch.device("cuda"), True))
    elif device == "cuda":
        log.warning("CUDA requested for fine-tuning but not available; training the head on CPU")
    attempts.append((torch.device("cpu"), False))
    for target, full in attempts:
        candidate = copy.deepcopy(module)
        try:
            torch.manual_seed(seed)
            trainer = _Trainer(candidate, target, full)
            cached = trainer.prepare(x, batch_size)
            before = trainer.mean_loss(cached, y, m, batch_size)
            history = trainer.train(cached, y, m, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, progress=progress)
            after = trainer.mean_loss(cached, y, m, batch_size)
        except RuntimeError as exc:  # e.g. CUDA out of memory: fall back to the CPU head
            if target.type == "cpu":
                raise
            log.warning("fine-tuning on %s failed (%s); falling back to the CPU head", target, exc)
            continue
        if not all(math.isfinite(v) for v in (after, *history)) or not all(
                torch.isfinite(p).all() for p in candidate.parameters()):
            raise ValueError(f"fine-tuning diverged (training loss {history}); nothing registered: lower --lr")
        trained = [n for n, p in candidate.named_parameters() if p.requires_grad]
        candidate.requires_grad_(False).eval().to("cpu")
        return candidate, {
            "device": target.type, "trained": "whole network" if full else "features.denseblock4, features.norm5, classifier",
            "trained_parameters": int(sum(p.numel() for n, p in candidate.named_parameters() if n in set(trained))),
            "training_loss_before": before, "training_loss_after": after, "epoch_losses": history,
        }
    raise RuntimeError("no device could fine-tune the model")


def finetune(registry: ModelRegistry, manager, parent_ref: str, labelled: LabelledSet, images_dir, *, epochs: int,
             lr: float = 1e-5, batch_size: int = 8, holdout: float = 0.25, seed: int = 0, device: str = "auto",
             version: str | None = None, resamples: int = 2000, progress: bool = True) -> Finetuned:
    """Train, compare with the parent on the held-out split, register (not activate) the candidate."""
    from pathlib import Path

    from inference import InferenceEngine, load_model
    from inference.model import DevicePlan, LoadedModel

    images_dir = Path(images_dir)
    parent = registry.get(parent_ref)
    if parent.is_ensemble:
        raise RegistryError(f"{parent.ref} is an ensemble: fine-tune its members")
    registry.verify(parent)
    names = [image.name for image in labelled.images if (images_dir / image.name).is_file()]
    train_names, held_names = split(names, holdout, seed)
    loaded = load_model(parent.weights, device="cpu")
    candidate, training = _train(loaded.module, _inputs(labelled, images_dir, train_names), device=device,
                                 epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, progress=progress)
    version = version or registry.next_version(parent.name, parent.version, "ft")

    # The held-out comparison, both models through the same engine path.
    held = labelled.subset(set(held_names))
    plan = DevicePlan(torch.device("cpu"), None, False)
    candidate_info = ModelInfo(parent.name, version, demo=parent.demo)
    parent_scores = score_set(manager.engine_for(parent.ref, "torch"), held, images_dir, progress=progress)
    cand_engine = InferenceEngine(LoadedModel(candidate, candidate_info, loaded.op_thresholds, plan))
    cand_scores = score_set(cand_engine, held, images_dir, progress=progress)
    compared, not_compared = {}, {}
    for label in CHESTXRAY14:
        y, s_new = cand_scores.column(label)
        _, s_old = parent_scores.column(label)
        row = None if len(y) == 0 else metrics.paired_auroc_difference(
            y, s_new, s_old, resamples=resamples, seed=seed + CHESTXRAY14.index(label))
        if row is None:
            not_compared[label] = "not in the labels" if label not in held.pathologies else "one class only in the held-out split"
        else:
            compared[label] = {**row, "n": int(len(y)), "positives": int(y.sum())}
    evaluation = evaluation_record(cand_scores, held, images_dir, resamples=resamples, seed=seed, backend="torch")
    heldout = {
        "images": len(held_names), "split_seed": seed, "fraction": holdout, "dataset_sha256": cand_scores.dataset_sha256,
        "resamples": resamples, "pathologies": compared, "not_compared": not_compared,
        "rule": "refuse activation where the 95 % CI of AUROC(candidate) - AUROC(parent) lies below 0",
    }
    record = {
        **training, "parent": parent.ref, "epochs": epochs, "lr": lr, "batch_size": batch_size, "seed": seed,
        "labels_sha256": labelled.sha256, "training_images": len(train_names), "heldout_images": len(held_names),
        "created_at": utc_now_iso(), "created_by": current_user(),
    }
    meta = {
        "demo": parent.demo, "op_threshs": list(parent.op_thresholds), "op_threshs_source": f"parent {parent.ref}",
        "source_sha256": None, "parent": parent.ref, "finetune": record, "heldout": heldout,
        "heldout_evaluation": registry_copy(evaluation),
    }
    entry = registry.register_weights(parent.name, version, candidate.state_dict(), meta)
    evaluation["model"] = entry.ref
    registry.record_evaluation(entry.ref, registry_copy(evaluation))
    return Finetuned(entry, record, heldout)
