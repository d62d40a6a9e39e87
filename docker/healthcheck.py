"""The image's HEALTHCHECK: exit 0 when Carina's /healthz answers 200, else 1.

Liveness only (200 while the process serves HTTP, whatever its role);
readiness is /readyz, which the orchestrator asks separately. The port is
api.port as the environment sets it (CARINA_API__PORT), else the default
8080; with api.tls on, HTTPS without verification (the certificate names the
service, not 127.0.0.1). Standard library only: it runs in a second.
"""
from __future__ import annotations

import os
import ssl
import sys
import urllib.request


def healthz_url() -> str:
    port = os.environ.get("CARINA_API__PORT", "8080")
    scheme = "https" if os.environ.get("CARINA_API__TLS__CERTFILE") else "http"
    return f"{scheme}://127.0.0.1:{port}/healthz"


def main() -> int:
    context = ssl._create_unverified_context()  # loopback probe of our own process
    try:
        with urllib.request.urlopen(healthz_url(), timeout=4, context=context) as response:
            return 0 if response.status == 200 else 1
    except OSError as exc:  # URLError, HTTPError and timeouts are OSErrors
        print(f"healthcheck: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
