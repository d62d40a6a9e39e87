"""Schema revisions, oldest first by `down_revision`; 0001 is the baseline (the schema before Alembic)."""
