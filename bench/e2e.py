"""End-to-end throughput and latency of `carina serve` against the bare
torchxrayvision loop, in one run on the same files; prints JSON and writes
bench/results/e2e-YYYYMMDD-HHMMSS.json (UTC).

    .venv/bin/python bench/e2e.py               # ~3-5 min on 2 cores
    .venv/bin/python bench/e2e.py --studies 6   # a quick look

Workload (issue 12): N single-image studies, each a 2048x2048 12-bit DX made
from the NIH samples in tests/data (tests/dicom_factory.py), the demo weights.

* bare loop: `xrv.utils.read_xray_dcm`, `XRayCenterCrop`, `XRayResizer(224)`,
  `model(x)` at batch 1 on the same N files, in this process, before the node
  starts (same weights, torch's default thread count): images/s.
* burst: N studies pushed with one `dcmsend` (one association, as a modality
  or a router forwards a backlog) to `carina serve` (a subprocess, its
  defaults but the output kinds) with a real Orthanc as its DICOM destination.
  Delivered = the node's deliver job is done (every output answered 0x0000 by
  Orthanc) and Orthanc logged every output. Throughput = N / (time Orthanc
  logged the last output - time the first study's stability window ended),
  i.e. the rate at which the queue drains once the node may start; the wall
  time from the first byte pushed is reported beside it.
* one at a time: the same N images under new UIDs, each pushed with its own
  dcmsend once the previous study is fully delivered. Latency = time Orthanc
  logged the SR - end of the study's stability window (the node's
  `last_received_at` + `dicom.stable_seconds`; SQLite's clock is this host's).
  Also to the last output acknowledged (the deliver job's `finished_at`).

Orthanc's reception times come from its Lua `ReceivedInstanceFilter` hook
(tests/peers.py), which appends one line per instance; a thread here polls the
file every 5 ms and stamps each new line, so a reception time is late by at
most ~5 ms. Per-stage figures come from the node's job rows (created ->
finished: queue wait included) and from its Prometheus stage histogram (run
time only). Peak RSS is the node process's VmHWM (/proc).

Output kinds: `--kinds sr,sc` by default (the issue's "SR + SCs
acknowledged"); `--kinds all` adds SEG, GSPS and the Encapsulated PDF.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as bench/inference.py: steadier on a shared VM

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
# The node subprocess imports this checkout's packages (a worktree wins over an editable install).
os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])

SR_CLASS_PREFIX = "1.2.840.10008.5.1.4.1.1.88."


def make_images(out: Path, n: int, tag: str) -> list[Path]:
    """n single-image studies: 2048^2, 12 bits stored, each pixel set slightly different."""
    import numpy as np
    from PIL import Image
    from pydicom.uid import generate_uid

    from dicom_factory import NIH_PNGS, make_dx, png_pixels, write

    out.mkdir(parents=True, exist_ok=True)
    bases = [np.asarray(Image.fromarray(png_pixels(p)).resize((2048, 2048), Image.Resampling.BILINEAR)) for p in NIH_PNGS]
    rng = np.random.default_rng(12)
    paths = []
    for i in range(n):
        noise = rng.integers(-3, 4, size=(2048, 2048))
        pixels = np.clip(bases[i % len(bases)].astype(np.int16) + noise, 0, 255).astype(np.uint8)
        ds = make_dx(pixels, bits_stored=12, study_uid=generate_uid(), patient_id=f"BENCH-{tag}-{i:03d}",
                     accession=f"{tag}{i:04d}")
        paths.append(write(ds, out / f"{tag}-{i:03d}.dcm"))
    return paths


def bare_loop(paths: list[Path]) -> dict:
    """The torchxrayvision loop of the issue, with the node's demo weights."""
    import torch
    import torchxrayvision as xrv

    from inference.model import load_model

    state = load_model(None, device="cpu").module.state_dict()
    model = xrv.models.DenseNet(weights=None, apply_sigmoid=True, op_threshs=None)
    model.load_state_dict(state)
    model.eval()
    crop, resize = xrv.datasets.XRayCenterCrop(), xrv.datasets.XRayResizer(224)

    def one(path: Path) -> None:
        img = xrv.utils.read_xray_dcm(path)
        x = torch.from_numpy(resize(crop(img[None, ...]))[None]).float()
        model(x)

    with torch.inference_mode():
        one(paths[0])  # warm-up (allocator, kernels), as the node warms up at start
        started, cpu_started = time.perf_counter(), time.process_time()
        for path in paths:
            one(path)
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    return {"images": len(paths), "seconds": round(elapsed, 2), "images_per_s": round(len(paths) / elapsed, 2),
            "cpu_core_seconds_per_image": round(cpu / len(paths), 3)}


