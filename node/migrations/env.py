"""Alembic's environment script, run by node/schema.py (never by the `alembic` command).

The caller hands over a connection already inside a transaction (and, on
PostgreSQL, holding the migration advisory lock), so that checking the
current revision and migrating are one atomic step even when several nodes
start `carina db upgrade` at once."""
from __future__ import annotations

from alembic import context

from node.db import Base

config = context.config
connection = config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    # SQLite cannot ALTER most things in place: batch mode copies the table.
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
    compare_server_default=False,
)
with context.begin_transaction():  # a no-op inside the caller's transaction
    context.run_migrations()
