"""The database schema's version: Alembic migrations, `carina db upgrade`, and the start-up check.

The revisions live in node/migrations/versions/ (0001 is the baseline: the
schema as node/db.py made it with `create_all` before Alembic). A database is
in one of five states (`SchemaStatus.state`):

- `current`: at this Carina's head revision; a node starts.
- `empty`: no Carina table at all. `carina db upgrade` creates everything.
  `carina serve` creates it by itself only on SQLite (the embedded default:
  `make run` on a fresh machine just works); a PostgreSQL database is
  migrated by the operator, once, before any node starts.
- `legacy`: Carina's tables but no `alembic_version` (made by `create_all`
  before migrations existed). `carina db upgrade` brings it to the baseline
  the old way (missing tables and columns, as the old start-up did), stamps
  it at the baseline and then upgrades it.
- `behind`: an older revision; `carina db upgrade` migrates it.
- `newer`: a revision this Carina does not know (a newer version migrated
  it). Refused, by `serve` and by `db upgrade` alike: running old code on a
  schema it does not know would corrupt data.

Upgrading checks the state and migrates in one transaction that holds a lock
(PostgreSQL: an advisory lock; SQLite: the write lock of BEGIN IMMEDIATE), so
several nodes or jobs running `carina db upgrade` at once migrate once.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection

from node.db import Base, Database, add_missing_columns

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
BASELINE = "0001"  # the schema before Alembic; legacy databases are stamped here
UPGRADE_COMMAND = "carina db upgrade"
# pg_advisory_xact_lock key: "carina-schema" folded into a bigint; any constant works.
_PG_LOCK_KEY = 0x6361_7269_6E61_5343
# A table every Carina schema since the first has had: its presence marks a legacy database.
_MARKER_TABLE = "studies"


class SchemaError(Exception):
    """The database schema does not fit this Carina; the message names the command that fixes it."""


@dataclass(frozen=True)
class SchemaStatus:
    state: str  # current | empty | legacy | behind | newer
    current: str | None  # the database's revision (None: no alembic_version)
    head: str  # this Carina's newest revision

    def describe(self) -> str:
        if self.state == "current":
            return f"database schema is current (revision {self.head})"
        if self.state == "empty":
            return f"the database has no Carina schema yet; run `{UPGRADE_COMMAND}` to create it (revision {self.head})"
        if self.state == "legacy":
            return (f"the database was made before schema migrations (no alembic_version table); run "
                    f"`{UPGRADE_COMMAND}` to stamp it at the baseline and migrate it to revision {self.head}")
        if self.state == "behind":
            return (f"the database schema is at revision {self.current}, this Carina needs {self.head}; "
                    f"run `{UPGRADE_COMMAND}` (with the same --config) before starting it")
        return (f"the database schema is at revision {self.current}, which this Carina does not know (its newest "
                f"is {self.head}): a newer Carina migrated it. Run that version (or a newer one); downgrading the "
                "schema is not supported")


@lru_cache(maxsize=1)
def script() -> ScriptDirectory:
    return ScriptDirectory(str(MIGRATIONS_DIR))


def head() -> str:
    return script().get_current_head()


def _config(connection: Connection) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["connection"] = connection
    return cfg


def _status(connection: Connection) -> SchemaStatus:
    current = MigrationContext.configure(connection).get_current_revision()
    top = head()
    if current is None:
        state = "legacy" if inspect(connection).has_table(_MARKER_TABLE) else "empty"
    elif current == top:
        state = "current"
    else:
        try:
            known = script().get_revision(current) is not None
        except Exception:  # alembic raises for an unknown id
            known = False
        state = "behind" if known else "newer"
    return SchemaStatus(state, current, top)


def status(db: Database) -> SchemaStatus:
    with db.engine.connect() as connection:
        return _status(connection)


def _lock(connection: Connection) -> None:
    """Serialise migrations across processes until the transaction ends."""
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK_KEY})
    # SQLite: node/db.py begins every transaction with BEGIN IMMEDIATE, the database's write lock.


def upgrade(db: Database) -> tuple[SchemaStatus, SchemaStatus]:
    """Migrate the database to head; returns (before, after). Raises SchemaError on a newer schema."""
    with db.engine.begin() as connection:
        _lock(connection)
        before = _status(connection)  # read under the lock: another node may just have migrated
        if before.state == "newer":
            raise SchemaError(before.describe())
        if before.state == "current":
            return before, before
        cfg = _config(connection)
        if before.state == "legacy":
            # What start-up did before Alembic: missing tables, then missing columns. That is
            # exactly the baseline, so the database can be stamped there and migrated on.
            later_tables, later_columns = _added_after_baseline()
            Base.metadata.create_all(connection, tables=[t for t in Base.metadata.sorted_tables
                                                         if t.name not in later_tables])
            added = add_missing_columns(connection, exclude=later_columns)
            log.info("legacy schema brought to the baseline (%d column(s) added) and stamped %s", len(added), BASELINE)
            command.stamp(cfg, BASELINE)
        command.upgrade(cfg, "head")
        after = _status(connection)
    log.info("database schema: %s -> %s", before.current or before.state, after.current)
    return before, after


def _added_after_baseline() -> tuple[frozenset[str], frozenset[str]]:
    """The tables and "table.column"s that revisions after the baseline add.

    Each revision lists them in module attributes `creates_tables` and
    `adds_columns` (see node/migrations/script.py.mako), so that stamping a
    legacy database brings it to the baseline and no further: the models in
    node/db.py are the head, not the baseline."""
    tables: set[str] = set()
    columns: set[str] = set()
    for rev in script().walk_revisions():
        if rev.revision != BASELINE:
            tables.update(getattr(rev.module, "creates_tables", ()))
            columns.update(getattr(rev.module, "adds_columns", ()))
    return frozenset(tables), frozenset(columns)


def check(db: Database, *, initialise_empty_sqlite: bool = True) -> SchemaStatus:
    """Before a node starts: the schema must be this Carina's head.

    A brand-new, empty SQLite database (the embedded default) is created here
    so that `carina serve` and `make run` work on a fresh machine; everything
    else that is not current is refused with the command that fixes it."""
    found = status(db)
    if found.state == "current":
        return found
    if found.state == "empty" and db.is_sqlite and initialise_empty_sqlite:
        return upgrade(db)[1]
    raise SchemaError(found.describe())