class ReceptionClock:
    """Stamps each instance Orthanc's Lua hook logs with this host's time."""

    def __init__(self, log: Path):
        self.log = log
        self.seen: dict[str, tuple[float, str, str]] = {}  # SOP UID -> (time, study UID, SOP class)
        self._stop = threading.Event()
        self._offset = 0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> "ReceptionClock":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        pending = b""
        while not self._stop.wait(0.005):
            if not self.log.exists():
                continue
            with open(self.log, "rb") as fh:
                fh.seek(self._offset)
                chunk = fh.read()
            if not chunk:
                continue
            t = time.time()
            self._offset += len(chunk)
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                tags = json.loads(line.decode("utf-8", "surrogateescape"))["tags"]
                self.seen.setdefault(tags.get("SOPInstanceUID", ""), (t, tags.get("StudyInstanceUID", ""),
                                                                       tags.get("SOPClassUID", "")))

    def by_study(self) -> dict[str, list[tuple[float, str]]]:
        out: dict[str, list[tuple[float, str]]] = {}
        for t, study, sop_class in list(self.seen.values()):
            out.setdefault(study, []).append((t, sop_class))
        return out


def study_rows(node, calling_ae: str = "MODALITY") -> dict[str, dict]:
    from peers import carina_db_rows

    rows = carina_db_rows(node, "SELECT id, study_uid, last_received_at, state FROM studies WHERE calling_ae = ?",
                          (calling_ae,))
    return {uid: {"id": sid, "last_received_at": last, "state": state} for sid, uid, last, state in rows}


def jobs_by_study(node) -> dict[int, dict[str, tuple[float, float | None, str]]]:
    from peers import carina_db_rows

    out: dict[int, dict] = {}
    for study_id, stage, created, finished, state in carina_db_rows(
            node, "SELECT study_id, stage, created_at, finished_at, state FROM jobs"):
        out.setdefault(study_id, {})[stage] = (created, finished, state)
    return out


def outputs_by_study(node) -> dict[int, list[tuple[str, int]]]:
    from peers import carina_db_rows

    out: dict[int, list] = {}
    for study_id, kind, path in carina_db_rows(node, "SELECT study_id, kind, path FROM outputs"):
        out.setdefault(study_id, []).append((kind, Path(path).stat().st_size))
    return out


# The node's stages (node/states.py Stage), in pipeline order; the SCs are drawn
# (capture) and sent (deliver-sc) after the report's objects (encode, deliver).
STAGES = ("infer", "encode", "capture", "deliver", "deliver-sc")
DELIVERIES = ("deliver", "deliver-sc")


def delivered(node, clock: ReceptionClock, uids: list[str]) -> bool:
    """Every study done (so every delivery job exists), every delivery job done,
    and Orthanc has logged every output."""
    rows, jobs, outputs = study_rows(node), jobs_by_study(node), outputs_by_study(node)
    seen = clock.by_study()
    for uid in uids:
        row = rows.get(uid)
        if row is None:
            return False
        states = [job[2] for stage, job in jobs.get(row["id"], {}).items() if stage in DELIVERIES]
        if "dead" in states:
            raise RuntimeError(f"a delivery went dead-letter; see {node.workdir / 'carina.log'}")
        if row["state"] != "done" or not states or any(state != "done" for state in states):
            return False
        if len(seen.get(uid, [])) < len(outputs.get(row["id"], [])):
            return False
    return True


