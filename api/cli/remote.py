"""`lmq submit`, `lmq jobs` and `lmq presets share` through a server's HTTP API (`--server` or LMQ_SERVER).

The same commands (lmq.api.cli.jobs) as against the store, over HTTP: the
same flags and input files; the server checks the job again and answers a
bad one with a message naming the field, which is shown as it is (exit 2).
A server that cannot be reached, or fails, is exit 1.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import httpx

from lmq.api.cli.client import ApiError, Client
from lmq.api.cli.jobs import BadInput, Failed, JobFromFlags
from lmq.core.domain.generation import NO_LIMITS


class Server:
    """The commands' JobBackend over HTTP: the token's tenant's jobs and presets."""

    def __init__(self, client: Client):
        self.client = client

    def submit(self, args) -> dict:
        """The job checked here first through the same model; the limits are the server's (its
        LMQ_MAX_*), so the server applies them."""
        job = JobFromFlags(args.kind, args).checked(NO_LIMITS)
        return self.client.submit(job.model_dump(mode="json", exclude_none=True), idempotency_key=args.idempotency_key)

    def jobs(self, status: str | None, kind: str | None, limit: int) -> Iterable[dict]:
        return itertools.islice(self.client.jobs(status=status, kind=kind, limit=min(limit, 500)), limit)

    def job(self, job_id: str) -> dict:
        return self.client.job(job_id)

    def results(self, job_id: str) -> Iterable[dict]:
        return self.client.results(job_id)

    def events(self, job_id: str, after: int = 0) -> list[dict]:
        return self.client.events(job_id, after=after)

    def cancel(self, job_id: str) -> dict:
        return self.client.cancel(job_id)

    def share(self, name: str, tenant: str) -> dict:
        """The token's tenant shares its own preset."""
        return self.client.share(name, tenant)


@contextmanager
def server(args) -> Iterator[Server]:
    """The server `args` name. Its 4xx is the user's bad input (exit 2); no answer or a 5xx is exit 1."""
    with Client(args.server, token=args.token) as client:
        try:
            yield Server(client)
        except ApiError as error:
            if error.status < 500:
                raise BadInput(f"{args.server}: {error.message}") from None
            raise Failed(f"{args.server} failed: {error}") from None
        except httpx.HTTPError as error:
            raise Failed(f"cannot reach {args.server}: {error}") from None
