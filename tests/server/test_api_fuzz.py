"""A schema-driven fuzz of the API: schemathesis reads /openapi.json of a real
`lmq serve` on loopback and sends valid and invalid requests to every
operation. Whatever it sends, the server answers without a 5xx.

Bounded: a few dozen examples per operation, a per-request timeout, and only
127.0.0.1. No worker runs, so no accepted job loads a model."""

import pytest
import schemathesis
from api_support import TEAM_A, TOKENS, ApiServer
from conftest import _service_urls
from hypothesis import HealthCheck, given, settings

EXAMPLES_PER_OPERATION = 30


@pytest.fixture(scope="module")
def fuzzed_server(tmp_path_factory, postgres_url):
    import redis

    _, broker = _service_urls()
    redis.Redis.from_url(broker).flushdb()
    root = tmp_path_factory.mktemp("fuzz")
    env = {
        "LMQ_HOME": str(root / "home"),
        "LMQ_DATABASE_URL": postgres_url,
        "LMQ_BROKER_URL": broker,
        "LMQ_API_TOKENS": TOKENS,
        # Small limits keep generated bodies small.
        "LMQ_MAX_INPUTS": "4",
        "LMQ_MAX_PROMPT_CHARS": "64",
    }
    server = ApiServer(env, root / "server.log")
    yield server
    server.stop()
    redis.Redis.from_url(broker).flushdb()


@pytest.mark.parametrize("mode", list(schemathesis.GenerationMode), ids=lambda mode: mode.value)
def test_no_request_makes_the_server_fail(fuzzed_server, mode):
    schema = schemathesis.openapi.from_url(f"{fuzzed_server.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 31  # with POST /v1/presets/{name}/shares, the Batch API's files, batches and models, and the 8 of fine-tuning jobs
    if mode == schemathesis.GenerationMode.NEGATIVE:
        # /healthz and /readyz take nothing, so there is no invalid request to send them.
        operations = [op for op in operations if set(op.definition.raw) & {"parameters", "requestBody", "security"}]
    for operation in operations:

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None, suppress_health_check=list(HealthCheck)
        )
        def answers_without_a_server_error(case):
            response = case.call(headers=TEAM_A, timeout=15)
            assert response.status_code < 500, (
                f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:500]}\n"
                f"{fuzzed_server.log.read_text()[-3000:]}"
            )

        answers_without_a_server_error()
