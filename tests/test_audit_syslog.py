"""The audit trail forwarded to Debian's rsyslogd (RFC 5424, octet-counted
framing, plain TCP and TLS): every record arrives once, in order, as a DICOM
audit message carrying its place in the hash chain; records written while the
collector is down arrive when it is back."""
from __future__ import annotations

import re
import xml.etree.ElementTree as ET

import pytest

from node.audit import events
from node.audit.syslog import SyslogForwarder
from node.audit.trail import AuditTrail
from node.config import SyslogSettings
from peers import wait_until
from pki import CA
from syslog_peer import Rsyslog

LINE = re.compile(r'^<(\d+)>1 (\S+) (\S+) carina (\d+) IHE\+RFC-3881 \[carina@32473 seq="(\d+)" hash="([0-9a-f]{64})" '
                  r'prev="([0-9a-f]{64})"\] \ufeff?(<AuditMessage>.*</AuditMessage>)$')


@pytest.mark.parametrize("tls", [False, True], ids=["tcp", "tls"])
def test_records_reach_rsyslog_in_order_and_survive_an_outage(tmp_path, sqlite_db, tls):
    ca = CA(tmp_path / "pki")
    server = ca.issue("rsyslog", hosts=("127.0.0.1",))
    collector = Rsyslog(tmp_path / "rsyslog", tls=(ca.cert_path, server.cert, server.key) if tls else None).start()
    trail = AuditTrail(sqlite_db, source_id="carina@test")
    settings = SyslogSettings(enabled=True, host="127.0.0.1", port=collector.port, tls=tls,
                              ca_file=ca.cert_path if tls else None, reconnect_seconds=0.3)
    forwarder = SyslogForwarder(trail, settings).start()
    try:
        actor = events.Actor("alice", "viewer", "10.1.2.3")
        events.login(trail, actor, success=True)
        events.record_read(trail, actor, "/api/v1/studies/1.2.3", [("PAT-SYSLOG", "1.2.3")])
        events.login(trail, events.Actor("mallory", "", "10.6.6.6"), success=False, why="wrong password")
        wait_until(lambda: len(collector.messages()) == 3, 30, what="3 messages at rsyslog")

        collector.stop()  # the collector goes away; the node keeps recording
        for n in range(4):
            events.record_read(trail, actor, f"/api/v1/studies/9.{n}", [(f"PAT-{n}", f"9.{n}")])
        collector.start()  # same port, same file
        wait_until(lambda: len(collector.messages()) >= 7, 60, what="the backlog at rsyslog")
    finally:
        forwarder.stop()
        collector.stop()

    received = collector.messages()
    records = trail.records()
    parsed = [LINE.match(line) for line in received]
    assert all(parsed), [line[:200] for line, p in zip(received, parsed) if not p]
    seqs = [int(p.group(5)) for p in parsed]
    assert sorted(set(seqs)) == [r.seq for r in records] == list(range(1, 8))  # every record, at least once
    assert seqs == sorted(seqs)  # in order (a re-send after the outage may repeat the last batch)
    by_seq = {int(p.group(5)): p for p in parsed}
    for record in records:
        p = by_seq[record.seq]
        assert (p.group(6), p.group(7)) == (record.hash, record.prev_hash)
        assert p.group(8) == record.xml  # the DICOM audit message, byte for byte
        assert int(p.group(1)) == 10 * 8 + (5 if record.outcome == 0 else 4)  # authpriv; notice or warning
        ET.fromstring(p.group(8))
    assert "PAT-SYSLOG" in by_seq[2].group(8)
