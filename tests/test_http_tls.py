"""HTTPS served by `carina serve` itself (api.tls), with certificates the test
makes: the API answers over TLS and only over TLS, with HSTS, and the session
cookie becomes `__Host-` and Secure."""
from __future__ import annotations

import ssl

import httpx
import pytest

from peers import CarinaNode, wait_until
from pki import CA


def test_carina_serve_over_tls(tmp_path):
    ca = CA(tmp_path / "pki")
    server = ca.issue("carina", hosts=("127.0.0.1", "localhost"))
    node = CarinaNode(tmp_path / "node", extra={"api": {"tls": {"certfile": str(server.cert), "keyfile": str(server.key)}},
                                                "inference": {"device": "cpu"}})
    node.create_user("nurse", "viewer", "a long enough passphrase")
    node.start(wait_ready=False)
    https = f"https://127.0.0.1:{node.http_port}"
    trusted = ssl.create_default_context(cafile=str(ca.cert_path))
    try:
        client = httpx.Client(base_url=https, verify=trusted, timeout=30)
        wait_until(lambda: node.proc.poll() is None and client.get("/healthz").status_code in (200, 503), 120,
                   what="carina over HTTPS")
        health = client.get("/healthz")
        assert health.headers["strict-transport-security"] == "max-age=31536000; includeSubDomains"
        assert "server" not in health.headers  # no version banner

        login = client.post("/api/v1/session", json={"username": "nurse", "password": "a long enough passphrase"})
        assert login.status_code == 200, login.text
        set_cookie = login.headers["set-cookie"]
        assert set_cookie.startswith("__Host-carina_session=")
        assert all(flag in set_cookie.lower() for flag in ("secure", "httponly", "samesite=strict", "path=/"))
        assert client.get("/api/v1/session").json()["name"] == "nurse"

        # Plain HTTP on the TLS port gets nothing useful; an unknown CA is refused.
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{node.http_port}/healthz", timeout=10)
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{https}/healthz", verify=ssl.create_default_context(), timeout=10)
        # TLS 1.2 is the floor (Python's default for a server context).
        old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        old.load_verify_locations(str(ca.cert_path))
        old.maximum_version = ssl.TLSVersion.TLSv1_1
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{https}/healthz", verify=old, timeout=10)
        client.close()
    finally:
        node.stop()
