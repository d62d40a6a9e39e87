"""Issue 11 acceptance: the start-up sweep and the retention purge, on a real
`carina serve` with Orthanc.

Sweep: what a crash leaves in storage (a received file whose row never
committed, a corrupt file, a file under the wrong study, an encoded output
without its row, partial temp files) is put right at the next start: the
readable orphan is registered and scored, the rest is quarantined, temp files
are removed, each with an event; a second restart finds nothing to do.

Retention: with every retention at 0 days, the scheduled purge removes a
delivered study's received files, outputs and done jobs (its results and FHIR
report stay), never a study whose delivery is pending, and a purge that
crashed between unlinking rows and deleting files is finished at start-up
without the sweep mistaking its files for orphans. Running it again does
nothing.
"""
from __future__ import annotations

import shutil
import sqlite3
import time
from pathlib import Path

from dicom_factory import make_dx, small_chest_pixels, write
from peers import carina_db_rows, http_json, node_with_pacs, storescu, study_state, wait_until

from node.config import load_settings
from node.context import NodeContext
from node.db import Database
from node.report import report_id
from node.sweep import sweep


def delivered(node, uid: str) -> dict:
    def ready():
        view = study_state(node, uid)
        return view and view["state"] == "done" and view["deliveries"] and all(
            d["state"] == "done" for d in view["deliveries"]) and view

    return wait_until(ready, 120, interval=0.3, what=f"{uid} delivered")


def delivered_despite_purge(node, pacs, uid: str) -> None:
    """The study's results reached the PACS and no delivery of it is left.
    With `jobs_days: 0` a done delivery job is purged within a second, so the
    study view's deliveries may already be empty; the PACS holding the study
    shows the delivery happened (a delivery job exists before anything is sent)."""
    def ready():
        view = study_state(node, uid)
        return (view and view["state"] == "done" and all(d["state"] == "done" for d in view["deliveries"])
                and pacs.study_instances(uid))

    wait_until(ready, 120, interval=0.3, what=f"{uid} delivered (retention on)")


def events(node, kind: str) -> list[dict]:
    return http_json(f"{node.url}/api/v1/admin/events?kind={kind}", token=node.admin)["events"]


