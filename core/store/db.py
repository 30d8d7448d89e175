"""Engines, sessions and schema migrations.

The embedded default (SQLite under LMQ_HOME) is migrated automatically the
first time a process opens it; a shared PostgreSQL is migrated explicitly
with `lmq db upgrade`, so that many workers never race to change a schema.
"""

from __future__ import annotations

import itertools
import logging
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, TypeVar

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from lmq.core.config import Settings, SettingsError

MIGRATIONS = Path(__file__).parent / "migrations"

logger = logging.getLogger(__name__)
T = TypeVar("T")

# A database restart or failover is usually over within a minute.
RETRY_WITHIN_S = 90.0
_BACKOFF_S = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)

_engines: dict[str, Engine] = {}


class SchemaOutOfDate(RuntimeError):
    """The database is not at the newest migration."""


def get_engine(url: str) -> Engine:
    """One engine per URL per process: engines own connection pools."""
    engine = _engines.get(url)
    if engine is None:
        engine = _engines[url] = _create_engine(url)
    return engine


def _create_engine(url: str) -> Engine:
    if not url.startswith("sqlite"):
        try:
            return create_engine(url, pool_pre_ping=True)
        except ModuleNotFoundError as error:  # the URL's driver, e.g. psycopg for postgresql+psycopg://
            raise SettingsError(
                f"LMQ_DATABASE_URL needs the {error.name} package, which is not installed "
                "(PostgreSQL: pip install 'lmq[postgres]', in a clone pip install -e '.[postgres]')"
            ) from None
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

    @event.listens_for(engine, "connect")
    def _sqlite_pragmas(dbapi_connection, _record):
        # WAL lets `lmq jobs watch` read while a job writes; foreign keys are off by default.
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    return engine


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade(url: str) -> None:
    """Apply every migration not yet applied (what `lmq db upgrade` runs)."""
    config = alembic_config(url)
    with get_engine(url).begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


def schema_is_current(url: str) -> bool:
    head = ScriptDirectory.from_config(alembic_config(url)).get_current_head()
    with get_engine(url).connect() as connection:
        return MigrationContext.configure(connection).get_current_revision() == head


def ensure_schema(settings: Settings) -> None:
    """Migrate the embedded SQLite database; insist that any other is already migrated."""
    if settings.is_sqlite:
        if not schema_is_current(settings.database_url):
            upgrade(settings.database_url)
    elif not schema_is_current(settings.database_url):
        raise SchemaOutOfDate(
            "the database schema is not up to date: run `lmq db upgrade` "
            f"with LMQ_DATABASE_URL={settings.database_url}"
        )


def database_exists(settings: Settings) -> bool:
    """False only for an embedded SQLite file not created yet (a server database is assumed)."""
    if not settings.database_url.startswith("sqlite:///"):
        return True
    return Path(settings.database_url.removeprefix("sqlite:///")).exists()


_checked: set[str] = set()


def sessions(settings: Settings) -> sessionmaker[Session]:
    """A session factory on a database whose schema is known to be current."""
    if settings.database_url not in _checked:
        ensure_schema(settings)
        _checked.add(settings.database_url)
    return sessionmaker(get_engine(settings.database_url), expire_on_commit=False)


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One transaction: committed when the block ends, rolled back if it raises."""
    with factory() as session, session.begin():
        yield session


class DatabaseUnavailable(RuntimeError):
    """The database did not answer within RETRY_WITHIN_S."""


def is_connection_error(error: BaseException) -> bool:
    """Lost or refused connections to a database server (worth retrying), not SQL
    errors, which would fail again. (SQLite has no connection to lose, and calls
    many SQL errors OperationalError; its locks are waited for by its busy timeout.)"""
    if not isinstance(error, DBAPIError) or type(error.orig).__module__ == "sqlite3":
        return False
    return error.connection_invalidated or isinstance(error, (OperationalError, InterfaceError))


def transact(factory: sessionmaker[Session], work: Callable[[Session], T], within_s: float = RETRY_WITHIN_S) -> T:
    """`work(session)` in one transaction, run again with backoff while the connection is down.

    Only for idempotent work: a commit whose answer was lost may have happened.
    (pool_pre_ping replaces a stale pooled connection before it is used.)
    """
    deadline = time.monotonic() + within_s
    for attempt in itertools.count():
        try:
            with session_scope(factory) as session:
                return work(session)
        except Exception as error:
            if not is_connection_error(error):
                raise
            pause = _BACKOFF_S[min(attempt, len(_BACKOFF_S) - 1)]
            if time.monotonic() + pause > deadline:
                raise DatabaseUnavailable(f"the database did not answer for {within_s:g}s: {error}") from error
            logger.warning("database unavailable (%s); retrying in %gs", type(error).__name__, pause)
            time.sleep(pause)
