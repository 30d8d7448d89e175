"""A small Python client for the lmq HTTP API (what `lmq submit --server` uses).

    client = Client("http://127.0.0.1:8000", token="...")
    job = client.submit({"kind": "generate", "preset": "my-model", "inputs": [{"prompt": "Hi"}]})
    job = client.wait(job["id"])
    for line in client.results(job["id"]):
        print(line["output"])
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator

import httpx

from lmq.core.names import TERMINAL_STATES


class ApiError(Exception):
    """The server refused a request; `status` is the HTTP status, the message the server's reason."""

    def __init__(self, status: int, message: str):
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


class Client:
    def __init__(self, server: str, token: str | None = None, timeout: float = 60.0):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=server.rstrip("/"), headers=headers, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def submit(self, job: dict, idempotency_key: str | None = None) -> dict:
        """Queue a job (the body of POST /v1/jobs); with a key, a retry returns the same job."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._json("POST", "/v1/jobs", json=job, headers=headers)

    def job(self, job_id: str) -> dict:
        return self._json("GET", f"/v1/jobs/{job_id}")

    def jobs(self, *, status: str | None = None, kind: str | None = None, limit: int = 50) -> Iterator[dict]:
        """Every matching job, newest first, fetched a page of `limit` at a time."""
        query = {key: value for key, value in (("status", status), ("kind", kind), ("limit", limit)) if value}
        while True:
            page = self._json("GET", "/v1/jobs", params=query)
            yield from page["jobs"]
            if page["next_cursor"] is None:
                return
            query["cursor"] = page["next_cursor"]

    def results(self, job_id: str) -> Iterator[dict]:
        """Result lines in input order, read as the server streams them."""
        with self.http.stream("GET", f"/v1/jobs/{job_id}/results") as response:
            if response.is_error:
                response.read()
                raise api_error(response)
            for line in response.iter_lines():
                if line:
                    yield json.loads(line)

    def events(self, job_id: str, after: int = 0) -> list[dict]:
        return self._json("GET", f"/v1/jobs/{job_id}/events", params={"after": after})["events"]

    def cancel(self, job_id: str) -> dict:
        return self._json("POST", f"/v1/jobs/{job_id}/cancel")

    def presets(self) -> list[dict]:
        return self._json("GET", "/v1/presets")["presets"]

    def preset(self, name: str) -> dict:
        return self._json("GET", f"/v1/presets/{name}")

    def share(self, name: str, tenant: str) -> dict:
        """Let `tenant` ("*": every tenant) use your preset `name`."""
        return self._json("POST", f"/v1/presets/{name}/shares", json={"tenant": tenant})

    def architectures(self) -> list[dict]:
        return self._json("GET", "/v1/architectures")["architectures"]

    def wait(
        self, job_id: str, *, poll_seconds: float = 0.5, on_update: Callable[[dict], None] | None = None
    ) -> dict:
        """Poll until the job is finished; `on_update` sees every summary on the way."""
        while True:
            summary = self.job(job_id)
            if on_update is not None:
                on_update(summary)
            if summary["status"] in TERMINAL_STATES:
                return summary
            time.sleep(poll_seconds)

    def _json(self, method: str, path: str, **kwargs) -> dict:
        response = self.http.request(method, path, **kwargs)
        if response.is_error:
            raise api_error(response)
        return response.json()


def api_error(response: httpx.Response) -> ApiError:
    """The server's own explanation: its `message` for a bad field, else its `detail`."""
    try:
        body = response.json()
        message = body.get("message") or body.get("detail")
    except ValueError:
        message = None
    return ApiError(response.status_code, str(message or response.reason_phrase))
