"""Browser sessions: log in with a user name and password, get a cookie.

The cookie is HttpOnly, SameSite=Strict and, when Carina is served over HTTPS
(`api.tls` or `security.assume_https`), Secure with the `__Host-` prefix.
It holds a random secret; the database keeps its SHA-256. A session ends at
logout, after `security.session_idle_minutes` without a request, after
`security.session_max_hours`, or when its user is disabled or changes password
or role.

CSRF: every state-changing request made with the cookie must carry the
session's token in `X-CSRF-Token` (checked by node/api/policy.py); the login
itself accepts only a JSON body (which a cross-site form cannot send without a
CORS preflight that Carina never answers) and refuses a foreign `Origin`.
"""
from __future__ import annotations

import hashlib
import secrets

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from sqlalchemy import select

from node import users
from node.api.auth import Principal, actor, client_address
from node.api.policy import GRANTS, Permission, Role, public, require
from node.api.ratelimit import limiter
from node.audit import events
from node.config import Settings
from node.db import User, WebSession, now

LAST_SEEN_RESOLUTION_SECONDS = 30.0

router = APIRouter(prefix="/api/v1", tags=["session"])


def https(settings: Settings) -> bool:
    return settings.api.tls.enabled or settings.security.assume_https


def cookie_name(settings: Settings) -> str:
    # __Host-: the browser only accepts it Secure, for this host, on path /.
    return "__Host-carina_session" if https(settings) else "carina_session"


def _sha(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _clear_cookie_header(settings: Settings) -> str:
    secure = "; Secure" if https(settings) else ""
    return f"{cookie_name(settings)}=; Max-Age=0; Path=/; HttpOnly; SameSite=Strict{secure}"


def session_principal(request: Request, secret: str) -> Principal:
    node = request.app.state.node
    sec = node.settings.security
    t = now()
    problem, who = None, None
    with node.db.session() as s:
        row = s.scalar(select(WebSession).where(WebSession.secret_sha256 == _sha(secret)))
        user = s.get(User, row.user_id) if row is not None else None
        if row is None or user is None:
            problem = "unknown session"
        else:
            who = user
            if row.ended_at is not None:
                problem = "session ended"
            elif t >= row.expires_at:
                problem = "session reached security.session_max_hours"
            elif t - row.last_seen_at > sec.session_idle_minutes * 60:
                problem = "session idle longer than security.session_idle_minutes"
                row.ended_at = t
            elif user.disabled_at is not None:
                problem = "user disabled"
            elif t - row.last_seen_at >= LAST_SEEN_RESOLUTION_SECONDS:
                row.last_seen_at = t
        principal = None if problem else Principal("session", user.name, user.role, row.csrf_token, row.id)
    if principal is None:
        events.credential_refused(node.audit, events.Actor(who.name if who else "unknown session",
                                                           who.role if who else "", client_address(request)), problem)
        raise HTTPException(401, f"invalid credential: {problem}; log in again at /login",
                            headers={"WWW-Authenticate": "Bearer", "Set-Cookie": _clear_cookie_header(node.settings)})
    return principal


class LoginRequest(BaseModel):
    username: str = Field(min_length=1, max_length=64)
    password: str = Field(min_length=1, max_length=1024)


def _same_origin(request: Request) -> bool:
    origin = request.headers.get("origin")
    if origin is None:
        return True  # not a browser, or a same-origin GET-like request; SameSite and JSON guard the rest
    host = request.headers.get("host", "")
    return origin in (f"http://{host}", f"https://{host}")


@router.post("/session", dependencies=[public("the login itself; rate-limited, JSON only, same origin")])
def login(request: Request, credentials: LoginRequest) -> Response:
    node = request.app.state.node
    address = client_address(request)
    attempt = events.Actor(credentials.username, "", address)
    rate = node.settings.security.login_rate
    wait = limiter(request.app, "login", rate).hit(("address", address), ("user", credentials.username))
    if wait is not None:
        events.login(node.audit, attempt, success=False, why="rate limited (security.login_rate)")
        return JSONResponse({"detail": "too many login attempts; try again later"}, status_code=429,
                            headers={"Retry-After": str(wait)})
    if not _same_origin(request):
        events.login(node.audit, attempt, success=False, why="cross-origin login refused")
        raise HTTPException(403, "cross-origin login refused")
    result = users.authenticate(node.db, credentials.username, credentials.password)
    if result.user is None:
        events.login(node.audit, attempt, success=False, why=result.why)
        raise HTTPException(401, "unknown user or wrong password")
    user = result.user
    secret, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    sec = node.settings.security
    t = now()
    with node.db.session() as s:
        s.add(WebSession(user_id=user.id, secret_sha256=_sha(secret), csrf_token=csrf, address=address[:64],
                         created_at=t, last_seen_at=t, expires_at=t + sec.session_max_hours * 3600))
    events.login(node.audit, events.Actor(user.name, user.role, address), success=True)
    response = JSONResponse({"user": user.name, "role": user.role, "csrf_token": csrf,
                             "permissions": sorted(GRANTS[Role(user.role)])})
    response.set_cookie(cookie_name(node.settings), secret, max_age=int(sec.session_max_hours * 3600), path="/",
                        httponly=True, samesite="strict", secure=https(node.settings))
    return response


@router.get("/session", dependencies=[require(Permission.SESSION)])
def whoami(request: Request) -> dict:
    principal: Principal = request.state.principal
    body = {"kind": principal.kind, "name": principal.name, "role": principal.role,
            "permissions": sorted(GRANTS[Role(principal.role)])}
    if principal.kind == "session":
        body["csrf_token"] = principal.csrf_token
    return body


@router.delete("/session", status_code=204, dependencies=[require(Permission.SESSION)])
def logout(request: Request) -> Response:
    """End this browser session (a token has no session: nothing to end; revoke it with the CLI)."""
    node = request.app.state.node
    principal: Principal = request.state.principal
    response = Response(status_code=204)
    if principal.kind == "session":
        with node.db.session() as s:
            row = s.get(WebSession, principal.session_id)
            if row is not None and row.ended_at is None:
                row.ended_at = now()
        events.logout(node.audit, actor(request, principal))
        response.headers["Set-Cookie"] = _clear_cookie_header(node.settings)
    return response
