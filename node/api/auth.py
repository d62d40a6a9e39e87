"""Credentials: bearer tokens for machines and scripts, session cookies for browsers.

Tokens are random 256-bit secrets shown once at creation; the database keeps
only their SHA-256, so a leaked database does not leak working credentials.
Each carries a role, an expiry and its last-used time. Sessions
(node/api/sessions.py) are the same idea for a logged-in user.

`authenticate(request)` answers with a `Principal` or raises 401; a presented
credential that is unknown, expired, revoked or disabled is also recorded in
the audit trail (110114, outcome 4). Authorisation is node/api/policy.py.
"""
from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from fastapi import HTTPException, Request
from sqlalchemy import select

from node.api.policy import Role
from node.audit import events
from node.db import ApiToken, Database, now

# Writing last_used_at on every request would turn every read into a write.
LAST_USED_RESOLUTION_SECONDS = 60.0


@dataclass(frozen=True)
class Principal:
    kind: str  # "token" or "session"
    name: str  # the token's or the user's name
    role: str
    csrf_token: str = ""  # sessions only
    session_id: int | None = None

    @property
    def user_id(self) -> str:
        """How the audit trail names this principal."""
        return f"token:{self.name}" if self.kind == "token" else self.name


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def client_address(request: Request) -> str:
    return request.client.host if request.client else ""


def actor(request: Request, principal: Principal | None = None) -> events.Actor:
    principal = principal or getattr(request.state, "principal", None)
    if principal is None:
        return events.Actor("anonymous", "", client_address(request))
    return events.Actor(principal.user_id, principal.role, client_address(request))


# --- tokens -----------------------------------------------------------------------------------


def create_token(db: Database, name: str, role: str, expires_days: float = 90) -> str:
    if role not in set(Role):
        raise ValueError(f"role must be one of {', '.join(Role)}")
    if not name or len(name) > 64:
        raise ValueError("a token name is 1-64 characters")
    if expires_days <= 0:
        raise ValueError("--expires-days must be positive: every token expires")
    token = "crn_" + secrets.token_urlsafe(32)
    with db.session() as s:
        if s.scalar(select(ApiToken).where(ApiToken.name == name)) is not None:
            raise ValueError(f"a token named {name!r} already exists")
        s.add(ApiToken(name=name, role=role, token_sha256=hash_token(token),
                       expires_at=now() + expires_days * 86400))
    return token


def list_tokens(db: Database) -> list[ApiToken]:
    with db.session() as s:
        return list(s.scalars(select(ApiToken).order_by(ApiToken.name)))


def revoke_token(db: Database, name: str) -> bool:
    with db.session() as s:
        row = s.scalar(select(ApiToken).where(ApiToken.name == name))
        if row is None or row.revoked_at is not None:
            return False
        row.revoked_at = now()
        return True


def token_problem(row: ApiToken | None, at: float) -> str | None:
    """Why a token row cannot be used, or None."""
    if row is None:
        return "unknown token"
    if row.revoked_at is not None:
        return "token revoked"
    if row.expires_at is None:
        return "token has no expiry (made before tokens expired); re-issue it"
    if at >= row.expires_at:
        return "token expired"
    return None


def lookup_token(db: Database, token: str) -> ApiToken | None:
    """The token's row when it is usable now (not revoked, not expired)."""
    with db.session() as s:
        row = s.scalar(select(ApiToken).where(ApiToken.token_sha256 == hash_token(token)))
        return row if token_problem(row, now()) is None else None


def _token_principal(request: Request, token: str) -> Principal:
    db = request.app.state.node.db
    t = now()
    with db.session() as s:
        row = s.scalar(select(ApiToken).where(ApiToken.token_sha256 == hash_token(token)))
        problem = token_problem(row, t)
        if problem is None and (row.last_used_at is None or t - row.last_used_at >= LAST_USED_RESOLUTION_SECONDS):
            row.last_used_at = t
        name, role = (row.name, row.role) if row is not None else ("", "")
    if problem is not None:
        who = events.Actor(f"token:{name}" if name else "unknown token", role, client_address(request))
        events.credential_refused(request.app.state.node.audit, who, problem)
        raise HTTPException(401, f"invalid credential: {problem}",
                            headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
    return Principal("token", name, role)


def authenticate(request: Request) -> Principal:
    """The request's principal: a bearer token wins over a session cookie. 401 otherwise."""
    from node.api import sessions

    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return _token_principal(request, token.strip())
    cookie = request.cookies.get(sessions.cookie_name(request.app.state.node.settings))
    if cookie:
        return sessions.session_principal(request, cookie)
    raise HTTPException(401, "authentication required: a bearer token or a session (log in at /login)",
                        headers={"WWW-Authenticate": "Bearer"})
