"""`lmq submit`, `lmq jobs` and `lmq presets share` through a server's HTTP API (`--server` or LMQ_SERVER).

The same flags and input files as the local commands; the server checks the
job again and answers a bad one with a message naming the field, which is
shown as it is (exit 2). A server that cannot be reached, or fails, is exit 1.
"""

from __future__ import annotations

import dataclasses
import json
import sys

import httpx

from lmq.api.cli.jobs import BadInput, JobFromFlags, no_jobs, report_finished, say_empty, write_jsonl
from lmq.api.cli.client import ApiError, Client
from lmq.api.cli.progress import follow_job
from lmq.core.config import Limits


# Limits no server is below: this side checks everything but the limits.
SERVERS_LIMITS = Limits(**{field.name: 2**62 for field in dataclasses.fields(Limits)})


def client_for(args) -> Client:
    return Client(args.server, token=args.token)


def job_body(kind: str, args) -> dict:
    """The POST /v1/jobs body for `lmq submit KIND`, checked here first through the same model;
    the limits are the server's (its LMQ_MAX_*), so the server applies them."""
    job = JobFromFlags(kind, args).checked(SERVERS_LIMITS)
    return job.model_dump(mode="json", exclude_none=True)


def submit(args) -> int:
    body = job_body(args.kind, args)
    with client_for(args) as client:
        return talking_to(args.server, lambda: _submit(client, body, args))


def _submit(client: Client, body: dict, args) -> int:
    job = client.submit(body, idempotency_key=args.idempotency_key)
    if args.wait:
        return follow(client, job["id"], getattr(args, "output", None))
    print(json.dumps(job))
    return 0


def share(args) -> int:
    """`lmq presets share NAME TENANT --server URL`: the token's tenant shares its own preset."""
    with client_for(args) as client:
        return talking_to(args.server, lambda: _share(client, args))


def _share(client: Client, args) -> int:
    print(json.dumps(client.share(args.name, args.tenant)))
    return 0


def jobs(args) -> int:
    with client_for(args) as client:
        return talking_to(args.server, lambda: _jobs(client, args))


def _jobs(client: Client, args) -> int:
    if args.action == "list":
        listing = client.jobs(status=args.status, kind=args.kind, limit=min(args.limit, 500))
        count = 0
        for count, job in enumerate(listing, start=1):
            print(json.dumps(job))
            if count == args.limit:
                break
        if count == 0:
            say_empty(no_jobs(args))
    elif args.action == "show":
        print(json.dumps(client.job(args.id), indent=2))
    elif args.action == "results":
        client.job(args.id)  # a 404 before an output file is opened
        write_jsonl(client.results(args.id), args.output)
    elif args.action == "events":
        write_jsonl(client.events(args.id), None)
    elif args.action == "watch":
        return follow(client, args.id)
    elif args.action == "cancel":
        print(json.dumps(client.cancel(args.id)))
    return 0


def follow(client: Client, job_id: str, output: str | None = None) -> int:
    """A live progress bar until the job finishes; its summary goes to stdout, and with `output` its results there."""
    summary = follow_job(job_id, lambda: client.job(job_id), lambda seen: client.events(job_id, after=seen))
    print(json.dumps(summary))
    if output:
        write_jsonl(client.results(job_id), output)
    return report_finished(summary)


def talking_to(server: str, call) -> int:
    """The server's 4xx is the user's bad input (exit 2); no answer or a 5xx is exit 1."""
    try:
        return call()
    except ApiError as error:
        if error.status < 500:
            raise BadInput(f"{server}: {error.message}") from None
        print(f"lmq: error: {server} failed: {error}", file=sys.stderr)
    except httpx.HTTPError as error:
        print(f"lmq: error: cannot reach {server}: {error}", file=sys.stderr)
    return 1
