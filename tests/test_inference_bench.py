"""bench/inference.py in a tiny configuration: the JSON it prints and writes is complete and
consistent. No figure is asserted against a bound: timings belong to the bench, not to tests."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from inference.model import save_safetensors

REPO = Path(__file__).resolve().parents[1]


def positive(value) -> bool:
    return isinstance(value, (int, float)) and value > 0


def test_bench_tiny_run_prints_and_writes_consistent_json(demo_model, tmp_path):
    weights = save_safetensors(demo_model, tmp_path / "demo.safetensors")  # skips rebuilding demo weights
    results = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "inference.py"), "--tiny", "--weights", str(weights),
         "--clients", "2", "--results-dir", str(results)],
        capture_output=True, text=True, timeout=600, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)

    # The file under the results directory, named by the UTC start time, holds what was printed.
    (written,) = results.glob("inference-*.json")
    stamp = result["date"].replace("-", "").replace(":", "").replace("T", "-").rstrip("Z")
    assert written.name == f"inference-{stamp}.json"
    assert json.loads(written.read_text()) == result

    machine = result["machine"]
    assert machine["hostname"] and machine["cpu_model"]
    assert machine["cores"] == os.cpu_count() and 1 <= machine["cores_usable"] <= machine["cores"]

    setup = result["setup"]
    assert setup["weights"] == "densenet121-res224-all@demo-seed0 (demo)"
    assert len(setup["images"]) == 4 and setup["images_per_round"] == 4 and setup["rounds"] == 1
    assert setup["carina_clients_loaded"] == 2

    # The reference is xrv's own forward: model(x) ran once per image of every timed round,
    # and its CAMs come from that same forward's relu(features).
    reference = result["reference"]
    assert "model(x)" in setup["reference"] and "read_xray_dcm" in setup["reference"]
    assert reference["model_calls_per_round"] == [setup["images_per_round"]] * setup["rounds"]
    assert reference["cam_from_the_same_forward_max_abs_dp"] <= 1e-5

    carina = result["carina"]
    for side in (carina, reference):
        assert positive(side["decode_preprocess_ms_per_image"]) and positive(side["cam_ms_per_image"])
        assert set(side["forward_ms_per_image"]) == {"1", "2"}
        assert all(positive(v) for v in side["forward_ms_per_image"].values())
    assert positive(carina["regions_ms_per_image"])
    assert positive(reference["images_per_s"]) and positive(reference["cpu_ms_per_image"])
    assert reference["images_per_s"] == max(reference["rounds_images_per_s"])
    for mode, clients in (("one_client", 1), ("loaded", 2)):
        figures = carina[mode]
        assert positive(figures["images_per_s"]) and positive(figures["cpu_ms_per_image"])
        assert figures["images_per_s"] == max(figures["rounds_images_per_s"])
        assert len(figures["rounds_images_per_s"]) == setup["rounds"]
        batches = figures["batch_sizes_last_round"]
        assert sum(int(size) * count for size, count in batches.items()) == 4  # every image went through the batcher
        assert max(int(size) for size in batches) <= min(clients, setup["max_batch"])  # one image per caller at a time
    assert carina["loaded"]["clients"] == 2

    # Every ratio is the quotient of the figures as reported (to its 3-decimal rounding).
    ratios = result["ratio_carina_over_reference"]
    quotients = {
        "images_per_s_one_client": carina["one_client"]["images_per_s"] / reference["images_per_s"],
        "images_per_s_loaded": carina["loaded"]["images_per_s"] / reference["images_per_s"],
        "cpu_per_image_reference_over_carina_one_client": reference["cpu_ms_per_image"] / carina["one_client"]["cpu_ms_per_image"],
        "cpu_per_image_reference_over_carina_loaded": reference["cpu_ms_per_image"] / carina["loaded"]["cpu_ms_per_image"],
        "decode_preprocess_speedup": reference["decode_preprocess_ms_per_image"] / carina["decode_preprocess_ms_per_image"],
    }
    assert set(ratios) == set(quotients)
    for name, quotient in quotients.items():
        assert abs(ratios[name] - quotient) <= 0.0005 + 1e-9, (name, ratios[name], quotient)


def test_hostile_input_bench_prints_and_writes_consistent_json(tmp_path):
    """bench/hostile_input.py holds the timings the decode and preprocess tests no longer assert."""
    results = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "hostile_input.py"), "--repeats", "1", "--results-dir", str(results)],
        capture_output=True, text=True, timeout=600, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    (written,) = results.glob("hostile-input-*.json")
    assert json.loads(written.read_text()) == result
    assert result["machine"]["hostname"] and result["machine"]["cores"] == os.cpu_count()
    figures = {**result["dicom"], **result["png"], **result["resize_operator"]}
    assert len(figures) == 9 and all(positive(v) for v in figures.values()), figures
    dicom, png, op, ratios = result["dicom"], result["png"], result["resize_operator"], result["ratios"]
    quotients = {
        "dicom_refusal_in_memory_over_sample_decode":
            dicom["refuse_60000x60000_header_in_memory_ms"] / dicom["decode_1024x1024_sample_ms"],
        "dicom_refusal_from_file_over_sample_decode":
            dicom["refuse_8000x8000_file_read_deferred_ms"] / dicom["decode_1024x1024_sample_ms"],
        "png_refusal_over_sample_decode": png["refuse_8000x8000_valid_stream_ms"] / png["decode_512x512_sample_ms"],
        "operator_7745_over_2048": op["build_7745_ms"] / op["build_2048_ms"],
    }
    assert set(ratios) == set(quotients)
    for name, quotient in quotients.items():  # of the figures as reported, to the ratio's rounding
        assert abs(ratios[name] - quotient) <= 0.0005 + 1e-9, (name, ratios[name], quotient)
