"""What hashing every received instance costs the C-STORE handler; prints JSON
and writes bench/results/receive-hash-YYYYMMDD-HHMMSS.json.

    .venv/bin/python bench/receive_hash.py

The receiver (node/receiver.py) SHA-256s each instance while it is still the
temp file pynetdicom has just written (so it is in the page cache), before
placing it durably and committing its row. This script times, for a small
(~128 KB) and a 10 MB DX, the whole acceptor call (hash + fsync + link + the
SQLite commit, as in the handler) and the hash alone, each the fastest of
--repeats runs, and reports the hash as a share of the acceptor's time.
The duplicate path (same bytes again) is timed too: hash + one indexed
SELECT, no file work and no commit.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()

    import numpy as np
    from pydicom.uid import generate_uid

    from dicom_factory import make_dx, write
    from dicom_scp.scp import ReceivedInstance
    from node.db import Database
    from node.receiver import Receiver
    from node.storage import sha256_file
    from record import machine, now_utc, write_result

    work = Path(tempfile.mkdtemp(prefix="carina-bench-hash-"))
    try:
        db = Database(f"sqlite:///{work / 'carina.db'}")
        db.create_schema()
        receiver = Receiver(db, work / "instances")
        (work / "tmp").mkdir()
        figures = {}
        rng = np.random.default_rng(0)
        for name, side in (("small_256px", 256), ("dx_10mb", 2288)):
            source = write(make_dx(rng.integers(0, 255, (side, side), dtype=np.uint8)), work / f"{name}.dcm")
            size = source.stat().st_size
            accept_ms, hash_ms, duplicate_ms = [], [], []
            for _ in range(args.repeats):
                temp = work / "tmp" / "incoming.dcm"
                shutil.copyfile(source, temp)  # as pynetdicom leaves it: just written, cached
                sop = generate_uid()
                received = ReceivedInstance(
                    calling_ae="BENCH", peer_address="127.0.0.1", sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1",
                    sop_instance_uid=sop, study_uid="1.2.3.4", series_uid="1.2.3.4.5",
                    transfer_syntax_uid="1.2.840.10008.1.2.1", patient_id="", accession_number="", modality="DX",
                    temp_path=temp, size_bytes=size)
                t0 = time.perf_counter()
                sha256_file(temp)
                hash_ms.append((time.perf_counter() - t0) * 1000)
                t0 = time.perf_counter()
                receiver(received)
                accept_ms.append((time.perf_counter() - t0) * 1000)
                shutil.copyfile(source, temp)
                t0 = time.perf_counter()
                receiver(received)  # the same bytes again: acknowledged, nothing else
                duplicate_ms.append((time.perf_counter() - t0) * 1000)
                temp.unlink(missing_ok=True)
            figures[name] = {
                "bytes": size,
                "hash_ms": round(min(hash_ms), 2),
                "accept_ms": round(min(accept_ms), 2),
                "hash_share_of_accept": round(min(hash_ms) / min(accept_ms), 3),
                "duplicate_accept_ms": round(min(duplicate_ms), 2),
                "hash_mb_per_s": round(size / 1e6 / (min(hash_ms) / 1000), 1),
            }
        db.dispose()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    when = now_utc()
    result = {"benchmark": "receive-hash", "measured_at": when.isoformat(), "machine": machine(),
              "repeats": args.repeats, "figures": figures}
    print(json.dumps(result, indent=2))
    write_result("receive-hash", result, None, when)
    return 0


if __name__ == "__main__":
    sys.exit(main())
