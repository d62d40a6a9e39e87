"""Carina's Alembic environment: the schema's history, one revision per change.

`node/schema.py` drives it (`carina db upgrade`, the start-up check); there is
no alembic.ini: the environment is configured in code so that it ships inside
the package and always targets the node's own database settings."""
