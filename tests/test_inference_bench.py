"""bench/inference.py runs and prints the documented JSON (figures are not asserted: shared VM)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from inference.model import save_safetensors

REPO = Path(__file__).resolve().parents[1]


def test_bench_smoke_run_prints_valid_json(demo_model, tmp_path):
    weights = save_safetensors(demo_model, tmp_path / "demo.safetensors")  # skips rebuilding demo weights
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "inference.py"), "--tiny", "--weights", str(weights), "--clients", "2"],
        capture_output=True, text=True, timeout=300, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    for side in ("carina", "reference"):
        figures = result[side]
        assert figures["decode_preprocess_ms_per_image"] > 0 and figures["cam_ms_per_image"] > 0
        assert set(figures["forward_ms_per_image"]) == {"1", "2"}
        assert all(v > 0 for v in figures["forward_ms_per_image"].values())
        assert figures["end_to_end_images_per_s"] > 0 and figures["cpu_ms_per_image_end_to_end"] > 0
    assert result["carina"]["regions_ms_per_image"] > 0
    batches = result["carina"]["batch_sizes_last_round"]
    assert sum(int(size) * count for size, count in batches.items()) == 4  # every image went through the batcher
    expected = result["carina"]["end_to_end_images_per_s"] / result["reference"]["end_to_end_images_per_s"]
    assert abs(result["ratio_carina_over_reference"]["end_to_end_images_per_s"] - expected) <= 0.05 * expected
    assert result["setup"]["weights"] == "densenet121-res224-all@demo-seed0 (demo)"
    assert len(result["setup"]["images"]) == 4 and result["setup"]["images_per_round"] == 4
