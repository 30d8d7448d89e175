"""A PostgreSQL database of a test session's own, on the test server.

Two test runs on one machine (two checkouts, a developer and CI) share the
server of LMQ_TEST_DATABASE_URL; each creates its own database there, so that
neither empties or migrates the other's tables.
"""

import contextlib
import uuid


@contextlib.contextmanager
def fresh_database(server_url, prefix="lmq_test"):
    """Yields the URL of a new, empty database on ``server_url``'s server; drops it afterwards."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    server = create_engine(server_url, isolation_level="AUTOCOMMIT")
    with server.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(server_url).set(database=name).render_as_string(hide_password=False)
    finally:  # FORCE: the session's own pooled connections may still be open
        with server.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        server.dispose()
