"""Shared fixtures (an embedded lmq home, the real service backends, a tiny model) and the rooms.

Tests live in a folder per room, and each test is marked with its room:
`library` and `plugins` need no server; `service`, `server`, `cli` and `e2e`
tests also carry the `service` mark, so `pytest -m "not service"` runs the
library and plugin tests alone.

Service tests use a real Redis and PostgreSQL from LMQ_TEST_REDIS_URL and
LMQ_TEST_DATABASE_URL. On a machine without them they skip and say why; in CI
(CI=true) a missing server fails the test instead, so that a run cannot pass
by skipping half the service tests.
"""

import os
import pathlib

import pytest

import lmq.core  # noqa: F401  sets KERAS_BACKEND before anything imports keras
from database_support import fresh_database

SERVICE_ENV = ("LMQ_HOME", "LMQ_DATABASE_URL", "LMQ_BROKER_URL", "LMQ_API_TOKENS", "LMQ_PRESET_ROOTS")
ROOMS = {"library": False, "plugins": False, "service": True, "server": True, "cli": True, "e2e": True}  # needs servers
TESTS = pathlib.Path(__file__).resolve().parent


def pytest_collection_modifyitems(items):
    for item in items:
        room = pathlib.Path(item.fspath).resolve().relative_to(TESTS).parts[0]
        item.add_marker(room)
        if ROOMS[room]:
            item.add_marker("service")


def server_missing(reason: str):
    """Skip, saying why; in CI (CI=true) fail instead: CI has every server, so a missing one is a broken run."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason}, and CI=true: a service test must not skip in CI")
    pytest.skip(reason)


@pytest.fixture
def lmq_home(tmp_path, monkeypatch):
    """The embedded default: SQLite and the preset store under a fresh LMQ_HOME, no broker."""
    for name in SERVICE_ENV:
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "lmq-home"
    monkeypatch.setenv("LMQ_HOME", str(home))
    return home


def _service_urls():
    database = os.environ.get("LMQ_TEST_DATABASE_URL")
    redis = os.environ.get("LMQ_TEST_REDIS_URL")
    if not (database and redis):
        server_missing("LMQ_TEST_DATABASE_URL and LMQ_TEST_REDIS_URL are not set (CI sets both)")
    return database, redis


@pytest.fixture(scope="session")
def postgres_url():
    """A database of this session's own on the test PostgreSQL, migrated from scratch."""
    from lmq.core.store.db import upgrade

    server, _ = _service_urls()
    with fresh_database(server) as database:
        upgrade(database)
        yield database


@pytest.fixture
def service_env(lmq_home, postgres_url, monkeypatch):
    """PostgreSQL + Redis (an empty db, see LMQ_TEST_REDIS_URL) as the store and broker."""
    import redis

    _, broker = _service_urls()
    redis.Redis.from_url(broker).flushdb()
    monkeypatch.setenv("LMQ_DATABASE_URL", postgres_url)
    monkeypatch.setenv("LMQ_BROKER_URL", broker)
    return {"LMQ_HOME": str(lmq_home), "LMQ_DATABASE_URL": postgres_url, "LMQ_BROKER_URL": broker}


@pytest.fixture(scope="session")
def tiny_llama_preset(tmp_path_factory):
    """A tiny random Llama preset directory with a real SentencePiece vocabulary."""
    import keras

    from tests.model_support import tiny_llama, train_sentencepiece

    root = tmp_path_factory.mktemp("tiny-llama")
    spm_model = train_sentencepiece(root, vocab_size=512)
    keras.utils.set_random_seed(7)
    preset = root / "preset"
    tiny_llama(spm_model, sequence_length=64).save_to_preset(str(preset))
    return preset
