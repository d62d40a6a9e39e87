"""Who may call what: roles, permissions, and the policy every route declares.

Every route carries exactly one policy, as a FastAPI dependency:

    @router.get("/studies", dependencies=[require(Permission.READ_STUDIES)])
    @app.get("/healthz", dependencies=[public("load balancers probe it; no patient data")])

`require` authenticates (bearer token or session cookie, node/api/auth.py),
checks the role's permission (401 without valid credentials, 403 without the
permission), checks the CSRF token on state-changing requests made with a
session cookie, and leaves the principal in `request.state.principal`.
`public` is the explicit, reasoned exception. Static mounts are declared with
`mount_public`. `check_policies(app)` runs when the app is built and refuses
to build an app with a route that has no policy (or two), so a route without
a policy cannot be served; tests/test_route_policy.py enumerates `app.routes`
and checks every route against every role.
"""
from __future__ import annotations

import hmac
from enum import StrEnum

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.routing import iter_route_contexts
from starlette.routing import Mount


class Role(StrEnum):
    VIEWER = "viewer"
    RADIOLOGIST = "radiologist"
    INTEGRATION = "integration"  # machines: an EHR pulling FHIR, a client calling predict
    ADMIN = "admin"


# People log in to the UI; integration is for tokens only.
USER_ROLES = (Role.VIEWER, Role.RADIOLOGIST, Role.ADMIN)


class Permission(StrEnum):
    SESSION = "session"  # any valid credential: who am I, log out, the API schema
    READ_STUDIES = "studies:read"
    READ_FHIR = "fhir:read"
    PREDICT = "predict"
    FEEDBACK = "feedback"  # a radiologist's verdict on an AI finding (no route yet takes it)
    STOW = "dicomweb:store"  # STOW-RS studies in (tokens listed in dicomweb.stow_senders)
    ADMIN = "admin"  # jobs, retries, the audit trail


GRANTS: dict[Role, frozenset[Permission]] = {
    Role.VIEWER: frozenset({Permission.SESSION, Permission.READ_STUDIES, Permission.READ_FHIR}),
    Role.RADIOLOGIST: frozenset({Permission.SESSION, Permission.READ_STUDIES, Permission.READ_FHIR,
                                 Permission.PREDICT, Permission.FEEDBACK}),
    Role.INTEGRATION: frozenset({Permission.SESSION, Permission.READ_FHIR, Permission.PREDICT, Permission.STOW}),
    Role.ADMIN: frozenset(Permission),
}

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
CSRF_HEADER = "x-csrf-token"


def allows(role: str, permission: Permission) -> bool:
    try:
        return permission in GRANTS[Role(role)]
    except ValueError:
        return False


class Policy:
    """The dependency behind `require` and `public`; also the marker `check_policies` looks for."""

    def __init__(self, permission: Permission | None, reason: str = ""):
        if permission is None and not reason:
            raise ValueError("a public route must say why it is public")
        self.permission = permission
        self.reason = reason

    def __repr__(self) -> str:
        return f"public({self.reason!r})" if self.permission is None else f"require({self.permission.value})"

    def __call__(self, request: Request):
        if self.permission is None:
            return None
        from node.api import auth
        from node.audit import events

        principal = auth.authenticate(request)  # 401 unless a valid credential
        # Known even when refused below: a refusal page still shows who is logged in.
        request.state.principal = principal
        node = request.app.state.node
        if not allows(principal.role, self.permission):
            events.access_denied(node.audit, auth.actor(request, principal), request.method, request.url.path,
                                 f"role {principal.role} lacks {self.permission.value}")
            raise HTTPException(403, f"role {principal.role!r} may not do this (needs {self.permission.value})")
        if principal.kind == "session" and request.method not in SAFE_METHODS:
            given = request.headers.get(CSRF_HEADER, "")
            if not given or not hmac.compare_digest(given, principal.csrf_token):
                events.access_denied(node.audit, auth.actor(request, principal), request.method, request.url.path,
                                     "missing or wrong CSRF token")
                raise HTTPException(403, "missing or wrong X-CSRF-Token header for a session request (CSRF)")
        request.state.principal = principal
        return principal


def require(permission: Permission):
    return Depends(Policy(permission))


def public(reason: str):
    return Depends(Policy(None, reason))


def mount_public(app: FastAPI, path: str, asgi_app, name: str, reason: str) -> None:
    """Mount a sub-application (static files) that needs no credentials, saying why."""
    app.mount(path, asgi_app, name=name)
    _public_mounts(app)[path] = reason


def _public_mounts(app: FastAPI) -> dict[str, str]:
    if not hasattr(app.state, "public_mounts"):
        app.state.public_mounts = {}
    return app.state.public_mounts


def routes(app: FastAPI) -> list:
    """Every route the app serves, with routers' prefixes and dependencies applied
    (FastAPI's own enumeration: an included router is one entry in `app.routes`)."""
    return list(iter_route_contexts(app.routes))


def route_policies(route) -> list[Policy]:
    found: list[Policy] = []

    def walk(dependant):
        for dep in dependant.dependencies:
            if isinstance(dep.call, Policy):
                found.append(dep.call)
            walk(dep)

    walk(route.dependant)
    return found


def describe(route) -> str:
    methods = ",".join(sorted(getattr(route, "methods", None) or [])) or type(route.original_route).__name__
    return f"{methods} {getattr(route, 'path', route)}"


def policy_of(app: FastAPI, route) -> Policy:
    """The one policy of a route (an entry of `routes(app)`); raises LookupError if it has none or several."""
    if getattr(route, "dependant", None) is not None:
        policies = route_policies(route)
        if len(policies) != 1:
            raise LookupError(f"{describe(route)}: {len(policies)} policies {policies}")
        return policies[0]
    if isinstance(route.original_route, Mount) and route.path in _public_mounts(app):
        return Policy(None, _public_mounts(app)[route.path])
    raise LookupError(f"{describe(route)}: no policy (a route needs require() or public(); a mount, mount_public)")


def check_policies(app: FastAPI) -> None:
    problems = []
    for route in routes(app):
        try:
            policy_of(app, route)
        except LookupError as exc:
            problems.append(str(exc))
    if problems:
        raise RuntimeError("routes without exactly one access policy:\n  " + "\n  ".join(problems))
