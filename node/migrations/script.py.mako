"""${message}

Revision ID: ${up_revision}
Revises: ${down_revision | comma,n}
Create Date: ${create_date}
"""
from __future__ import annotations

from alembic import op
import sqlalchemy as sa
${imports if imports else ""}

revision = ${repr(up_revision)}
down_revision = ${repr(down_revision)}
branch_labels = ${repr(branch_labels)}
depends_on = ${repr(depends_on)}

# What this revision adds, so that stamping a pre-Alembic database at the
# baseline (node/schema.py) leaves them to this revision: table names, and
# "table.column" for columns added to existing tables.
creates_tables: tuple[str, ...] = ()
adds_columns: tuple[str, ...] = ()


def upgrade() -> None:
    ${upgrades if upgrades else "pass"}


def downgrade() -> None:
    ${downgrades if downgrades else "pass"}
