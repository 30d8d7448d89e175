"""Shared fixtures: an embedded lmq home, the real service backends, a tiny model.

Service tests use a real Redis and PostgreSQL from LMQ_TEST_REDIS_URL and
LMQ_TEST_DATABASE_URL. CI sets both, and then those tests never skip; on a
machine without them they skip and say why.
"""

import os

import pytest

import lmq.core  # noqa: F401  sets KERAS_BACKEND before anything imports keras
from database_support import fresh_database

SERVICE_ENV = ("LMQ_HOME", "LMQ_DATABASE_URL", "LMQ_BROKER_URL", "LMQ_API_TOKENS", "LMQ_PRESET_ROOTS")


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
        pytest.skip("LMQ_TEST_DATABASE_URL and LMQ_TEST_REDIS_URL are not set (CI sets both)")
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
