"""What every bench script records besides its figures: the machine, the date, and a
results file under bench/results/ (the README quotes these files)."""
from __future__ import annotations

import datetime as dt
import json
import os
import platform
import socket
import sys
import time
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def best_ms(fn, repeats: int) -> float:
    """Fastest of `repeats` runs, in ms (the least disturbed run on a shared machine)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return min(times)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process (all its threads) has used, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def machine() -> dict:
    """Where the figures were measured: without this a throughput figure means nothing."""
    cpu_model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "hostname": socket.gethostname(),
        "cpu_model": cpu_model,
        "cores": os.cpu_count(),
        "cores_usable": usable,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def now_utc() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0)


def write_result(name: str, result: dict, results_dir: str | os.PathLike | None, when: dt.datetime) -> Path | None:
    """Write `result` as `<results_dir>/<name>-YYYYMMDD-HHMMSS.json` (UTC) and return the path;
    None when results_dir is "" (print only)."""
    if results_dir == "":
        return None
    directory = Path(results_dir) if results_dir is not None else RESULTS_DIR
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}-{when.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written: {path}", file=sys.stderr)
    return path
