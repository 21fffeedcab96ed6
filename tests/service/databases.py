"""Database fixtures for the store's tests: each test on SQLite and, when configured, on PostgreSQL.

PostgreSQL runs only when HIDREAM_TEST_POSTGRES_URL names a server and database (`.ci/run` sets
it); each test then gets a schema of its own, created before and dropped (CASCADE) after it.
Import the fixtures into a test module: `from databases import store_url  # noqa: F401`.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, make_url, text
from sqlalchemy.pool import NullPool

POSTGRES_ENV = "HIDREAM_TEST_POSTGRES_URL"
SKIP_REASON = (f"PostgreSQL tests: set {POSTGRES_ENV} to a database the tests may create schemas in, "
               f"e.g. {POSTGRES_ENV}=postgresql://postgres@127.0.0.1:5432/test (.ci/run does)")


def postgres_base_url() -> str | None:
    return os.environ.get(POSTGRES_ENV) or None


def _sqlalchemy_url(url: str) -> str:
    """The psycopg 3 form of a postgresql:// URL (what the store's connect() does too)."""
    for scheme in ("postgresql://", "postgres://"):
        if url.startswith(scheme):
            return "postgresql+psycopg://" + url.removeprefix(scheme)
    return url


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/db.sqlite"


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A URL whose connections use a fresh schema (search_path), dropped after the test; skips if unset."""
    base = postgres_base_url()
    if base is None:
        pytest.skip(SKIP_REASON)
    schema = f"t_{secrets.token_hex(6)}"
    admin = create_engine(_sqlalchemy_url(base), poolclass=NullPool, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f"CREATE SCHEMA {schema}"))
        url = make_url(_sqlalchemy_url(base))
        options = " ".join(filter(None, [url.query.get("options"), f"-csearch_path={schema}"]))
        yield url.update_query_dict({"options": options}).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text("SET lock_timeout = '10s'"))  # a connection a test leaked in a transaction
            conn.execute(text(f"DROP SCHEMA IF EXISTS {schema} CASCADE"))
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest) -> str:
    """A database URL for the store, once per backend: an SQLite file, or a PostgreSQL schema."""
    return request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "postgres_url")


@pytest.fixture
def store(store_url: str):
    """A migrated Store on the parametrized database, closed afterwards."""
    from hidream.service.store import Store

    s = Store.open(store_url)
    yield s
    s.close()


@pytest.fixture
def key(store) -> str:
    """The id of a fresh API key in `store`."""
    return store.create_key("test")[0].id
