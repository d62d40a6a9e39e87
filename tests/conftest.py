import sys
from pathlib import Path

# Test helpers (dicom_factory, peers) are plain modules next to the tests.
sys.path.insert(0, str(Path(__file__).resolve().parent))


import pytest


@pytest.fixture(scope="session")
def demo_model(tmp_path_factory):
    """The demo-weights model, loaded once per test session.

    Hermetic: a developer's real ~/.torchxrayvision weights must not turn this
    into a real model."""
    import torchxrayvision as xrv

    from inference.model import load_model

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(xrv.utils, "get_cache_dir", lambda: str(tmp_path_factory.mktemp("empty-cache")) + "/")
        return load_model(None, device="cpu")


_POSTGRES_USED: list[str] = []  # for the terminal summary: which server the run used


@pytest.fixture(scope="session")
def postgres_url():
    """The machine's PostgreSQL when it accepts us, else a throwaway cluster torn down at session end."""
    from postgres_peer import MACHINE_POSTGRES_URL, ThrowawayCluster, unusable

    reason = unusable(MACHINE_POSTGRES_URL)
    if reason is None:
        _POSTGRES_USED.append(f"the machine's, {MACHINE_POSTGRES_URL}")
        yield MACHINE_POSTGRES_URL
        return
    cluster = ThrowawayCluster()
    try:
        url = cluster.start()
        _POSTGRES_USED.append(f"a throwaway cluster ({cluster.bin}) at {url}, "
                              f"because {MACHINE_POSTGRES_URL} is unusable: {reason}")
        yield url
    finally:
        cluster.stop()


def pytest_terminal_summary(terminalreporter):
    for used in _POSTGRES_USED:
        terminalreporter.write_line(f"PostgreSQL: {used}")


def _sqlite_database(path):
    from node.db import Database

    db = Database(f"sqlite:///{path}")
    db.create_schema()
    return db


def postgres_schema(url):
    """A fresh, empty schema in the `test` database: (a URL whose search_path is that
    schema, a function that drops it). Each test gets its own, so tests never see
    each other's rows and nothing is left behind."""
    import uuid

    from sqlalchemy import create_engine, text

    schema = f"carina_test_{uuid.uuid4().hex[:10]}"
    admin = create_engine(url)
    try:
        with admin.begin() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    except Exception as exc:  # a missing server is a failure, never a skip
        admin.dispose()
        pytest.fail(f"PostgreSQL at {url} is required for the scale-out tests: {exc}")

    def drop():
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()

    return f"{url}?options=-csearch_path%3D{schema}", drop


def _postgres_database(url):
    """A Database on a fresh schema in the `test` database, dropped afterwards."""
    from node.db import Database

    schema_url, drop_schema = postgres_schema(url)
    db = Database(schema_url)
    db.create_schema()

    def drop():
        db.dispose()
        drop_schema()

    return db, drop


@pytest.fixture
def sqlite_db(tmp_path):
    db = _sqlite_database(tmp_path / "carina.db")
    yield db
    db.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def any_db(request, tmp_path):
    """The same test on the embedded default and on the scale-out database."""
    if request.param == "sqlite":
        db = _sqlite_database(tmp_path / "carina.db")
        yield db
        db.dispose()
    else:
        db, drop = _postgres_database(request.getfixturevalue("postgres_url"))
        yield db
        drop()


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_database_url(request, tmp_path):
    """A database URL with nothing in it yet, on each back-end (for the schema migration tests)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'carina.db'}"
    else:
        url, drop = postgres_schema(request.getfixturevalue("postgres_url"))
        yield url
        drop()


# --- the same tests on both back-ends ---------------------------------------------------------
# Modules that list `pytestmark = pytest.mark.usefixtures("both_backends")` run every test twice:
# on SQLite (the embedded default) and on PostgreSQL. For PostgreSQL, CARINA_DATABASE__URL (the
# configuration's database.url, from the environment as a container sets it) points every
# Settings of the test process and every `carina` subprocess (tests/peers.py CarinaNode) at a
# fresh schema, dropped after the test. README.md "Tests" lists the modules.

DATABASE_URL_ENV = "CARINA_DATABASE__URL"


@pytest.fixture(params=["sqlite", "postgresql"])
def both_backends(request):
    with pytest.MonkeyPatch.context() as mp:
        if request.param == "sqlite":
            mp.delenv(DATABASE_URL_ENV, raising=False)
            yield "sqlite"
            return
        url, drop = postgres_schema(request.getfixturevalue("postgres_url"))
        _migrate(url)  # what the operator does first (`carina db upgrade`): a node refuses an unmigrated PostgreSQL
        mp.setenv(DATABASE_URL_ENV, url)
        try:
            yield "postgresql"
        finally:
            drop()


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def module_backend(request):
    """The same for a module whose tests share one node (a module-scoped fixture): the
    PostgreSQL URL of a schema made for the module, or None for SQLite."""
    if request.param == "sqlite":
        yield None
        return
    url, drop = postgres_schema(request.getfixturevalue("postgres_url"))
    _migrate(url)
    try:
        yield url
    finally:
        drop()


def _migrate(url: str) -> None:
    from node.db import Database

    db = Database(url)
    try:
        db.create_schema()
    finally:
        db.dispose()
