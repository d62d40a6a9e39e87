"""How long Carina takes to refuse hostile image headers, and to build the resize operator
for a huge crop; prints JSON and writes bench/results/hostile-input-YYYYMMDD-HHMMSS.json.

    .venv/bin/python bench/hostile_input.py

The tests prove these properties without a clock (tests/test_inference_decode.py: the
refusals never look up a pixel decoder, never read a deferred Pixel Data element, never let
Pillow load pixels; tests/test_inference_preprocess.py: the operator for a 7745^2 crop stays
far below the 240 MB a side x side identity would take). This script keeps the timings, as
ratios to the ordinary work they are compared with. Each figure is the fastest of --repeats
runs (the least disturbed one on a shared machine).
"""
from __future__ import annotations

import argparse
import io
import json
import struct
import sys
import tempfile
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # before bench/ (this script's own directory, where `record` is found)
sys.path.insert(0, str(REPO / "tests"))  # dicom_factory: the same generators the tests use

from record import best_ms  # noqa: E402


def refused_ms(fn, repeats: int) -> float:
    """Like best_ms, for a call that must raise DecodeError (anything else is a bug: re-raised)."""
    from inference.decode import DecodeError

    def call():
        try:
            fn()
        except DecodeError:
            return
        raise AssertionError("not refused")

    return best_ms(call, repeats)


def _png(side: int, idat: bytes) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--results-dir", help="where the JSON file goes (default bench/results; '' = print only)")
    args = parser.parse_args(argv)

    import dicom_factory as f
    import pydicom
    from PIL import Image
    from record import machine, now_utc, write_result

    from inference.decode import decode_dicom, decode_dicom_file, decode_png_or_jpeg
    from inference.preprocess import _sparse_operator, prepare_input, resize_operator

    started_at = now_utc()
    n = args.repeats
    with tempfile.TemporaryDirectory(prefix="carina-bench-") as tmp:
        tmp = Path(tmp)
        # What the tests used to time, and the ordinary work each is compared with.
        absurd = f.absurd_dimensions_dx()
        huge = f.write_huge_dx(tmp / "huge.dcm", 8000, 8000)  # 128 MB, sparse
        sample_dcm = f.SIIM_MONO2
        png_absurd = _png(60000, zlib.compress(b"\x00" * 16))
        png_over = _png(8000, zlib.compress(b"\x00" * (8001 * 8000), 9))
        buf = io.BytesIO()
        Image.open(f.NIH_PNGS[0]).save(buf, format="PNG")
        png_sample = buf.getvalue()
        decode_dicom_file(sample_dcm), decode_png_or_jpeg(png_sample)  # warm imports and plugins

        dicom = {
            "refuse_60000x60000_header_in_memory_ms": refused_ms(lambda: decode_dicom(absurd), n),
            "refuse_8000x8000_file_read_deferred_ms": refused_ms(
                lambda: decode_dicom(pydicom.dcmread(huge, defer_size="2 MB")), n),
            "decode_1024x1024_sample_ms": best_ms(lambda: decode_dicom_file(sample_dcm), n),
        }
        png = {
            "refuse_60000x60000_header_ms": refused_ms(lambda: decode_png_or_jpeg(png_absurd), n),
            "refuse_8000x8000_valid_stream_ms": refused_ms(lambda: decode_png_or_jpeg(png_over), n),
            "decode_512x512_sample_ms": best_ms(lambda: decode_png_or_jpeg(png_sample), n),
        }

    def operator_ms(side: int) -> float:
        def build():
            resize_operator.cache_clear()
            _sparse_operator.cache_clear()
            _sparse_operator(side)

        return best_ms(build, n)

    operator = {"build_7745_ms": operator_ms(7745), "build_2048_ms": operator_ms(2048)}
    import numpy as np

    from inference.types import DecodedImage

    big = DecodedImage(pixels=np.zeros((2048, 2048), np.float32), maxval=4095.0, source_shape=(2048, 2048))
    prepare_input(big)
    operator["prepare_input_2048_cached_operator_ms"] = best_ms(lambda: prepare_input(big), n)

    # Rounded first (to 0.1 us); every ratio is the quotient of the figures as reported.
    dicom, png, operator = ({k: round(v, 4) for k, v in d.items()} for d in (dicom, png, operator))
    result = {
        "date": started_at.isoformat().replace("+00:00", "Z"),
        "machine": machine(),
        "repeats": n,
        "dicom": dicom,
        "png": png,
        "resize_operator": operator,
        "ratios": {
            "dicom_refusal_in_memory_over_sample_decode": round(
                dicom["refuse_60000x60000_header_in_memory_ms"] / dicom["decode_1024x1024_sample_ms"], 4),
            "dicom_refusal_from_file_over_sample_decode": round(
                dicom["refuse_8000x8000_file_read_deferred_ms"] / dicom["decode_1024x1024_sample_ms"], 4),
            "png_refusal_over_sample_decode": round(
                png["refuse_8000x8000_valid_stream_ms"] / png["decode_512x512_sample_ms"], 4),
            "operator_7745_over_2048": round(operator["build_7745_ms"] / operator["build_2048_ms"], 3),
        },
        "former_test_bounds_ms": {"refusals": 500, "operator_7745": 2000},
    }
    write_result("hostile-input", result, args.results_dir, started_at)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