def place(ds, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return write(ds, path)


def admin_token(node) -> str:
    return node.carina("token", "create", "--name", "admin", "--role", "admin").stdout.strip().splitlines()[-1]


def test_start_up_sweep_registers_or_quarantines_orphans_and_removes_temp_files(tmp_path):
    with node_with_pacs(tmp_path, stable_seconds=0.5) as (node, pacs):
        node.admin = admin_token(node)
        var = node.workdir / "var"
        a = make_dx(small_chest_pixels(700), patient_id="SWP-A", accession="SWP0001")
        assert storescu(node.dicom_port, write(a, tmp_path / "a.dcm")).returncode == 0
        view_a = delivered(node, str(a.StudyInstanceUID))
        node.stop()

        # What a kill leaves behind.
        b = make_dx(small_chest_pixels(701), patient_id="SWP-B", accession="SWP0002")  # renamed, row not committed
        orphan = place(b, var / "instances" / "MODALITY" / str(b.StudyInstanceUID) / f"{b.SOPInstanceUID}.dcm")
        garbage = var / "instances" / "MODALITY" / "1.2.826.0.1.3680043.99.1" / "1.2.826.0.1.3680043.99.1.1.dcm"
        garbage.parent.mkdir(parents=True)
        garbage.write_bytes(b"DICM? no: the first bytes of a write cut short")
        c = make_dx(small_chest_pixels(702), patient_id="SWP-C")
        misplaced = place(c, var / "instances" / "MODALITY" / str(a.StudyInstanceUID) / f"{c.SOPInstanceUID}.dcm")
        out_dir = var / "outputs" / "MODALITY" / str(a.StudyInstanceUID)
        stray_output = out_dir / "sc-2.25.1234.dcm"
        shutil.copyfile(misplaced, stray_output)
        temps = [var / "tmp" / "tmpab12cd", out_dir / ".sr-2.25.99.dcm.1a2b.part",
                 var / "work" / "MODALITY" / str(a.StudyInstanceUID) / "v1" / ".x.npy.9.part"]
        for t in temps:
            t.parent.mkdir(parents=True, exist_ok=True)
            t.write_bytes(b"partial")

        node.start()
        view_b = delivered(node, str(b.StudyInstanceUID))  # registered, scored and delivered
        assert [i["sop_instance_uid"] for i in view_b["instances"]] == [b.SOPInstanceUID]
        assert carina_db_rows(node, "SELECT path FROM instances WHERE sop_instance_uid = ?",
                              (str(b.SOPInstanceUID),)) == [(str(orphan),)]  # registered where it lies
        (registered,) = events(node, "orphan_registered")
        assert registered["sop_instance_uid"] == b.SOPInstanceUID
        quarantined = sorted(e["detail"] for e in events(node, "orphan_quarantined"))
        assert len(quarantined) == 3, quarantined
        for path in (garbage, misplaced, stray_output):
            assert not path.exists()
            relative = path.relative_to(var)
            assert (var / "quarantine" / relative).exists()
            assert any(d.startswith(str(relative)) for d in quarantined)
        assert not any(t.exists() for t in temps)
        assert len(events(node, "stale_temp_removed")) == 1
        # Study A is untouched: same instances, same outputs.
        assert study_state(node, str(a.StudyInstanceUID))["outputs"] == view_a["outputs"]

        # Nothing left to do at the next start: the same sweep, run on the stopped node's storage.
        node.stop()
        db = Database(f"sqlite:///{var / 'carina.db'}")
        try:
            again = sweep(NodeContext(settings=load_settings(node.config_path), db=db))
        finally:
            db.dispose()
        assert (again.registered, again.quarantined, again.temp_removed) == ([], [], 0)
        print(f"sweep: 1 orphan registered and delivered, {len(quarantined)} quarantined, {len(temps)} temp files removed")


def test_retention_purges_delivered_studies_only_and_finishes_a_crashed_purge(tmp_path):
    retention = {"instances_days": 0, "outputs_days": 0, "jobs_days": 0, "interval_seconds": 1}
    with node_with_pacs(tmp_path, stable_seconds=0.5, extra={"retention": retention}) as (node, pacs):
        node.admin = admin_token(node)
        var = node.workdir / "var"
        x = make_dx(small_chest_pixels(710), patient_id="RET-X", accession="RET0001")
        x_uid = str(x.StudyInstanceUID)
        assert storescu(node.dicom_port, write(x, tmp_path / "x.dcm")).returncode == 0
        # Read before delivery: once delivered, the purge takes these rows within a second.
        x_files = [Path(p) for (p,) in carina_db_rows(
            node, "SELECT path FROM instances WHERE study_id = (SELECT id FROM studies WHERE study_uid = ?)", (x_uid,))]
        delivered_despite_purge(node, pacs, x_uid)

        # The scheduled purge takes the delivered study's files, outputs and done jobs.
        def purged():
            rows = carina_db_rows(node, "SELECT (SELECT count(*) FROM instances WHERE study_id = s.id), "
                                        "(SELECT count(*) FROM outputs WHERE study_id = s.id), "
                                        "(SELECT count(*) FROM jobs WHERE study_id = s.id) FROM studies s "
                                        "WHERE s.study_uid = ?", (x_uid,))
            return rows == [(0, 0, 0)]

        wait_until(purged, 60, interval=0.3, what="the delivered study purged")
        assert x_files and not any(p.exists() for p in x_files)
        assert not list((var / "outputs" / "MODALITY" / x_uid).glob("*.dcm"))
        assert not (var / "work" / "MODALITY" / x_uid).exists()
        assert events(node, "retention_purge")
        # Its results stay: the study, its state and its FHIR report.
        assert study_state(node, x_uid)["state"] == "done"
        assert node.api(f"/fhir/DiagnosticReport/{report_id('MODALITY', x_uid)}")["status"] == "preliminary"

        # A study whose delivery is pending is never purged.
        pacs.stop()
        y = make_dx(small_chest_pixels(711), patient_id="RET-Y", accession="RET0002")
        y_uid = str(y.StudyInstanceUID)
        assert storescu(node.dicom_port, write(y, tmp_path / "y.dcm")).returncode == 0
        wait_until(lambda: (v := study_state(node, y_uid)) and v["deliveries"]
                   and v["deliveries"][0]["attempts"] >= 1, 120, interval=0.3, what="the delivery of y attempted")
        out = node.carina("retention", "purge").stdout
        assert "1 study(ies) kept" in out, out
        y_files = [Path(p) for (p,) in carina_db_rows(
            node, "SELECT path FROM instances WHERE study_id = (SELECT id FROM studies WHERE study_uid = ?)", (y_uid,))]
        assert y_files and all(p.exists() for p in y_files)
        assert carina_db_rows(node, "SELECT count(*) FROM outputs o JOIN studies s ON s.id = o.study_id "
                                    "WHERE s.study_uid = ?", (y_uid,))[0][0] > 0

        # A purge killed after its transaction and before deleting the files:
        # the rows are gone and the files are queued. Start-up finishes it, and
        # the sweep does not take those files for orphans.
        node.stop()
        z = make_dx(small_chest_pixels(712), patient_id="RET-Z")
        z_file = place(z, var / "instances" / "MODALITY" / str(z.StudyInstanceUID) / f"{z.SOPInstanceUID}.dcm")
        with sqlite3.connect(var / "carina.db") as conn:
            conn.execute("INSERT INTO purge_files (path, queued_at) VALUES (?, ?)", (str(z_file), time.time()))
        node.start()
        assert not z_file.exists()
        assert carina_db_rows(node, "SELECT count(*) FROM purge_files") == [(0,)]
        assert study_state(node, str(z.StudyInstanceUID)) is None
        assert events(node, "orphan_registered") == []

        # When y is delivered, it goes too; a purge run after that finds nothing.
        pacs.start()
        delivered_despite_purge(node, pacs, y_uid)
        wait_until(lambda: not any(p.exists() for p in y_files), 60, interval=0.3, what="y purged once delivered")
        wait_until(lambda: carina_db_rows(node, "SELECT count(*) FROM jobs") == [(0,)], 60, interval=0.3,
                   what="every done job purged")
        out = node.carina("retention", "purge").stdout
        assert out.startswith("purged 0 instance(s) of 0 study(ies), 0 output(s), 0 job row(s), 0 file(s)"), out
        kinds = {e["kind"] for e in http_json(f"{node.url}/api/v1/admin/events", token=node.admin)["events"]}
        assert "retention_purge" in kinds  # events (like audit records) are never purged
