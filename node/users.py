"""People who log in to the web UI: names, roles and argon2id password hashes.

Passwords never travel on a command line (`carina user add` reads a prompt or
stdin) and are stored only as argon2id hashes (argon2-cffi's defaults: RFC 9106
"second recommended" parameters). An unknown user name costs the same hash
verification as a wrong password, so response times do not reveal which
names exist.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import select, update

from node.api.policy import USER_ROLES
from node.db import Database, User, WebSession, now

_hasher = PasswordHasher()
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
_dummy_hash: str | None = None


class UserError(ValueError):
    """The operator's request cannot be done; the message says why."""


def check_password(password: str, min_length: int) -> None:
    if len(password) < min_length:
        raise UserError(f"a password needs at least {min_length} characters (security.password_min_length)")
    if len(password) > 1024:
        raise UserError("a password is at most 1024 characters")


def add_user(db: Database, name: str, role: str, password: str, *, min_length: int) -> None:
    if not _NAME.match(name):
        raise UserError("a user name is 1-64 letters, digits, '.', '_', '@' or '-', starting with a letter or digit")
    if role not in USER_ROLES:
        raise UserError(f"a user's role is one of {', '.join(USER_ROLES)} (integration is for tokens)")
    check_password(password, min_length)
    with db.session() as s:
        if s.scalar(select(User).where(User.name == name)) is not None:
            raise UserError(f"a user named {name!r} already exists")
        s.add(User(name=name, role=role, password_hash=_hasher.hash(password)))


def set_password(db: Database, name: str, password: str, *, min_length: int) -> None:
    check_password(password, min_length)
    with db.session() as s:
        user = _get(s, name)
        user.password_hash = _hasher.hash(password)
        user.password_changed_at = now()
        _end_sessions(s, user.id)


def set_role(db: Database, name: str, role: str) -> str:
    if role not in USER_ROLES:
        raise UserError(f"a user's role is one of {', '.join(USER_ROLES)}")
    with db.session() as s:
        user = _get(s, name)
        previous, user.role = user.role, role
        _end_sessions(s, user.id)  # the new role applies from the next login
        return previous


def set_disabled(db: Database, name: str, disabled: bool) -> None:
    with db.session() as s:
        user = _get(s, name)
        user.disabled_at = now() if disabled else None
        if disabled:
            _end_sessions(s, user.id)


def list_users(db: Database) -> list[User]:
    with db.session() as s:
        return list(s.scalars(select(User).order_by(User.name)))


@dataclass(frozen=True)
class LoginResult:
    user: User | None
    why: str  # for the audit trail, never shown to the caller


def authenticate(db: Database, name: str, password: str) -> LoginResult:
    global _dummy_hash
    with db.session() as s:
        user = s.scalar(select(User).where(User.name == name))
    if user is None:
        _dummy_hash = _dummy_hash or _hasher.hash("carina: no such user")
        _verify(_dummy_hash, password)
        return LoginResult(None, "unknown user")
    if not _verify(user.password_hash, password):
        return LoginResult(None, "wrong password")
    if user.disabled_at is not None:
        return LoginResult(None, "user disabled")
    if _hasher.check_needs_rehash(user.password_hash):
        with db.session() as s:
            s.execute(update(User).where(User.id == user.id).values(password_hash=_hasher.hash(password)))
    return LoginResult(user, "")


def _verify(password_hash: str, password: str) -> bool:
    try:
        return _hasher.verify(password_hash, password)
    except (VerificationError, InvalidHashError):
        return False


def _get(s, name: str) -> User:
    user = s.scalar(select(User).where(User.name == name))
    if user is None:
        raise UserError(f"no user named {name!r}")
    return user


def _end_sessions(s, user_id: int) -> None:
    s.execute(update(WebSession).where(WebSession.user_id == user_id, WebSession.ended_at.is_(None))
              .values(ended_at=now()))
