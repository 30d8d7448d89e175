"""`lmq submit` and `lmq jobs` through a server's HTTP API (`--server` or LMQ_SERVER).

The same flags and input files as the local commands; the server checks the
job again and answers a bad one with a message naming the field, which is
shown as it is (exit 2). A server that cannot be reached, or fails, is exit 1.
"""

from __future__ import annotations

import json
import sys

import httpx

from api.cli import BadInput, fit_hyperparameters, generate_params, read_jsonl, report_finished
from api.client import ApiError, Client


def client_for(args) -> Client:
    return Client(args.server, token=args.token)


def job_body(kind: str, args) -> dict:
    """The POST /v1/jobs body for `lmq submit KIND` (input files read and checked here first)."""
    if kind == "generate":
        return {
            "kind": "generate",
            "preset": args.preset,
            "inputs": [
                {"custom_id": as_label(row.get("custom_id")), "prompt": row["prompt"]}
                for row in read_jsonl(args.input, "prompt")
            ],
            "params": generate_params(args),
        }
    body = {
        "kind": "fit",
        "preset": args.preset,
        "training_data": [{"text": row["text"]} for row in read_jsonl(args.input, "text")],
        "hyperparameters": fit_hyperparameters(args),
        "output_preset": args.output_preset,
    }
    if args.validation:
        body["validation_data"] = [{"text": row["text"]} for row in read_jsonl(args.validation, "text")]
    return body


def as_label(custom_id) -> str | None:
    """JSONL ids may be numbers; the API takes strings, as the store keeps them."""
    return None if custom_id is None else str(custom_id)


def submit(args) -> int:
    body = job_body(args.kind, args)
    with client_for(args) as client:
        return talking_to(args.server, lambda: _submit(client, body, args))


def _submit(client: Client, body: dict, args) -> int:
    job = client.submit(body, idempotency_key=args.idempotency_key)
    if args.wait:
        return follow(client, job["id"])
    print(json.dumps(job))
    return 0


def jobs(args) -> int:
    with client_for(args) as client:
        return talking_to(args.server, lambda: _jobs(client, args))


def _jobs(client: Client, args) -> int:
    if args.action == "list":
        listing = client.jobs(status=args.status, kind=args.kind, limit=min(args.limit, 500))
        for count, job in enumerate(listing, start=1):
            print(json.dumps(job))
            if count == args.limit:
                break
    elif args.action == "show":
        print(json.dumps(client.job(args.id), indent=2))
    elif args.action == "results":
        client.job(args.id)  # a 404 before an output file is opened
        write_lines(client.results(args.id), args.output)
    elif args.action == "events":
        write_lines(client.events(args.id), None)
    elif args.action == "watch":
        return follow(client, args.id)
    elif args.action == "cancel":
        print(json.dumps(client.cancel(args.id)))
    return 0


def follow(client: Client, job_id: str) -> int:
    """A live progress bar until the job finishes: prompts done for generate, percent for fit."""
    from tqdm import tqdm

    with tqdm(desc=f"job {job_id[:8]}", file=sys.stderr, disable=None) as bar:

        def show(summary: dict) -> None:
            counts = summary["counts"]
            if summary["kind"] == "generate":
                bar.total, bar.n, bar.unit = counts["total"], counts["completed"] + counts["failed"], "prompt"
            else:
                bar.total, bar.n, bar.unit = 100, round(summary["progress"] * 100), "%"
            bar.set_postfix_str(summary["status"])

        summary = client.wait(job_id, on_update=show)
    print(json.dumps(summary))
    return report_finished(summary)


def write_lines(lines, output: str | None) -> None:
    stream = open(output, "w", encoding="utf-8") if output and output != "-" else sys.stdout
    try:
        for line in lines:
            stream.write(json.dumps(line, ensure_ascii=False) + "\n")
    finally:
        if stream is not sys.stdout:
            stream.close()


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
