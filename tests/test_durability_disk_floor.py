"""Issue 3 acceptance, disk floor at node level: `carina serve` with a free-space
floor above what the disk has answers C-STORE with 0xA700 (Out of Resources),
keeps nothing, and stays up (C-ECHO). tests/test_scp.py covers the SCP itself."""
from __future__ import annotations

from dicom_factory import make_dx, small_chest_pixels, write
from peers import (
    CarinaNode,
    carina_db_rows,
    echoscu,
    store_responses,
    storescu,
    wait_until,
)
import pytest

# On SQLite and on PostgreSQL (tests/conftest.py both_backends).
pytestmark = pytest.mark.usefixtures("both_backends")


def test_node_below_its_disk_floor_answers_out_of_resources_and_stays_up(tmp_path):
    node = CarinaNode(tmp_path / "carina", extra={"storage": {"min_free_mb": 10**9}})  # a petabyte floor
    node.start(wait_ready=False)  # the SCP is up before the model; no need to wait for it
    try:
        wait_until(lambda: echoscu(node.dicom_port), 60, what="carina SCP answering C-ECHO")
        ds = make_dx(small_chest_pixels(900, 128))
        for _ in range(2):  # a sender's retry gets the same answer
            proc = storescu(node.dicom_port, write(ds, tmp_path / "dx.dcm"))
            assert store_responses(proc) == ["Refused: OutOfResources"], proc.stdout + proc.stderr
        assert echoscu(node.dicom_port) and node.proc.poll() is None
        assert carina_db_rows(node, "SELECT COUNT(*) FROM instances") == [(0,)]
        assert not any((tmp_path / "carina" / "var" / "instances").rglob("*.dcm"))
        assert "storage below configured free-space floor" in node.log_text()
    finally:
        node.stop()
