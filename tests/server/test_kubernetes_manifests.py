"""docs/kubernetes.md's manifests, checked without a cluster: each Kubernetes object against the
Kubernetes API's own schema (kubernetes-validate, strict: a misspelt field fails), KEDA's ScaledObject
against the fields of its CRD, then what lmq relies on: the settings every pod reads, the probes, the
GPU request, a grace period past the drain, and queue names that are the ones jobs are sent to."""

import re

import kubernetes_validate
import pytest
import yaml
from api_support import REPO
from jsonschema import Draft202012Validator

from lmq.core.config import load_settings
from lmq.workers.celery_app import queue_for

KUBERNETES_VERSION = "1.30.0"
DOC = (REPO / "docs" / "kubernetes.md").read_text()
OBJECTS = [
    document
    for block in re.findall(r"```yaml\n(.*?)```", DOC, re.DOTALL)
    for document in yaml.safe_load_all(block)
]
BY_KIND = {(o["kind"], o["metadata"]["name"]): o for o in OBJECTS}

# The fields of KEDA's ScaledObject (keda.sh/v1alpha1) that these manifests use; its metadata values are strings.
SCALED_OBJECT = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "ScaledObject"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "required": ["scaleTargetRef", "triggers"],
            "additionalProperties": False,
            "properties": {
                "scaleTargetRef": {
                    "type": "object",
                    "required": ["name"],
                    "additionalProperties": False,
                    "properties": {"name": {"type": "string"}, "kind": {"type": "string"}, "apiVersion": {"type": "string"}},
                },
                "pollingInterval": {"type": "integer", "minimum": 1},
                "cooldownPeriod": {"type": "integer", "minimum": 0},
                "idleReplicaCount": {"type": "integer", "minimum": 0},
                "minReplicaCount": {"type": "integer", "minimum": 0},
                "maxReplicaCount": {"type": "integer", "minimum": 1},
                "advanced": {"type": "object"},
                "fallback": {"type": "object"},
                "triggers": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["type", "metadata"],
                        "additionalProperties": False,
                        "properties": {
                            "type": {"type": "string"},
                            "name": {"type": "string"},
                            "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
                            "authenticationRef": {"type": "object", "required": ["name"]},
                        },
                    },
                },
            },
        },
    },
}


@pytest.mark.parametrize("manifest", [o for o in OBJECTS if o["kind"] != "ScaledObject"], ids=lambda o: o["kind"])
def test_each_kubernetes_object_follows_the_api_schema(manifest):
    kubernetes_validate.validate(manifest, KUBERNETES_VERSION, strict=True)


def test_a_misspelt_field_would_fail_the_check():
    deployment = BY_KIND[("Deployment", "lmq-worker")]
    broken = {**deployment, "spec": {**deployment["spec"], "replica": 2}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_keda_scales_the_worker_deployment_on_the_queues_jobs_are_sent_to():
    scaled = BY_KIND[("ScaledObject", "lmq-worker")]
    errors = list(Draft202012Validator(SCALED_OBJECT).iter_errors(scaled))
    assert not errors, [error.message for error in errors]
    assert scaled["spec"]["scaleTargetRef"]["name"] == "lmq-worker"
    assert scaled["spec"]["minReplicaCount"] >= 1  # a running job is not in the queue: never scale to none
    settings = settings_of("lmq-worker")
    queues = {trigger["metadata"]["listName"] for trigger in scaled["spec"]["triggers"]}
    assert queues == {queue_for(kind, "any-preset", settings) for kind in ("generate", "fit")}
    for trigger in scaled["spec"]["triggers"]:
        assert trigger["type"] == "redis"
        host = settings.broker_url.removeprefix("redis://").split("/")[0]
        assert trigger["metadata"]["address"] == host
        assert trigger["metadata"]["databaseIndex"] == settings.broker_url.rsplit("/", 1)[1]


def settings_of(deployment: str):
    """What the Deployment's pods read: the ConfigMap and Secret they take their environment from."""
    (container,) = BY_KIND[("Deployment", deployment)]["spec"]["template"]["spec"]["containers"]
    environment = {}
    for source in container["envFrom"]:
        if "configMapRef" in source:
            environment.update(BY_KIND[("ConfigMap", source["configMapRef"]["name"])]["data"])
        else:
            environment.update(BY_KIND[("Secret", source["secretRef"]["name"])]["stringData"])
    environment.update({entry["name"]: entry["value"] for entry in container.get("env", [])})
    return load_settings(environment)


def test_api_and_workers_read_one_set_of_settings_and_keep_only_a_cache_on_disk():
    api, worker = settings_of("lmq-api"), settings_of("lmq-worker")
    assert api.storage_url == worker.storage_url and api.storage_url.startswith("s3://")
    assert api.database_url == worker.database_url and api.broker_url == worker.broker_url
    assert api.api_tokens and not worker.embedded
    for name in ("lmq-api", "lmq-worker"):
        pod = BY_KIND[("Deployment", name)]["spec"]["template"]["spec"]
        (volume,) = pod["volumes"]
        assert "emptyDir" in volume  # no disk shared between pods
        assert pod["containers"][0]["volumeMounts"][0]["mountPath"] == str(api.home)


def test_the_api_is_probed_and_workers_request_a_gpu_and_time_to_drain():
    (api,) = BY_KIND[("Deployment", "lmq-api")]["spec"]["template"]["spec"]["containers"]
    assert api["readinessProbe"]["httpGet"]["path"] == "/readyz" and api["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert api["command"][:2] == ["lmq", "serve"]
    pod = BY_KIND[("Deployment", "lmq-worker")]["spec"]["template"]["spec"]
    (worker,) = pod["containers"]
    assert worker["command"][:2] == ["lmq", "worker"] and worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["terminationGracePeriodSeconds"] > settings_of("lmq-worker").drain_s
    assert BY_KIND[("Job", "lmq-migrate")]["spec"]["template"]["spec"]["containers"][0]["command"] == ["lmq", "db", "upgrade"]
