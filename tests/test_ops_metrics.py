"""Issue 11 acceptance: `/metrics` scraped before and after a push moves by the
right amounts; `/healthz` is liveness and `/readyz` readiness; JSON log lines
carry the study UID and job id, rotate by size, and hold no PHI.

The push: three new studies over one association, one of them again with
the same bytes (a duplicate), and one dataset without StudyInstanceUID (a
reject), each over its own association; then every study is scored, encoded
and delivered to Orthanc.
"""
from __future__ import annotations

import json
import re
import urllib.request

from dicom_factory import make_dx, small_chest_pixels, write
from peers import (
    carina_db_rows,
    http_json,
    node_with_pacs,
    send_raw,
    store_responses,
    storescu,
    study_state,
    wait_until,
)

DX = "1.2.840.10008.5.1.4.1.1.1.1"
EXPLICIT = "1.2.840.10008.1.2.1"


def scrape(node) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(f"{node.url}/metrics", timeout=10).read().decode()
    samples = {}
    for line in text.splitlines():
        m = re.match(r"^(\w+)(?:\{(.*)\})? (\S+)$", line)
        if m:
            labels = tuple(sorted(re.findall(r'(\w+)="([^"]*)"', m.group(2) or "")))
            samples[(m.group(1), labels)] = float(m.group(3))
    return samples


def value(samples, name: str, **labels) -> float:
    want = tuple(sorted(labels.items()))
    return samples.get((name, want), 0.0)


def test_metrics_move_by_the_push_and_logs_are_json_without_phi(tmp_path):
    log_file = tmp_path / "logs" / "carina.log"
    logging_cfg = {"format": "json", "file": str(log_file), "max_bytes": 8192, "backup_count": 20}
    with node_with_pacs(tmp_path, stable_seconds=0.5, extra={"logging": logging_cfg}) as (node, pacs):
        assert http_json(f"{node.url}/healthz")["status"] == "ok"
        ready = http_json(f"{node.url}/readyz")
        assert ready["status"] == "ready" and all(ready["checks"].values()), ready
        before = scrape(node)

        studies = [make_dx(small_chest_pixels(800 + n), patient_id=f"MET-PID-{n}", patient_name=f"Metric^Person{n}",
                           accession=f"MET{n:04d}") for n in range(3)]
        paths = [write(ds, tmp_path / f"m{n}.dcm") for n, ds in enumerate(studies)]
        assert store_responses(storescu(node.dicom_port, *paths)) == ["Success"] * 3
        assert store_responses(storescu(node.dicom_port, paths[0])) == ["Success"]  # the same bytes again
        broken = make_dx(small_chest_pixels(803), patient_id="MET-PID-X")
        del broken.StudyInstanceUID
        assert send_raw(node.dicom_port, [(write(broken, tmp_path / "broken.dcm"), DX, EXPLICIT)]) == [0xC210]
        uids = [str(ds.StudyInstanceUID) for ds in studies]
        wait_until(lambda: all((v := study_state(node, uid)) and v["deliveries"] and v["deliveries"][0]["state"] == "done"
                               for uid in uids), 120, interval=0.3, what="the three studies delivered")
        after = scrape(node)

        def delta(name, **labels):
            return value(after, name, **labels) - value(before, name, **labels)

        sizes = sum(size for (size,) in carina_db_rows(node, "SELECT size_bytes FROM instances"))
        assert delta("carina_instances_received_total", outcome="new") == 3
        assert delta("carina_instances_received_total", outcome="duplicate") == 1
        assert delta("carina_received_bytes_total") == sizes
        assert delta("carina_instances_rejected_total", reason="missing_study_uid") == 1
        assert delta("carina_associations_total") == 3
        for stage in ("infer", "encode", "capture", "deliver", "deliver-sc"):
            assert delta("carina_stage_duration_seconds_count", stage=stage, outcome="done") == 3, stage
        for stage in ("deliver", "deliver-sc"):
            assert delta("carina_deliveries_total", destination="pacs", stage=stage, outcome="delivered") == 3, stage
        assert delta("carina_studies", state="done") == 3
        assert delta("carina_queue_depth", stage="deliver", state="done") == 3
        assert delta("carina_queue_depth", stage="deliver-sc", state="done") == 3
        assert delta("carina_inference_batch_size_sum") == 3  # three images, whatever the batching
        assert delta("carina_inference_batch_seconds_count") == delta("carina_inference_batch_size_count") >= 1
        model = [labels for (name, labels), v in after.items() if name == "carina_model_info" and v == 1]
        assert model and dict(model[0])["demo"] == "true"
        assert value(after, "carina_storage_free_bytes") > 0
        assert value(after, "carina_queue_oldest_pending_age_seconds", stage="infer") == 0
        assert value(after, "carina_dead_letter_oldest_age_seconds") == 0
        assert value(after, "carina_associations_active") == 0
        assert value(after, "carina_gc_frozen_objects") > 100_000  # start-up's heap, out of the collector's way

    # Every log line is one JSON object; the pipeline's lines name the study and the job.
    files = sorted(log_file.parent.glob("carina.log*"))
    assert len(files) >= 2, "the log rotated at max_bytes"
    lines = [json.loads(line) for f in files for line in f.read_text().splitlines()]
    assert all({"ts", "level", "logger", "msg"} <= set(entry) for entry in lines)
    for uid in uids:
        mine = [e for e in lines if e.get("study_uid") == uid]
        assert any("job_id" in e and e.get("stage") == "deliver" for e in mine), uid
        assert any(e.get("sop_instance_uid") and e["logger"] == "dicom_scp.scp" for e in mine), uid
    text = "\n".join(f.read_text() for f in files)
    phi = [p for ds in studies for p in (ds.PatientID, str(ds.PatientName), "Person0", ds.PatientBirthDate)]
    assert not [p for p in phi if p in text], "PHI in the log"
    print(f"metrics: {len(lines)} JSON log lines over {len(files)} files; received bytes +{int(sizes)}")
