"""Issue 10: DICOM TLS, inbound and outbound, with certificates made for the run.

Inbound: the SCP's second, TLS-only listener takes dcmtk `storescu +tls` from a
sender whose certificate our CA signed, and refuses one without a certificate,
one signed by another CA, and plain TCP; the peer policy applies there too.
Outbound: a real Orthanc with DicomTlsEnabled (and client certificates
required) receives the SR and SCs over TLS; a destination that does not trust
Orthanc's certificate never delivers.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from dicom_factory import make_dx, small_chest_pixels, write
from dicom_scp.scp import StorageSCP
from dicom_scp.tls import TlsListener, server_context
from node.receiver import Receiver
from peers import (
    CarinaNode,
    Orthanc,
    echoscu,
    free_port,
    loopback_policy,
    store_responses,
    storescu,
    wait_until,
)
from tls_certs import CertificateAuthority

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    root = tmp_path_factory.mktemp("pki")
    hospital = CertificateAuthority.create(root / "hospital", "Hospital DICOM CA")
    rogue = CertificateAuthority.create(root / "rogue", "Rogue CA")
    return {
        "ca": hospital,
        "rogue_ca": rogue,
        "carina_server": hospital.issue("carina", server=True),
        "carina_client": hospital.issue("carina-scu"),
        "modality": hospital.issue("modality"),
        "rogue_modality": rogue.issue("modality"),
        "orthanc": hospital.issue("orthanc", server=True),
    }


def tls_args(pki, client: str | None = "modality") -> tuple[str, ...]:
    """storescu options: our client certificate (or none), trusting the hospital CA."""
    trust = ("+cf", str(pki["ca"].certificate))
    if client is None:
        return ("+tla", *trust)  # TLS without a client certificate
    leaf = pki[client]
    return ("+tls", str(leaf.private_key), str(leaf.certificate), *trust)


def test_tls_listener_takes_certified_senders_only(pki, tmp_path, sqlite_db):
    events = []
    tls_port = free_port()
    context = server_context(certificate=pki["carina_server"].certificate, private_key=pki["carina_server"].private_key,
                             ca_certificates=pki["ca"].certificate, require_client_certificate=True)
    scp = StorageSCP(ae_title="CARINA", host="127.0.0.1", port=free_port(), accept=Receiver(sqlite_db, tmp_path / "instances"),
                     peers=loopback_policy("MODALITY"), tls=TlsListener(tls_port, context), on_association=events.append)
    scp.start()
    try:
        assert scp.tls_port == tls_port
        files = {name: write(make_dx(small_chest_pixels(n), patient_id=f"TLS-{n}"), tmp_path / f"{name}.dcm")
                 for n, name in enumerate(["good", "no-cert", "rogue", "plain-to-tls", "stranger", "plain"])}
        outcomes = {
            "good": storescu(tls_port, files["good"], extra=tls_args(pki)),
            "no-cert": storescu(tls_port, files["no-cert"], extra=tls_args(pki, None)),
            "rogue": storescu(tls_port, files["rogue"], extra=tls_args(pki, "rogue_modality")),
            "plain-to-tls": storescu(tls_port, files["plain-to-tls"]),
            "stranger": storescu(tls_port, files["stranger"], calling_ae="STRANGER", extra=tls_args(pki)),
            "plain": storescu(scp.port, files["plain"]),  # the plain listener still works
        }
        answers = {name: store_responses(proc) for name, proc in outcomes.items()}
        assert answers == {"good": ["Success"], "no-cert": [], "rogue": [], "plain-to-tls": [], "stranger": [],
                           "plain": ["Success"]}, answers
        for name in ("no-cert", "rogue", "plain-to-tls", "stranger"):
            assert "Association Accepted" not in outcomes[name].stdout + outcomes[name].stderr, name
        assert "Calling AE Title Not Recognized" in outcomes["stranger"].stdout + outcomes["stranger"].stderr

        from sqlalchemy import select

        from node.db import Instance, Study

        with sqlite_db.session() as s:
            stored = {row.sop_instance_uid for row in s.scalars(select(Instance))}
            assert {st.calling_ae for st in s.scalars(select(Study))} == {"MODALITY"}
        from pydicom import dcmread

        assert stored == {str(dcmread(files[n]).SOPInstanceUID) for n in ("good", "plain")}

        wait_until(lambda: len(events) >= 8, 30, what="association events")
        tls_events = [e for e in events if e.tls]
        kinds = sorted(e.kind for e in tls_events)
        # good: accepted + released; no-cert, rogue and plain TCP: handshake failures; stranger: A-ASSOCIATE-RJ.
        assert kinds == ["accepted", "rejected", "rejected", "rejected", "rejected", "released"], tls_events
        handshake = [e for e in tls_events if e.reason.startswith("TLS handshake failed")]
        assert len(handshake) == 3 and all(e.calling_ae == "" for e in handshake), handshake
        (stranger,) = [e for e in tls_events if e.calling_ae == "STRANGER"]
        assert stranger.kind == "rejected" and stranger.reason.startswith("calling AE title not recognised")
        released = next(e for e in tls_events if e.kind == "released")
        assert released.calling_ae == "MODALITY" and len(released.study_uids) == 1
        assert [e.kind for e in events if not e.tls] == ["accepted", "released"]
        for event in handshake:
            print(f"refused on the TLS port: {event.reason}")
        assert echoscu(scp.port, calling_ae="MODALITY")
    finally:
        scp.stop()


def _tls_orthanc(work: Path, pki) -> Orthanc:
    # Orthanc 1.10.1: its DICOM port becomes TLS-only; clients need a certificate it trusts.
    return Orthanc(work / "orthanc", extra_config={
        "DicomTlsEnabled": True,
        "DicomTlsCertificate": str(pki["orthanc"].certificate),
        "DicomTlsPrivateKey": str(pki["orthanc"].private_key),
        "DicomTlsTrustedCertificates": str(pki["ca"].certificate),
        "DicomTlsRemoteCertificateRequired": True,
    }).start()


def test_tls_end_to_end_modality_to_carina_to_a_tls_orthanc(pki, tmp_path):
    pacs = _tls_orthanc(tmp_path, pki)
    client, tls_port = pki["carina_client"], free_port()
    base = {"type": "dicom", "ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.dicom_port}
    node = CarinaNode(tmp_path / "carina", destinations=[
        {**base, "name": "pacs", "tls": {"ca_certificates": str(pki["ca"].certificate),
                                         "certificate": str(client.certificate), "private_key": str(client.private_key)}},
        # Trusts another CA: Orthanc's certificate must not be accepted.
        {**base, "name": "pacs-untrusted", "tls": {"ca_certificates": str(pki["rogue_ca"].certificate),
                                                   "certificate": str(client.certificate),
                                                   "private_key": str(client.private_key)}},
        {**base, "name": "pacs-plain"},  # no TLS against a TLS port
    ], extra={"dicom": {"tls": {"port": tls_port, "certificate": str(pki["carina_server"].certificate),
                                "private_key": str(pki["carina_server"].private_key),
                                "ca_certificates": str(pki["ca"].certificate)}}})
    node.create_token()
    try:
        node.start()
        ds = make_dx(patient_id="TLS-E2E")
        proc = storescu(tls_port, write(ds, tmp_path / "dx.dcm"), extra=tls_args(pki))
        assert store_responses(proc) == ["Success"], proc.stdout + proc.stderr

        uid = ds.StudyInstanceUID
        view = wait_until(lambda: (v := node.api(f"/api/v1/studies/{uid}"))["state"] in ("done", "failed") and v, 240,
                          what="study processed")
        assert view["state"] == "done", view
        deliveries = wait_until(
            lambda: (d := {x["destination"]: x for x in node.api(f"/api/v1/studies/{uid}")["deliveries"]})
            and d["pacs"]["state"] == "done" and all(d[n]["last_error"] for n in ("pacs-untrusted", "pacs-plain")) and d,
            180, what="TLS delivery done, the others failing")
        # Same PACS, same client certificate: only the CA differs, so only certificate checking fails it.
        assert deliveries["pacs-untrusted"]["state"] != "done" and deliveries["pacs-plain"]["state"] != "done"

        receptions = [r for r in pacs.receptions() if r["study"] == uid]
        assert receptions and {r["calling_ae"] for r in receptions} == {"CARINA"}
        classes = [r["tags"].get("SOPClassUID") for r in receptions]
        assert classes.count(SR_CLASS) == 1, classes
        print(f"over TLS: {len(receptions)} objects in Orthanc; untrusted: {deliveries['pacs-untrusted']['last_error']}; "
              f"plain: {deliveries['pacs-plain']['last_error']}")
    finally:
        node.stop()
        pacs.stop()
