"""The same network run by ONNX Runtime: export, verify, load.

The exported graph takes the xrv input `[B,1,224,224]` and returns two
outputs, the 18 logits and the post-ReLU feature map `[B,1024,7,7]`, exactly
what `LoadedModel.forward` returns, so the class activation maps (and every
heatmap and region) still come from one forward pass. An `OnnxModel` has the
`LoadedModel` face an `InferenceEngine` reads (`forward`, `info`,
`op_thresholds`, `classifier_weight`, `device`), so nothing above the engine
knows which runtime scored an image.

The `.onnx` file is a derived artifact of one safetensors file: its sidecar
(`model.onnx.json`) records the SHA-256 of both, and loading checks both, so
a graph exported from other weights (or damaged) is refused. The export
itself measures the graph against the torch model on synthetic phantoms and
refuses a graph whose probabilities differ by more than `MAX_EXPORT_DP`.

Execution providers: `providers=None` picks, among those the installed
onnxruntime build offers, TensorRT, then CUDA, then CPU. The TensorRT
provider needs the onnxruntime-gpu build and TensorRT libraries on the host;
it builds an engine per input shape on first use (seconds to minutes; enable
its engine cache with the provider option `trt_engine_cache_enable`).
"""
from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from inference.hashing import file_sha256
from inference.model import LoadedModel, WeightsError, _read_weights, synthetic_chest_phantoms
from inference.preprocess import INPUT_SIZE
from inference.types import ModelInfo

ONNX_FORMAT = "carina-onnx/1"
OPSET = 18
MAX_EXPORT_DP = 1e-4  # max |probability difference| the export accepts against torch
PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


def onnx_sidecar(path: Path) -> Path:
    return Path(str(path) + ".json")


class _Graph(nn.Module):
    """`LoadedModel.forward` as a module: logits and relu(features)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = F.relu(self.net.features(image))
        logits = self.net.classifier(F.adaptive_avg_pool2d(features, (1, 1)).flatten(1))
        return logits, features


def export_onnx(model: LoadedModel, dest: str | os.PathLike, *, weights_sha256: str) -> dict:
    """Write `model` as ONNX at `dest` (+ sidecar); returns the sidecar.

    Exported on CPU in fp32 with a dynamic batch axis (torch's dynamo
    exporter, onnxscript), then checked against torch on phantoms."""
    import onnxruntime as ort

    dest = Path(dest)
    graph = _Graph(model.module).to("cpu").eval()
    probe = synthetic_chest_phantoms(torch.Generator().manual_seed(4321), 3)
    batch = torch.export.Dim("batch", min=1, max=1024)
    with contextlib.redirect_stdout(sys.stderr):  # the exporter prints its progress; stdout is the caller's
        torch.onnx.export(
            graph, (probe,), str(dest), input_names=["image"], output_names=["logits", "features"],
            opset_version=OPSET, dynamo=True, dynamic_shapes={"image": {0: batch}}, verbose=False,
            external_data=False,  # one self-contained file: hashed, loaded from bytes
        )
    session = ort.InferenceSession(str(dest), providers=["CPUExecutionProvider"])
    logits, features = session.run(None, {"image": probe.numpy()})
    with torch.inference_mode():
        ref_logits, ref_features = graph(probe)
    dp = float(np.abs(_sigmoid(logits) - torch.sigmoid(ref_logits).numpy()).max())
    if dp > MAX_EXPORT_DP:
        dest.unlink(missing_ok=True)
        raise WeightsError(f"the ONNX graph differs from torch by max |dp| {dp:.3g} > {MAX_EXPORT_DP}; not written")
    meta = {
        "format": ONNX_FORMAT,
        "weights_sha256": weights_sha256,
        "onnx_sha256": file_sha256(dest),
        "opset": OPSET,
        "outputs": ["logits", "features"],
        "export_max_dp": dp,
        "export_max_dfeature": float(np.abs(features - ref_features.numpy()).max()),
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
        "exported_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    onnx_sidecar(dest).write_text(json.dumps(meta, indent=2) + "\n")
    for p in (dest, onnx_sidecar(dest)):
        with open(p, "rb+") as f:
            os.fsync(f.fileno())
    return meta


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x.astype(np.float64)))


def choose_providers(requested: list[str] | tuple[str, ...] | None = None) -> list[str]:
    """`requested` in order (each must be available), or the best available."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if requested:
        missing = [p for p in requested if p not in available]
        if missing:
            raise ValueError(f"onnxruntime providers {missing} are not available here (available: {available})")
        return list(requested)
    return [p for p in PREFERRED_PROVIDERS if p in available] or list(available)


@dataclass(frozen=True)
class OnnxModel:
    """A `LoadedModel` look-alike backed by an onnxruntime session."""

    session: object  # onnxruntime.InferenceSession (thread-safe for run())
    info: ModelInfo
    op_thresholds: tuple[float, ...]
    classifier_weight: torch.Tensor  # [18, 1024] fp32 on CPU, for the CAMs
    providers: tuple[str, ...]

    @property
    def device(self) -> torch.device:
        # The engine pins host memory for a CUDA torch model; ORT copies itself.
        return torch.device("cpu")

    def forward(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, features = self.session.run(None, {"image": batch.detach().cpu().numpy().astype(np.float32, copy=False)})
        return torch.from_numpy(logits), torch.from_numpy(features)


def load_onnx_model(
    onnx_path: str | os.PathLike,
    weights: str | os.PathLike,
    *,
    providers: list[str] | None = None,
    cpu_threads: int = 0,
) -> OnnxModel:
    """The graph at `onnx_path`, exported from `weights` (both hashes checked)."""
    import onnxruntime as ort

    onnx_path, weights = Path(onnx_path), Path(weights)
    try:
        meta = json.loads(onnx_sidecar(onnx_path).read_text())
    except (OSError, ValueError) as exc:
        raise WeightsError(f"{onnx_path} needs its sidecar {onnx_sidecar(onnx_path)} (export it with "
                           f"`carina model export-onnx`): {exc}") from exc
    if meta.get("format") != ONNX_FORMAT:
        raise WeightsError(f"{onnx_sidecar(onnx_path)} has format {meta.get('format')!r}, expected {ONNX_FORMAT!r}")
    data = onnx_path.read_bytes()  # hashed and loaded from the same bytes
    if hashlib.sha256(data).hexdigest() != meta["onnx_sha256"]:
        raise WeightsError(f"{onnx_path} does not have the SHA-256 its sidecar records; export it again")
    state, info, thresholds = _read_weights(weights)  # checks the weights' own hash
    if info.weights_sha256 != meta["weights_sha256"]:
        raise WeightsError(f"{onnx_path} was exported from weights {meta['weights_sha256'][:16]}…, "
                           f"not {weights} ({info.weights_sha256[:16]}…); export it again")
    options = ort.SessionOptions()
    if cpu_threads > 0:
        options.intra_op_num_threads = cpu_threads
    chosen = choose_providers(providers)
    session = ort.InferenceSession(data, sess_options=options, providers=chosen)
    return OnnxModel(session=session, info=info, op_thresholds=tuple(thresholds),
                     classifier_weight=state["classifier.weight"].detach().float().cpu().contiguous(),
                     providers=tuple(session.get_providers()))


def warm_up_onnx(model: OnnxModel, batch_sizes: tuple[int, ...] = (1,)) -> None:
    for b in batch_sizes:
        model.forward(torch.zeros(b, 1, INPUT_SIZE, INPUT_SIZE))
