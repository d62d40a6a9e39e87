"""Is each destination reachable now? One probe per destination, by its protocol:

- DICOM: a C-ECHO (Verification) from the AE title deliveries use, over TLS
  when the destination has `tls:`;
- FHIR: `GET [base]/metadata` (the CapabilityStatement every server answers),
  with the destination's credentials;
- HL7 v2: an MLLP connection opened and closed (no message is sent: a test
  ORU would land in the RIS).

Probes run concurrently, each bounded by `timeout`; a failure is reported as
the error's class and a short message of our own, never the peer's text.
"""
from __future__ import annotations

import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from node.config import DicomDestination, FhirDestination, Hl7Destination, Settings

TIMEOUT = 5.0


@dataclass(frozen=True)
class ProbeResult:
    name: str
    type: str
    target: str  # host:port or base URL
    method: str  # C-ECHO, HTTP, MLLP
    ok: bool
    detail: str
    milliseconds: float


def _dicom(settings: Settings, d: DicomDestination, timeout: float) -> str:
    from dicom_scp.scu import SendError, echo
    from node.destinations.dicom import _tls

    try:
        status = echo(calling_ae=d.calling_ae_title or settings.dicom.ae_title, called_ae=d.ae_title, host=d.host,
                      port=d.port, timeout=timeout, tls=_tls(d), server_name=d.tls.server_name if d.tls else None)
    except SendError:
        raise ConnectionError("no association (refused, unreachable or not a DICOM peer)") from None
    if status != 0:
        raise ConnectionError(f"C-ECHO answered status 0x{status:04X}")
    return "C-ECHO answered success"


def _fhir(d: FhirDestination, timeout: float) -> str:
    import httpx

    from node.destinations.fhir import auth_headers

    headers = {"Accept": "application/fhir+json", **auth_headers(d)}
    url = d.base_url.rstrip("/") + "/metadata"
    try:
        with httpx.Client(timeout=timeout, verify=d.verify_tls) as client:
            response = client.get(url, headers=headers)
    except httpx.HTTPError as exc:
        raise ConnectionError(f"no HTTP answer ({type(exc).__name__})") from None
    if response.status_code >= 400:
        raise ConnectionError(f"GET metadata answered HTTP {response.status_code}")
    return f"GET metadata answered HTTP {response.status_code}"


def _mllp(d: Hl7Destination, timeout: float) -> str:
    try:
        with socket.create_connection((d.host, d.port), timeout=min(timeout, d.connect_timeout_seconds)):
            pass
    except OSError as exc:
        raise ConnectionError(f"no MLLP connection ({type(exc).__name__})") from None
    return "MLLP connection accepted"


def probe(settings: Settings, destination, timeout: float = TIMEOUT) -> ProbeResult:
    started = time.perf_counter()
    if isinstance(destination, DicomDestination):
        method, target, run = "C-ECHO", f"{destination.ae_title}@{destination.host}:{destination.port}", \
            lambda: _dicom(settings, destination, timeout)
    elif isinstance(destination, FhirDestination):
        method, target, run = "HTTP", destination.base_url, lambda: _fhir(destination, timeout)
    else:
        method, target, run = "MLLP", f"{destination.host}:{destination.port}", lambda: _mllp(destination, timeout)
    try:
        ok, detail = True, run()
    except Exception as exc:  # the probe reports; it never raises into the page
        message = str(exc) if isinstance(exc, ConnectionError) else ""
        ok, detail = False, message or f"probe failed: {type(exc).__name__}"
    return ProbeResult(destination.name, destination.type, target, method, ok, detail,
                       round((time.perf_counter() - started) * 1000, 1))


def probe_all(settings: Settings, timeout: float = TIMEOUT) -> list[ProbeResult]:
    destinations = list(settings.destinations)
    if not destinations:
        return []
    with ThreadPoolExecutor(max_workers=min(8, len(destinations))) as pool:
        return list(pool.map(lambda d: probe(settings, d, timeout), destinations))
