"""Bearer-token authentication for the REST and FHIR APIs.

Tokens are random 256-bit secrets shown once at creation; the database keeps
only their SHA-256, so a leaked database does not leak working credentials.
"""
from __future__ import annotations

import hashlib
import secrets

from fastapi import HTTPException, Request
from sqlalchemy import select

from node.db import ApiToken, Database

ROLES = ("integration", "admin", "viewer")


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_token(db: Database, name: str, role: str) -> str:
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}")
    token = "crn_" + secrets.token_urlsafe(32)
    with db.session() as s:
        if s.scalar(select(ApiToken).where(ApiToken.name == name)) is not None:
            raise ValueError(f"a token named {name!r} already exists")
        s.add(ApiToken(name=name, role=role, token_sha256=hash_token(token)))
    return token


def lookup_token(db: Database, token: str) -> ApiToken | None:
    with db.session() as s:
        row = s.scalar(select(ApiToken).where(ApiToken.token_sha256 == hash_token(token)))
        return row if row is not None and row.revoked_at is None else None


def require_token(request: Request) -> ApiToken:
    """FastAPI dependency: 401 unless `Authorization: Bearer <valid token>`."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise HTTPException(401, "missing bearer token", headers={"WWW-Authenticate": "Bearer"})
    row = lookup_token(request.app.state.node.db, token.strip())
    if row is None:
        raise HTTPException(401, "invalid or revoked token", headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
    return row
