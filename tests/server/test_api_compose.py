"""docker-compose.yml and the Dockerfile, checked without a Docker engine: the
compose file against the Compose Specification's JSON schema (as vendored by
check-jsonschema), then the structure the deployment relies on."""

import json
import os
import re
import shutil
import subprocess
from importlib import resources

import pytest
import yaml
from api_support import REPO
from jsonschema import Draft202012Validator

from lmq.core.config import load_settings

COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
LMQ_SERVICES = ("migrate", "api", "worker")


def interpolated(value: str) -> str:
    """What compose makes of ${VAR:-default} and ${VAR:?message} when VAR is unset (tokens given)."""
    value = re.sub(r"\$\{LMQ_API_TOKENS:\?[^}]*\}", "secret:team-a", value)
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value)


def test_the_compose_file_follows_the_compose_specification():
    schema_file = resources.files("check_jsonschema") / "builtin_schemas" / "vendor" / "compose-spec.json"
    schema = json.loads(schema_file.read_text())
    errors = sorted(Draft202012Validator(schema).iter_errors(COMPOSE), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors)


def has_compose_plugin() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0


@pytest.mark.skipif(not has_compose_plugin(), reason="no docker compose here; the schema test stands in for it")
def test_docker_compose_config_accepts_it():
    run = subprocess.run(
        ["docker", "compose", "config", "--quiet"], cwd=REPO, capture_output=True, text=True,
        env={"PATH": os.environ["PATH"], "LMQ_API_TOKENS": "secret:team-a"},
    )
    assert run.returncode == 0, run.stderr


def test_services_health_checks_and_start_order():
    assert set(SERVICES) == {"api", "worker", "redis", "postgres", "migrate", "flower", "objects", "bucket"}
    for name in ("api", "worker", "redis", "postgres", "flower", "objects"):
        assert SERVICES[name]["healthcheck"]["test"], name
    assert "/readyz" in " ".join(SERVICES["api"]["healthcheck"]["test"])
    for name in ("api", "worker"):
        depends = SERVICES[name]["depends_on"]
        assert depends["migrate"]["condition"] == depends["bucket"]["condition"] == "service_completed_successfully"
        assert depends["postgres"]["condition"] == depends["redis"]["condition"] == "service_healthy"
    assert SERVICES["migrate"]["command"] == ["lmq", "db", "upgrade"]
    assert SERVICES["api"]["command"][:2] == ["lmq", "serve"] and "0.0.0.0" in SERVICES["api"]["command"]
    assert SERVICES["worker"]["command"][:2] == ["lmq", "worker"]
    assert {SERVICES[name]["build"] for name in LMQ_SERVICES} == {"."}


def test_the_worker_reserves_an_nvidia_gpu_and_says_how_to_run_without_one():
    (device,) = SERVICES["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    text = (REPO / "docker-compose.yml").read_text()
    assert "CPU fallback" in text[: text.index("    deploy:")]


def test_api_and_workers_share_no_disk_but_one_object_store_and_one_set_of_settings():
    for name in ("api", "worker"):
        assert "volumes" not in SERVICES[name], name  # each container's /data is its own cache
    environments = {
        name: {key: interpolated(str(value)) for key, value in SERVICES[name]["environment"].items()}
        for name in LMQ_SERVICES
    }
    shared = ("LMQ_HOME", "LMQ_DATABASE_URL", "LMQ_BROKER_URL", "LMQ_JOB_TIMEOUT_S", "LMQ_STORAGE_URL", "AWS_ENDPOINT_URL")
    for key in shared:
        assert len({environments[name][key] for name in LMQ_SERVICES}) == 1, key
    settings = load_settings(environments["api"])
    assert settings.home.as_posix() == "/data" and settings.storage_url == "s3://lmq/lmq"
    assert settings.database_url.startswith("postgresql+psycopg://lmq:")
    assert settings.database_url.endswith("@postgres:5432/lmq")
    assert settings.broker_url == "redis://redis:6379/0" and not settings.embedded
    assert settings.api_tokens == {"secret": "team-a"}
    assert load_settings(environments["worker"]).api_tokens == {}
    postgres = SERVICES["postgres"]["environment"]
    assert interpolated(postgres["POSTGRES_PASSWORD"]) in settings.database_url


def test_the_image_installs_lmq_and_runs_as_a_user():
    dockerfile = (REPO / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11", dockerfile, re.MULTILINE)
    for directory in re.findall(r"^COPY (\S+) ", dockerfile, re.MULTILINE):
        assert (REPO / directory).exists(), directory
    assert 'pip install --no-deps ".[postgres,s3]"' in dockerfile
    assert "['optional-dependencies']['s3']" in dockerfile  # s3fs among the image's dependencies
    assert "tensorflow" not in dockerfile.lower()
    assert re.search(r"^USER lmq$", dockerfile, re.MULTILINE)
    assert "LMQ_HOME=/data" in dockerfile


def worker_settings():
    return load_settings({key: interpolated(str(value)) for key, value in SERVICES["worker"]["environment"].items()})


def test_flower_watches_the_broker_the_workers_use_from_loopback_only():
    flower = SERVICES["flower"]
    assert flower["command"][:2] == ["celery", "flower"]
    assert flower["environment"]["CELERY_BROKER_URL"] == worker_settings().broker_url
    assert flower["depends_on"]["redis"]["condition"] == "service_healthy"
    (published,) = flower["ports"]
    assert interpolated(published) == "127.0.0.1:5555:5555"


def test_each_worker_serves_its_metrics_inside_the_compose_network():
    worker = SERVICES["worker"]
    port = worker_settings().worker_metrics_port
    assert port is not None and worker["expose"] == [str(port)]
    assert "ports" not in worker  # `--scale worker=N` would fight over one host port


def test_the_object_store_serves_the_bucket_the_settings_name_with_their_keys():
    objects, bucket = SERVICES["objects"], SERVICES["bucket"]
    assert "-s3" in objects["command"] and "-s3.port=8333" in objects["command"]
    settings = {key: interpolated(str(value)) for key, value in SERVICES["api"]["environment"].items()}
    assert settings["AWS_ENDPOINT_URL"] == "http://objects:8333"
    (identities,) = objects["configs"]
    config = json.loads(interpolated(COMPOSE["configs"][identities["source"]]["content"]))
    (identity,) = config["identities"]
    assert identity["credentials"] == [
        {"accessKey": settings["AWS_ACCESS_KEY_ID"], "secretKey": settings["AWS_SECRET_ACCESS_KEY"]}
    ]
    assert "Write" in identity["actions"] and f"-s3.config={identities['target']}" in objects["command"]
    bucket_name = load_settings(settings).storage_url.removeprefix("s3://").split("/")[0]
    assert f"fs.mkdir('{bucket_name}')" in " ".join(bucket["command"])
    assert bucket["depends_on"]["objects"]["condition"] == "service_healthy"


def test_workers_are_many_and_given_time_to_hand_back_their_jobs():
    worker = SERVICES["worker"]
    assert int(interpolated(str(worker["deploy"]["replicas"]))) >= 2
    grace = int(worker["stop_grace_period"].removesuffix("s"))
    assert grace > worker_settings().drain_s  # docker's SIGKILL comes after the drain, not during it
