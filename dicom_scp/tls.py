"""TLS contexts for DICOM (PS3.15 Annex B, the BCP 195 profiles): TLS 1.2 or later,
certificates verified against the configured CA bundle, never the system store
(a hospital's DICOM peers are signed by its own CA)."""
from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path


def _tls12_or_later(context: ssl.SSLContext) -> ssl.SSLContext:
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def server_context(*, certificate: Path, private_key: Path, ca_certificates: Path | None,
                   require_client_certificate: bool = True) -> ssl.SSLContext:
    """For the SCP's TLS listener. With `require_client_certificate` a sender
    without a certificate signed by `ca_certificates` fails the handshake."""
    context = _tls12_or_later(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    context.load_cert_chain(certfile=str(certificate), keyfile=str(private_key))
    if ca_certificates is not None:
        context.load_verify_locations(cafile=str(ca_certificates))
        context.verify_mode = ssl.CERT_REQUIRED if require_client_certificate else ssl.CERT_OPTIONAL
    elif require_client_certificate:
        raise ValueError("a client certificate can only be required with ca_certificates to check it against")
    else:
        context.verify_mode = ssl.CERT_NONE
    return context


def client_context(*, ca_certificates: Path, certificate: Path | None = None,
                   private_key: Path | None = None) -> ssl.SSLContext:
    """For sending: the server's certificate must chain to `ca_certificates` and
    name the host we connect to; our own certificate is presented when given."""
    context = _tls12_or_later(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))  # CERT_REQUIRED + hostname check
    context.load_verify_locations(cafile=str(ca_certificates))
    if certificate is not None:
        context.load_cert_chain(certfile=str(certificate), keyfile=str(private_key) if private_key else None)
    return context


@dataclass(frozen=True)
class TlsListener:
    """The SCP's TLS-only port and the context its connections are wrapped with."""

    port: int
    context: ssl.SSLContext
