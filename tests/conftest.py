"""Shared fixtures: a real, freshly migrated store on each backend.

``store`` is parametrised over SQLite (a fresh file per test) and PostgreSQL (a fresh
database per test on the server named by ``COVE_TEST_PG_URL``; ``make test`` starts a
throwaway one). Without that variable the PostgreSQL cases are skipped, with the reason.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from cove.store import Store

PG_ENV = "COVE_TEST_PG_URL"
PG_SKIP_REASON = (
    f"PostgreSQL tests need {PG_ENV} (make test sets it; for development: "
    "d=$(mktemp -d /tmp/cove-pg.XXXX); scripts/pg.sh start $d)"
)

BACKENDS = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
]


@pytest.fixture(scope="session")
def pg_admin() -> Iterator[sa.Engine]:
    url = os.environ.get(PG_ENV)
    if not url:
        pytest.skip(PG_SKIP_REASON)
    engine = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    yield engine
    engine.dispose()


def fresh_database_url(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """A URL for an empty database of *backend* that is removed after the test."""
    if backend == "sqlite":
        return f"sqlite:///{tmp_path}/cove.db"
    admin: sa.Engine = request.getfixturevalue("pg_admin")
    name = f"t_{uuid.uuid4().hex[:16]}"
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')

    def drop() -> None:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    request.addfinalizer(drop)
    return admin.url.set(database=name).render_as_string(hide_password=False)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def store(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Store]:
    """A migrated store on *backend*, empty, used by this test alone."""
    s = Store(fresh_database_url(backend, tmp_path, request))
    s.migrate()
    yield s
    s.close()


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Iterator[Store]:
    s = Store(f"sqlite:///{tmp_path}/cove.db")
    s.migrate()
    yield s
    s.close()
