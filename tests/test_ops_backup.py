"""Issue 11 acceptance: backup while 20 studies are being pushed, restore into
a fresh data directory.

- `carina backup create` runs against the live node mid-push;
- `carina backup restore` brings a new node (new data directory, new ports)
  back: FHIR serves every resource version the backup holds, with the same
  ids, versions and content; every output file the backup's database lists
  is there with the same bytes;
- the modality then sends all 20 studies again (the new node does not know
  those that arrived after the backup) plus two new ones: every output of a
  scoring run after the restore has a UID the original node never issued (the
  restore's UID salt); a study version already scored in the backup but
  encoded after it is encoded from that same result, so its objects are the
  original's, byte for byte; and the PACS, which got both nodes' objects,
  never received one UID with two contents.
"""
from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from collections import defaultdict
from pathlib import Path

from dicom_factory import make_dx, small_chest_pixels, write
from peers import CarinaNode, Orthanc, carina_db_rows, storescu, study_state, wait_until

STUDIES = 20


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def all_delivered(node: CarinaNode, uids: list[str]) -> bool:
    for uid in uids:
        view = study_state(node, uid)
        if not (view and view["state"] == "done" and view["deliveries"]
                and all(d["state"] == "done" and d["study_version"] == view["version"] for d in view["deliveries"])):
            return False
    return True


def test_backup_during_a_push_restores_fhir_outputs_and_never_reuses_an_output_uid(tmp_path):
    pacs = Orthanc(tmp_path / "pacs").start()
    destinations = [{"name": "pacs", "type": "dicom", "ae_title": pacs.ae_title, "host": "127.0.0.1",
                     "port": pacs.dicom_port}]
    original = CarinaNode(tmp_path / "original", destinations=destinations, stable_seconds=0.5)
    restored = CarinaNode(tmp_path / "restored", destinations=destinations, stable_seconds=0.5)
    try:
        original.create_token()
        original.start()
        paths, uids = [], []
        for n in range(STUDIES + 2):
            ds = make_dx(small_chest_pixels(900 + n), patient_id=f"BAK-{n:02d}", accession=f"BK{n:04d}")
            paths.append(write(ds, tmp_path / f"s{n:02d}.dcm"))
            uids.append(str(ds.StudyInstanceUID))
        pushed: list[int] = []

        def push() -> None:
            for n in range(STUDIES):
                assert storescu(original.dicom_port, paths[n]).returncode == 0
                pushed.append(n)
                time.sleep(0.7)  # a modality's pace: the push outlasts the backup

        pusher = threading.Thread(target=push)
        pusher.start()
        wait_until(lambda: len(pushed) >= 8 and all_delivered(original, [uids[0]]), 120, interval=0.1,
                   what="the push under way, a first study through the pipeline")
        backup = tmp_path / "backup"
        started = len(pushed)
        original.carina("backup", "create", str(backup))
        during = len(pushed)
        pusher.join(300)
        assert len(pushed) == STUDIES and started >= 8 and during < STUDIES, (started, during)
        wait_until(lambda: all_delivered(original, uids[:STUDIES]), 240, interval=0.5, what="all 20 delivered")
        original_outputs = dict(carina_db_rows(original, "SELECT sop_instance_uid, path FROM outputs"))
        original.stop()

        manifest = json.loads((backup / "manifest.json").read_text())
        assert manifest["database"] == "sqlite" and manifest["files"] > 0 and not manifest["missing_files"], manifest
        assert (backup / "models" / "ACTIVE").exists() and (backup / "config.yaml").exists()
        with sqlite3.connect(backup / "carina.db") as snap:
            fhir = snap.execute("SELECT resource_type, resource_id, version_id, body FROM fhir_resources").fetchall()
            outputs = snap.execute("SELECT sop_instance_uid, path FROM outputs").fetchall()
            in_backup = {uid for (uid,) in snap.execute("SELECT study_uid FROM studies")}
            scored_in_backup = set(snap.execute("SELECT s.study_uid, r.version FROM results r "
                                                "JOIN studies s ON s.id = r.study_id").fetchall())
        assert fhir and outputs and 0 < len(in_backup) < STUDIES, (len(fhir), len(outputs), len(in_backup))
        backup_outputs = {uid for uid, _ in outputs}

        # Restore into a fresh data directory, then start the node there.
        restored.carina("backup", "restore", str(backup))
        restored.token = original.token  # tokens are in the database, so they are restored too
        restored.start()

        # FHIR: every version in the backup, same id, version and content.
        for rtype, rid, version, body in fhir:
            served = restored.api(f"/fhir/{rtype}/{rid}/_history/{version}")
            assert served == json.loads(body), (rtype, rid, version)
        # Outputs: every file the backup's database lists, same bytes, at its new home.
        new_paths = dict(carina_db_rows(restored, "SELECT sop_instance_uid, path FROM outputs"))
        for uid, old_path in outputs:
            relative = Path(old_path).relative_to(original.workdir / "var")
            assert Path(new_paths[uid]) == restored.workdir / "var" / relative
            assert sha(new_paths[uid]) == sha(backup / "files" / relative)

        # The modality sends everything again, and two new studies.
        for path in paths:
            assert storescu(restored.dicom_port, path).returncode == 0
        wait_until(lambda: all_delivered(restored, uids), 300, interval=0.5, what="all studies delivered by the restored node")
        made_after = {sop: (study, version, path) for sop, study, version, path in carina_db_rows(
            restored, "SELECT o.sop_instance_uid, s.study_uid, o.version, o.path FROM outputs o "
                      "JOIN studies s ON s.id = o.study_id") if sop not in backup_outputs}
        assert made_after, "the restored node made outputs"
        # A study version scored before the backup (its result is in the backup) and encoded after it
        # is encoded again from that same result: the same objects, byte for byte, as the original's.
        # Everything scored after the restore has UIDs the original node never issued.
        reused = set(made_after) & set(original_outputs)
        for sop in reused:
            study, version, path = made_after[sop]
            assert (study, version) in scored_in_backup, f"{sop}: a new scoring run reused an output UID"
            assert sha(path) == sha(original_outputs[sop]), f"{sop}: one UID, two contents"
        fresh = [sop for sop, (study, version, _) in made_after.items() if (study, version) not in scored_in_backup]
        assert fresh and not set(fresh) & set(original_outputs)
        contents = defaultdict(set)
        for r in pacs.receptions():
            contents[r["sop"]].add(json.dumps(r["tags"], sort_keys=True))
        assert all(len(c) == 1 for c in contents.values()), "the PACS received a UID with two contents"
        print(f"backup: taken while studies {started}-{during} of {STUDIES} were pushed, holding {len(in_backup)} studies, "
              f"{len(fhir)} FHIR resource versions and {len(outputs)} outputs; after the restore "
              f"{len(made_after)} new outputs: {len(fresh)} from runs scored after it, none with a UID the original "
              f"node issued, {len(reused)} re-encoded from results in the backup, identical to the original's")
    finally:
        original.stop()
        restored.stop()
        pacs.stop()