def stage_metrics(node) -> dict[str, dict]:
    """Run time per stage from the node's Prometheus histogram (sum / count)."""
    from peers import http_json  # noqa: F401  (urllib is enough: /metrics is text)
    import urllib.request

    with urllib.request.urlopen(f"{node.url}/metrics", timeout=10) as rsp:
        text = rsp.read().decode()
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    for match in re.finditer(r'carina_stage_duration_seconds_(sum|count)\{outcome="done",stage="([\w-]+)"\} ([0-9.e+-]+)', text):
        (sums if match[1] == "sum" else counts)[match[2]] = float(match[3])
    return {stage: {"runs": int(counts[stage]), "sum_s": sums[stage]} for stage in counts}


def per_study(node, clock: ReceptionClock, uids: list[str], stable: float) -> list[dict]:
    rows, jobs, outputs = study_rows(node), jobs_by_study(node), outputs_by_study(node)
    seen = clock.by_study()
    out = []
    for uid in uids:
        row = rows[uid]
        window_end = row["last_received_at"] + stable
        received = seen[uid]
        sr_at = min(t for t, sop_class in received if sop_class.startswith(SR_CLASS_PREFIX))
        job = jobs[row["id"]]
        out.append({
            "window_end": window_end,
            "sr_at_pacs": sr_at,
            "last_output_at_pacs": max(t for t, _ in received),
            "deliver_done": max(job[stage][1] for stage in DELIVERIES if stage in job),
            "stages": {stage: job[stage][1] - job[stage][0] for stage in STAGES if stage in job},
            "outputs": outputs[row["id"]],
        })
    return out


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    if len(values) == 1:
        return values[0]
    k = (len(values) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def summarise(studies: list[dict]) -> dict:
    sr = [s["sr_at_pacs"] - s["window_end"] for s in studies]
    every = [s["deliver_done"] - s["window_end"] for s in studies]
    ran = set.intersection(*(set(s["stages"]) for s in studies))
    kinds: dict[str, list[int]] = {}
    for s in studies:
        for kind, size in s["outputs"]:
            kinds.setdefault(kind, []).append(size)
    return {
        "sr_latency_s": {"p50": round(pct(sr, 0.5), 3), "p95": round(pct(sr, 0.95), 3), "max": round(max(sr), 3)},
        "all_outputs_latency_s": {"p50": round(pct(every, 0.5), 3), "p95": round(pct(every, 0.95), 3),
                                  "max": round(max(every), 3)},
        "stage_mean_s_queue_included": {
            stage: round(statistics.mean(s["stages"][stage] for s in studies), 3) for stage in STAGES if stage in ran},
        "stage_median_s_queue_included": {
            stage: round(statistics.median(s["stages"][stage] for s in studies), 3) for stage in STAGES if stage in ran},
        "outputs": {kind: {"count": len(sizes), "mean_bytes": int(statistics.mean(sizes))} for kind, sizes in sorted(kinds.items())},
    }


def stage_run_means(before: dict, after: dict) -> dict:
    out = {}
    for stage, figures in after.items():
        runs = figures["runs"] - before.get(stage, {}).get("runs", 0)
        total = figures["sum_s"] - before.get(stage, {}).get("sum_s", 0.0)
        if runs:
            out[stage] = round(total / runs, 3)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--studies", type=int, default=30)
    parser.add_argument("--stable-seconds", type=float, default=2.0,
                        help="dicom.stable_seconds of the node (latency is measured from the window's end)")
    parser.add_argument("--kinds", default="sr,sc", help="outputs.kinds, comma-separated, or 'all'")
    parser.add_argument("--workers", type=int, default=None, help="pipeline.workers (default: the node's default)")
    parser.add_argument("--stage-processes", type=int, default=1,
                        help="pipeline.stage_processes: processes for encode and capture (node default 1)")
    parser.add_argument("--cpu-threads", type=int, default=0,
                        help="inference.cpu_threads: torch's threads in the node (0: torch's default, one per core)")
    parser.add_argument("--worker-processes", type=int, default=0,
                        help="extra `carina serve --role worker` processes beside the node, on its database and storage")
    parser.add_argument("--workdir", default=None, help="keep the run's files here (default: a temp dir, removed)")
    parser.add_argument("--results-dir", default=None, help="'' to print only")
    args = parser.parse_args(argv)

    from peers import CarinaNode, Orthanc, children_of, dcmsend, process_memory_kb, stage_processes_of, wait_until
    from record import cpu_seconds, machine, now_utc, write_result

    started_at = now_utc()
    load_start = os.getloadavg()
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="carina-bench-e2e-"))
    kinds = ["sr", "sc", "seg", "gsps", "pdf"] if args.kinds == "all" else args.kinds.split(",")
    n = args.studies
    try:
        burst_files = make_images(work / "burst", n, "B")
        single_files = make_images(work / "single", n, "S")
        reference = bare_loop(burst_files)
        print(f"bare loop: {reference['images_per_s']} images/s", file=sys.stderr)

        pacs = Orthanc(work / "orthanc").start()
        clock = ReceptionClock(pacs.reception_log).start()
        node = CarinaNode(
            work / "carina",
            destinations=[{"name": "pacs", "type": "dicom", "ae_title": pacs.ae_title, "host": "127.0.0.1",
                           "port": pacs.dicom_port}],
            stable_seconds=args.stable_seconds,
            # The node's own defaults for the pipeline (CarinaNode speeds polling and retries up for tests).
            extra={"pipeline": {"poll_seconds": 0.5, "backoff_base_seconds": 2.0, "backoff_max_seconds": 300.0,
                                "stage_processes": args.stage_processes,
                                **({"workers": args.workers} if args.workers else {})},
                   "outputs": {"kinds": kinds, "report_pdf": {"fhir": "pdf" in kinds, "download": "pdf" in kinds}},
                   "inference": {"model_poll_seconds": 2.0, "cpu_threads": args.cpu_threads}},
        )
        shared = yaml.safe_load(node.config_path.read_text())  # the node's database, storage and settings
        extra_workers = [
            CarinaNode(work / f"carina-worker-{i}", role="worker", stable_seconds=args.stable_seconds,
                       destinations=shared["destinations"],
                       extra={k: shared[k] for k in ("storage", "pipeline", "outputs", "inference", "delivery")})
            for i in range(args.worker_processes)
        ]
        try:
            node.start()
            for w in extra_workers:
                w.start()
            for process in (node, *extra_workers):  # spawned beside the model's loading
                wait_until(lambda pid=process.proc.pid: len(stage_processes_of(pid)) == args.stage_processes, 60,
                           what="the stage processes")
            import pydicom

            def study_uid(path: Path) -> str:
                return str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)

            # Burst: every study in one association.
            uids = [study_uid(p) for p in burst_files]
            metrics_before = stage_metrics(node)
            node_pids = [pid for member in (node, *extra_workers)
                         for pid in (member.proc.pid, *children_of(member.proc.pid))]
            cpu_before = sum(map(cpu_seconds, node_pids)), cpu_seconds(pacs.proc.pid)
            pushed_at = time.time()
            proc = dcmsend(node.dicom_port, *burst_files)
            assert proc.returncode == 0, proc.stderr[-2000:]
            wait_until(lambda: delivered(node, clock, uids), 900, interval=0.25, what="burst delivered")
            cpu_after = sum(map(cpu_seconds, node_pids)), cpu_seconds(pacs.proc.pid)
            burst_studies = per_study(node, clock, uids, args.stable_seconds)
            metrics_burst = stage_metrics(node)
            first_window_end = min(s["window_end"] for s in burst_studies)
            last_at_pacs = max(s["last_output_at_pacs"] for s in burst_studies)
            burst_rate = n / (last_at_pacs - first_window_end)
            burst = {
                "studies": n,
                "studies_per_s": round(burst_rate, 3),
                "ratio_to_bare_loop": round(burst_rate / reference["images_per_s"], 3),
                "drain_seconds": round(last_at_pacs - first_window_end, 2),
                "wall_seconds_from_push": round(last_at_pacs - pushed_at, 2),
                "push_seconds": round(max(s["window_end"] for s in burst_studies) - args.stable_seconds - pushed_at, 2),
                **summarise(burst_studies),
                "stage_run_mean_s": stage_run_means(metrics_before, metrics_burst),
                # Where the 2 cores went, per study: the node (receiving, scoring,
                # drawing, sending) and Orthanc (storing the outputs), against the
                # bare loop's per image.
                "cpu_core_seconds_per_study": {"node": round((cpu_after[0] - cpu_before[0]) / n, 3),
                                               "orthanc": round((cpu_after[1] - cpu_before[1]) / n, 3)},
            }
            print(f"burst: {burst['studies_per_s']} studies/s ({burst['ratio_to_bare_loop']}x)", file=sys.stderr)

            # One at a time.
            single_studies = []
            for path in single_files:
                uid = study_uid(path)
                proc = dcmsend(node.dicom_port, path)
                assert proc.returncode == 0, proc.stderr[-2000:]
                wait_until(lambda: delivered(node, clock, [uid]), 300, interval=0.05, what="study delivered")
                single_studies.extend(per_study(node, clock, [uid], args.stable_seconds))
            metrics_single = stage_metrics(node)
            single = {"studies": n, **summarise(single_studies),
                      "stage_run_mean_s": stage_run_means(metrics_burst, metrics_single)}
            print(f"one at a time: SR p50 {single['sr_latency_s']['p50']} s, p95 {single['sr_latency_s']['p95']} s",
                  file=sys.stderr)
            # Each process's own peak, summed: an upper bound of the node's peak as a whole.
            memory = {"VmHWM": sum(process_memory_kb(pid)["VmHWM"] for pid in node_pids)}
        finally:
            for w in extra_workers:
                w.stop()
            node.stop()
            clock.stop()
            pacs.stop()
        peak_rss_mb = round(memory["VmHWM"] / 1024, 1)
        result = {
            "benchmark": "e2e",
            "started_at": started_at.isoformat(),
            "machine": machine(),
            "load_average_start": [round(x, 2) for x in load_start],
            "load_average_end": [round(x, 2) for x in os.getloadavg()],
            "command": "python bench/e2e.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "workload": {"studies": n, "image": "DX 2048x2048, 12 bits stored, Explicit VR LE", "weights": "demo",
                         "sender": "dcmsend", "pacs": "Orthanc", "stable_seconds": args.stable_seconds,
                         "output_kinds": kinds, "workers": args.workers or "default",
                         "stage_processes": args.stage_processes, "worker_processes": 1 + args.worker_processes,
                         "cpu_threads": args.cpu_threads or "default"},
            "bare_loop": reference,
            "burst": burst,
            "one_at_a_time": single,
            "node_peak_rss_mb": peak_rss_mb,
            "goals": {
                "burst_ratio_ge_0.7": burst["ratio_to_bare_loop"] >= 0.7,
                "one_at_a_time_sr_p95_le_1s": single["sr_latency_s"]["p95"] <= 1.0,
                "peak_rss_le_2GB": peak_rss_mb <= 2048,
            },
        }
        print(json.dumps(result, indent=2))
        write_result("e2e", result, args.results_dir, started_at)
        return 0
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
