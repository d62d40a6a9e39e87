"""ONNX Runtime against torch for Carina's model, in one run; prints JSON and writes it to
bench/results/onnx-YYYYMMDD-HHMMSS.json (UTC), with the machine.

    .venv/bin/python bench/onnx_runtime.py          # a minute or two on 2 cores
    .venv/bin/python bench/onnx_runtime.py --tiny   # a smoke run

The same weights (demo, or --weights FILE.safetensors) are exported with
`inference.onnx_backend.export_onnx` (what `carina model export-onnx` runs) and
scored by two `InferenceEngine`s that differ only in their model: torch
(`load_model`) and ONNX Runtime on the CPU provider (`load_onnx_model`). Both
engines get the same prepared inputs (the shared samples and seeded phantoms),
so the figures compare the forward pass plus CAMs (`engine.score`), per batch
size, best of --repeats; and whole `predict` calls (preparation included).
Also reported: max |dp| between the two over all images (the fidelity the
README states). Ratios are ONNX Runtime / torch images per second, computed
from the reported (rounded) rates. No figure here is asserted by a test.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # before bench/ (this script's own directory, where `record` is found)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", help="a .safetensors (with sidecar) instead of the demo weights")
    parser.add_argument("--phantoms", type=int, default=12, help="seeded phantom images besides the shared samples")
    parser.add_argument("--batch-sizes", default="1,4")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tiny", action="store_true", help="batch size 1, 2 repeats, 2 phantoms: a smoke run")
    parser.add_argument("--results-dir", help="where the JSON file goes (default bench/results; '' = print only)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.phantoms, args.repeats, args.batch_sizes = 2, 2, "1"

    import numpy as np
    import onnxruntime as ort
    import torch

    from inference import InferenceEngine, load_model, warm_up
    from inference.engine import decode_image
    from inference.model import synthetic_chest_phantoms
    from inference.onnx_backend import export_onnx, load_onnx_model, warm_up_onnx
    from inference.types import DecodedImage
    from record import best_ms, machine, now_utc, write_result

    started_at = now_utc()
    torch_model = load_model(args.weights, device="cpu")
    data = REPO / "tests" / "data"
    images = [decode_image(p) for p in sorted(data.glob("nih_*.png")) + sorted(data.glob("siim_*.dcm"))]
    for phantom in synthetic_chest_phantoms(torch.Generator().manual_seed(3), args.phantoms, size=512):
        pixels = ((phantom[0].numpy() + 1024.0) / 2048.0 * 255.0).astype(np.float32)
        images.append(DecodedImage(pixels=pixels, maxval=255.0, source_shape=pixels.shape))

    with tempfile.TemporaryDirectory(prefix="carina-onnx-bench-") as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        weights = Path(tmp) / "model.safetensors"
        from inference.model import save_safetensors

        save_safetensors(torch_model, weights)
        meta = export_onnx(torch_model, onnx_path, weights_sha256=json.loads(weights.with_suffix(".json").read_text())["sha256"])
        onnx_model = load_onnx_model(onnx_path, weights, providers=["CPUExecutionProvider"])
        batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
        engines = {"torch": InferenceEngine(torch_model, max_batch=max(batch_sizes)),
                   "onnxruntime": InferenceEngine(onnx_model, max_batch=max(batch_sizes))}
        warm_up(torch_model, tuple(batch_sizes))
        warm_up_onnx(onnx_model, tuple(batch_sizes))
        inputs = [engines["torch"].prepare(image) for image in images]
        shapes = [image.source_shape for image in images]

        forward = {}
        for b in batch_sizes:
            chunks = [(inputs[i : i + b], shapes[i : i + b]) for i in range(0, len(inputs) - b + 1, b)]
            n = sum(len(c) for c, _ in chunks)
            for name, engine in engines.items():
                ms = best_ms(lambda: [engine.score(c, s) for c, s in chunks], args.repeats)
                forward.setdefault(str(b), {})[name] = {"images_per_s": round(n / ms * 1000, 2), "ms_per_image": round(ms / n, 2)}
            f = forward[str(b)]
            f["ratio_onnxruntime_over_torch"] = round(f["onnxruntime"]["images_per_s"] / f["torch"]["images_per_s"], 3)

        predict = {}
        for name, engine in engines.items():
            ms = best_ms(lambda: engine.predict(images), args.repeats)
            predict[name] = {"images_per_s": round(len(images) / ms * 1000, 2)}
        predict["ratio_onnxruntime_over_torch"] = round(
            predict["onnxruntime"]["images_per_s"] / predict["torch"]["images_per_s"], 3)

        ours = engines["onnxruntime"].predict(images)
        theirs = engines["torch"].predict(images)
        dp = max(abs(a.probability - b.probability) for x, y in zip(ours, theirs) for a, b in zip(x.findings, y.findings))

    result = {
        "bench": "onnx",
        "date": started_at.isoformat().replace("+00:00", "Z"),
        "machine": machine(),
        "torch": torch.__version__, "onnxruntime": ort.__version__, "torch_threads": torch.get_num_threads(),
        "providers": list(onnx_model.providers),
        "weights": args.weights or "demo-seed0",
        "images": len(images),
        "export_max_dp": meta["export_max_dp"],
        "max_dp_onnxruntime_vs_torch": dp,
        "forward_and_cam_by_batch_size": forward,
        "predict_whole_set": predict,
        "load_average": list(os.getloadavg()),
    }
    print(json.dumps(result, indent=2))
    write_result("onnx", result, args.results_dir, started_at)
    return 0


if __name__ == "__main__":
    sys.exit(main())
