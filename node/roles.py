"""What each `carina serve --role` runs; the why is in node/service.py's docstring.

A module of its own, free of heavy imports, because the CLI's parser needs
the role names before anything (torch included) is loaded."""
from __future__ import annotations

ROLES = ("all", "receiver", "worker", "api")
# The parts whose readiness each role reports (/healthz, /readyz): a worker has no SCP to wait for.
ROLE_PARTS = {"all": ("db", "scp", "model"), "receiver": ("db", "scp"), "worker": ("db", "model"), "api": ("db",)}


def runs(role: str, part: str) -> bool:
    """Whether a process of `role` runs `part` (node/service.py docstring)."""
    intake = role in ("all", "receiver")
    return {
        "scp": intake, "hl7_listener": intake, "schedulers": intake, "sweep": intake, "syslog": intake,
        "workers": role in ("all", "worker"),
        "model": role in ("all", "worker", "api"),
        "http_api": role in ("all", "api"),
        "fhir_reindex": role == "all",  # `carina db upgrade` does it for the other roles
    }[part]
