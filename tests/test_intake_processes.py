"""`dicom.receiver_processes`: more processes receiving on the node's DICOM
ports (node/intake_processes.py), as README.md ("Receiving on more cores") says:

- a receiving process accepts associations on the node's own plain and TLS
  ports, with the node's peer check, and what it acknowledges is durable and
  recorded: shown by pushing while the node's own process is SIGSTOPped, so
  only the receiving process can take the associations (on PostgreSQL: a
  process stopped inside a SQLite write transaction would hold the database);
- what it receives is counted in the node's /metrics;
- one that dies is started again; at a graceful stop the node exits 0 with
  none left; a node killed by SIGKILL takes them with it, so no process is
  left holding the port.
"""
from __future__ import annotations

import os
import re
import signal
import urllib.request

import pytest
from dicom_factory import make_dx, write
from peers import (CarinaNode, accepts_connections, carina_db_rows, dcmsend, free_port, intake_processes_of, storescu,
                   store_responses, wait_until)
from tls_certs import CertificateAuthority


def _metric(node: CarinaNode, name: str) -> float:
    text = urllib.request.urlopen(f"{node.url}/metrics", timeout=10).read().decode()
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # A zombie (exited, not yet reaped) holds nothing either.
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()[0] == "Z"


@pytest.mark.parametrize("both_backends", ["postgresql"], indirect=True)
def test_the_receiving_process_takes_associations_on_both_ports_while_the_node_is_stopped(
        both_backends, tmp_path):
    ca = CertificateAuthority.create(tmp_path / "pki", "Hospital DICOM CA")
    server, modality = ca.issue("carina", server=True), ca.issue("modality")
    tls_port = free_port()
    node = CarinaNode(tmp_path / "carina", stable_seconds=3600, extra={"dicom": {
        "receiver_processes": 2,
        "tls": {"port": tls_port, "certificate": str(server.certificate), "private_key": str(server.private_key),
                "ca_certificates": str(ca.certificate)}}})
    plain = [write(make_dx(patient_id="INTAKE-PLAIN"), tmp_path / f"plain-{i}.dcm") for i in range(3)]
    over_tls = write(make_dx(patient_id="INTAKE-TLS"), tmp_path / "tls.dcm")
    stranger = write(make_dx(patient_id="INTAKE-STRANGER"), tmp_path / "stranger.dcm")
    try:
        node.start()
        [intake] = intake_processes_of(node.proc.pid)
        os.kill(node.proc.pid, signal.SIGSTOP)
        try:
            sent = dcmsend(node.dicom_port, *plain)
            tls_answers = store_responses(storescu(tls_port, over_tls, extra=(
                "+tls", str(modality.private_key), str(modality.certificate), "+cf", str(ca.certificate))))
            refused = dcmsend(node.dicom_port, stranger, calling_ae="STRANGER")
        finally:
            os.kill(node.proc.pid, signal.SIGCONT)
        assert sent.returncode == 0, sent.stdout + sent.stderr
        assert tls_answers == ["Success"]
        assert refused.returncode != 0 and "rejected" in (refused.stdout + refused.stderr).lower()
        rows = carina_db_rows(node, "SELECT count(*) FROM instances")
        assert rows == [(4,)]
        assert intake_processes_of(node.proc.pid) == [intake]
        # Its counters reach the node's /metrics within a report interval or two.
        wait_until(lambda: _metric(node, 'carina_instances_received_total{outcome="new"}') == 4, 30,
                   what="the receiving process's instances in the node's /metrics")
        assert _metric(node, "carina_associations_total") == 2  # the stranger was never accepted
    finally:
        node.stop()


def test_a_receiving_process_that_dies_is_replaced_and_none_outlives_the_node(tmp_path):
    node = CarinaNode(tmp_path / "carina", stable_seconds=3600, extra={"dicom": {"receiver_processes": 3}})
    node.start()
    try:
        first = intake_processes_of(node.proc.pid)
        assert len(first) == 2
        os.kill(first[0], signal.SIGKILL)
        wait_until(lambda: len(intake_processes_of(node.proc.pid)) == 2 and first[0] not in
                   intake_processes_of(node.proc.pid), 60, what="a new receiving process")
        assert re.search(r"receiving process [12] ended \(exit code -9\); starting it again", node.log_text())
        assert dcmsend(node.dicom_port, write(make_dx(), tmp_path / "after.dcm")).returncode == 0
        survivors = intake_processes_of(node.proc.pid)
        node.stop()
        assert node.proc.returncode == 0
        assert all(_gone(pid) for pid in survivors)
    finally:
        node.stop()

    # SIGKILLed, the node cannot tell them: they see their pipe's EOF, drain and exit.
    node = CarinaNode(tmp_path / "again", stable_seconds=3600, extra={"dicom": {"receiver_processes": 2}})
    node.start()
    try:
        [intake] = intake_processes_of(node.proc.pid)
        node.kill()
        wait_until(lambda: _gone(intake), 60, what="the receiving process ending with its node")
        assert not accepts_connections(node.dicom_port)
    finally:
        node.stop()
