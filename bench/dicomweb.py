"""STOW-RS against C-STORE into a real `carina serve`: instances per second into the
same durable intake; prints JSON and writes bench/results/dicomweb-YYYYMMDD-HHMMSS.json.

    .venv/bin/python bench/dicomweb.py [--count 200] [--side 512] [--repeats 3]

The same `count` DX images (side x side, 8-bit) go in once by dcmtk storescu over one
association (TCP_NODELAY) and once by one STOW-RS request (httpx, streamed), each with
fresh UIDs, `repeats` times; the fastest run of each is kept. `dicom.stable_seconds` is
long, so the pipeline never competes with the intake. Both paths end in the same
Receiver (fsync, rename, commit per instance), so the ratio measures the protocol and
parsing overhead around it.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from record import machine, now_utc, write_result  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--side", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--results-dir", help="where the JSON file goes (default bench/results; '' = print only)")
    args = parser.parse_args(argv)

    import httpx
    import numpy as np

    from dicom_factory import make_dx
    from node.dicomweb.multipart import new_boundary, parts_length, stream_parts
    from peers import CarinaNode, require_tool

    storescu = require_tool("storescu")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        node = CarinaNode(tmp / "carina", stable_seconds=3600,
                          extra={"dicomweb": {"stow_senders": [{"token": "bench", "source": "BENCH"}]}})
        token = node.create_token("bench", "integration")
        node.start()
        try:
            def batch(tag: str) -> list[Path]:
                out = tmp / tag
                out.mkdir()
                rng = np.random.default_rng(len(tag))
                files = []
                for i in range(args.count):
                    ds = make_dx(rng.integers(0, 255, (args.side, args.side), dtype=np.uint8), patient_id=f"BENCH-{i}")
                    path = out / f"{i}.dcm"
                    ds.save_as(path, enforce_file_format=True)
                    files.append(path)
                return files

            cstore, stow = [], []
            for r in range(args.repeats):
                files = batch(f"dimse{r}")
                t0 = time.perf_counter()
                proc = subprocess.run([storescu, "-aet", "MODALITY", "-aec", "CARINA", "127.0.0.1", str(node.dicom_port),
                                       *map(str, files)], capture_output=True, text=True,
                                      env=dict(os.environ, TCP_NODELAY="1"), timeout=600)
                cstore.append(time.perf_counter() - t0)
                assert proc.returncode == 0, proc.stderr

                files = batch(f"stow{r}")
                boundary = new_boundary()
                parts = [(p, "application/dicom") for p in files]
                t0 = time.perf_counter()
                rsp = httpx.post(f"{node.url}/dicomweb/studies", content=stream_parts(parts, boundary), timeout=600,
                                 headers={"Authorization": f"Bearer {token}",
                                          "Content-Length": str(parts_length(parts, boundary)),
                                          "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'})
                stow.append(time.perf_counter() - t0)
                assert rsp.status_code == 200, rsp.text[:500]
            size_mb = sum(p.stat().st_size for p in files) / 2**20
        finally:
            node.stop()

    best_cstore, best_stow = min(cstore), min(stow)
    result = {
        "benchmark": "dicomweb",
        "when": now_utc().isoformat(),
        "machine": machine(),
        "count": args.count,
        "instance_kb": round(size_mb * 1024 / args.count, 1),
        "cstore_instances_per_s": round(args.count / best_cstore, 1),
        "stow_instances_per_s": round(args.count / best_stow, 1),
        "stow_over_cstore": round(best_cstore / best_stow, 2),
        "runs_s": {"cstore": [round(t, 3) for t in cstore], "stow": [round(t, 3) for t in stow]},
    }
    print(json.dumps(result, indent=2))
    write_result("dicomweb", result, args.results_dir, now_utc())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
