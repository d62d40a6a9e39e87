"""Stand-ins for real torchxrayvision weight files, in their real format.

A torchxrayvision `.pt` is `torch.save` of a whole `xrv.models.DenseNet`
module. These helpers write exactly that, with weights derived from the demo
weights (so outputs are moderate, not saturated) and changed enough that two
"versions" give visibly different probabilities.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torchxrayvision as xrv


def write_xrv_pickle(
    path: Path,
    base_state: dict[str, torch.Tensor],
    *,
    seed: int | None = None,
    op_threshs: list[float] | None = None,
) -> tuple[Path, str]:
    """Pickle a whole xrv DenseNet with `base_state`; `seed` perturbs its classifier.

    Returns (path, SHA-256 of the file)."""
    net = xrv.models.DenseNet(weights=None)
    net.load_state_dict(base_state)
    if seed is not None:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            w = net.classifier.weight
            w.add_(torch.randn(w.shape, generator=g) * w.std() * 2.0)
            net.classifier.bias.add_(torch.randn(net.classifier.bias.shape, generator=g))
    if op_threshs is not None:
        net.op_threshs = torch.tensor(op_threshs)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net, path)
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def state_digest(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
