"""What `lmq`'s local commands and its `--server` commands share.

A job request is built from the flags and the input files and checked through
the one job request model (`lmq.core.domain.requests.parse_job`, the model POST /v1/jobs
uses, with the LMQ_MAX_* limits), so a bad job is refused here, in one line
naming the flag or the file line, before anything is written or any model
loads. Results are written as JSONL, and a finished job is reported in one line.

`lmq submit`, `lmq jobs` and `lmq presets share` are written once here, against
`JobBackend`: the store through SQL (commands.Store) or a server over HTTP
(remote.Server), which give the same summaries, results and events.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

from pydantic import BaseModel, ValidationError

from lmq.api import schemas
from lmq.api.cli.progress import follow_job
from lmq.core.config import Limits
from lmq.core.domain.fit import fit_models
from lmq.core.domain.generation import generate_models
from lmq.core.domain.jobs import InputsDontFitPreset, check_inputs_fit
from lmq.core.domain.requests import field_name, parse_job, problems
from lmq.core.utf8 import NotUtf8, utf8_text

# What `lmq` reads from each line of an input file; other keys are the user's own and left alone.
INPUT_FIELDS = {
    "inputs": ("custom_id", "prompt", "encoder_text", "messages", "params"),
    "training_data": ("text", "encoder_text", "decoder_text"),
    "validation_data": ("text", "encoder_text", "decoder_text"),
}
GENERATE_FLAGS = ("max_length", "max_new_tokens", "seed", "stop", "strip_prompt", "dtype", "micro_batch_size")
FIT_FLAGS = ("epochs", "batch_size", "learning_rate", "sequence_length", "lora_rank", "dtype")
# Problems that read as "<name> <phrase>", e.g. "--epochs must be at least 1, got 0".
PHRASES = {
    "greater_than_equal": "must be at least {ge}, got {input}",
    "greater_than": "must be greater than {gt}, got {input}",
    "positive": "must be positive, got {input}",
    "less_than_equal": "must be at most {le}, got {input}",
    "less_than": "must be less than {lt}, got {input}",
    "string_too_short": "must be at least {min_length} characters long",
    "empty": "must not be empty",
    "string_too_long": "must be at most {max_length} characters long",
    "too_long": "has {actual_length} entries, more than the {max_length} allowed",
    "string_type": "must be a string, got {type}",
}


class BadInput(Exception):
    """A problem with what the user asked for: exit 2, nothing written."""


class Failed(Exception):
    """The command could not be done (a broker or a server that fails or cannot be reached): exit 1."""


# ---------------------------------------------------------------- input files


def read_jsonl(path: str) -> list[tuple[int, dict]]:
    """(line number, object) for each line of a JSONL file ("-" is stdin); blank lines are skipped."""
    name = source_name(path)
    try:
        data = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
        lines = utf8_text(data, name).splitlines()
    except FileNotFoundError:
        raise BadInput(f"input file {path!r} does not exist") from None
    except OSError as error:
        raise BadInput(f"cannot read input file {path!r}: {error.strerror}") from None
    except NotUtf8 as error:
        raise BadInput(str(error)) from None
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (ValueError, RecursionError) as error:  # bad syntax, a number of over 4300 digits, deep nesting
            reason = error.msg if isinstance(error, json.JSONDecodeError) else "a number too long, or nested too deeply"
            raise BadInput(f"{name} line {number}: not valid JSON ({reason})") from None
        if not isinstance(row, dict):
            raise BadInput(f"{name} line {number}: expected a JSON object, got {type(row).__name__}")
        rows.append((number, row))
    if not rows:
        raise BadInput(f"{name} has no inputs")
    return rows


def source_name(path: str) -> str:
    return "stdin" if path == "-" else path


def parse_sampler(value: str | None):
    """A sampler name, or a JSON object such as '{"name": "top_p", "p": 0.9}' (the model checks either)."""
    if value is None or not value.lstrip().startswith("{"):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as error:
        raise BadInput(f"--sampler is not valid JSON ({error.msg})") from None


# ---------------------------------------------------------------- the job request


class JobFromFlags:
    """The POST /v1/jobs body that `lmq generate|fit|submit KIND` describes, and where each part came from."""

    def __init__(self, kind: str, args):
        self.kind = kind
        self.files: dict[str, tuple[str, list[int]]] = {}  # body field -> (file name, line of each entry)
        if kind == "generate":
            options = {name: getattr(args, name) for name in GENERATE_FLAGS}
            options["sampler"] = parse_sampler(args.sampler)
            self.body = {"kind": kind, "preset": args.preset, "inputs": self.rows("inputs", args.input)}
            self.body["params"] = without_none(options)
        else:
            self.body = {
                "kind": kind,
                "preset": args.preset,
                "training_data": self.rows("training_data", args.input),
                "hyperparameters": without_none({name: getattr(args, name) for name in FIT_FLAGS}),
                "output_preset": args.output_preset,
            }
            if args.validation:
                self.body["validation_data"] = self.rows("validation_data", args.validation)

    def rows(self, field: str, path: str) -> list[dict]:
        numbered = read_jsonl(path)
        self.files[field] = (source_name(path), [number for number, _ in numbered])
        return [
            {key: as_label(row[key]) if key == "custom_id" else row[key] for key in INPUT_FIELDS[field] if key in row}
            for _, row in numbered
        ]

    def checked(self, limits: Limits) -> BaseModel:
        """The job request, or BadInput naming the first problem as the user wrote it."""
        try:
            return parse_job(self.body, limits)
        except ValidationError as error:
            raise BadInput(self.message(problems(error.errors())[0])) from None

    def check_fits(self, job: BaseModel, location: str) -> None:
        """BadInput naming the first input line the preset's task does not read (`check_inputs_fit`)."""
        try:
            check_inputs_fit(job, location)
        except InputsDontFitPreset as error:
            problem = {"loc": list(error.location), "type": "value_error", "msg": str(error)}
            raise BadInput(self.message(problem)) from None

    def message(self, problem: dict) -> str:
        """One line: `--max-length must be at least 1, got 0`, `in.jsonl line 3: 'prompt' must be a string`."""
        location = problem["loc"]
        head, rest = location[0], location[1:]
        if head in self.files and rest and isinstance(rest[0], int):
            file, lines = self.files[head]
            name = f"{file} line {lines[rest[0]]}"
            if rest[1:]:
                name += f": {field_name(rest[1:])!r}"
        elif head in ("params", "hyperparameters") and rest:
            name = flag(rest[0]) + (f" {field_name(rest[1:])}" if rest[1:] else "")
        elif head in self.files:
            name = self.files[head][0]
        else:
            name = flag(head)
        kind, context = problem["type"], problem.get("ctx", {})
        if kind == "literal_error":
            choices = context["expected"].replace("'", "")
            return f"{name} {problem['input']!r} is not one of {choices}"
        if kind == "greater_than" and context["gt"] == 0:
            kind = "positive"
        elif kind == "string_too_short" and context["min_length"] == 1:
            kind = "empty"
        if kind in PHRASES:
            return f"{name} {PHRASES[kind].format(input=problem.get('input'), **context)}"
        return f"{name}: {problem['msg'].removeprefix('Value error, ')}"


def request_defaults(kind: str) -> BaseModel:
    """The request model's defaults for a generate job's params or a fit job's hyperparameters (for --help)."""
    if kind == "generate":
        return generate_models(Limits()).job_params()
    return fit_models(Limits()).hyperparameters()


def flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def without_none(options: dict) -> dict:
    """Only what the user gave: the model fills in its defaults."""
    return {key: value for key, value in options.items() if value is not None}


def as_label(custom_id):
    """JSONL ids may be numbers; the API takes strings, as the store keeps them."""
    return custom_id if custom_id is None or isinstance(custom_id, str) else str(custom_id)


# ---------------------------------------------------------------- output


def check_output(output: str | None) -> None:
    """Refused before the job exists: an output file whose directory is missing."""
    if output and output != "-" and not Path(output).resolve().parent.is_dir():
        raise BadInput(f"output directory {str(Path(output).parent)!r} does not exist")


def write_jsonl(records, output: str | None) -> None:
    """Records as JSONL to `output` ("-" or None is stdout), the way every `lmq` command writes results."""
    stream = open(output, "w", encoding="utf-8") if output and output != "-" else sys.stdout
    try:
        for record in records:
            stream.write(schemas.jsonl(record))
    finally:
        if stream is not sys.stdout:
            stream.close()


def say_empty(message: str) -> None:
    """An empty listing says so, on stderr: stdout stays one JSON object per line."""
    print(f"lmq: {message}", file=sys.stderr)


def no_jobs(args) -> str:
    """"no jobs", "no failed fit jobs", ..."""
    words = [word for word in (args.status, args.kind) if word]
    return f"no {' '.join(words + ['jobs'])}"


def report_finished(summary: dict) -> int:
    """One line on stderr for a finished job; exit 0 only when it succeeded."""
    counts = summary["counts"]
    line = f"lmq: job {summary['id']} {summary['status']}"
    if summary["kind"] == "generate":
        line += f": {counts['completed']} completed, {counts['failed']} failed of {counts['total']}"
    elif summary["output_preset"] and summary["status"] == "succeeded":
        line += f": preset {summary['output_preset']!r} registered"
    if summary["error"]:
        line += f": {summary['error']}"
    print(line, file=sys.stderr)
    return 0 if summary["status"] == "succeeded" else 1


# ---------------------------------------------------------------- the commands, over SQL or HTTP


class JobBackend(Protocol):
    """Where the commands below act. A job is its summary (`lmq.core.domain.jobs.job_summary`);
    an unknown one is BadInput."""

    def submit(self, args) -> dict: ...  # the queued job `lmq submit KIND` describes
    def jobs(self, status: str | None, kind: str | None, limit: int) -> Iterable[dict]: ...  # newest first
    def job(self, job_id: str) -> dict: ...
    def results(self, job_id: str) -> Iterable[dict]: ...
    def events(self, job_id: str, after: int = 0) -> list[dict]: ...
    def cancel(self, job_id: str) -> dict: ...
    def share(self, name: str, tenant: str) -> dict: ...  # {"name", "shared_with"}


def submit(backend: JobBackend, args) -> int:
    """`lmq submit KIND`: the queued job's summary, or with --wait a progress bar until it finishes."""
    summary = backend.submit(args)
    if args.wait:
        return follow(backend, summary["id"], getattr(args, "output", None))
    print(json.dumps(summary))
    return 0


def manage_jobs(backend: JobBackend, args) -> int:
    """`lmq jobs list|show|results|events|watch|cancel`."""
    if args.action == "list":
        count = 0
        for count, job in enumerate(backend.jobs(args.status, args.kind, args.limit), start=1):
            print(json.dumps(job))
        if count == 0:
            say_empty(no_jobs(args))
    elif args.action == "show":
        print(json.dumps(backend.job(args.id), indent=2))
    elif args.action == "results":
        backend.job(args.id)  # an unknown job is refused before an output file is opened
        write_jsonl(backend.results(args.id), args.output)
    elif args.action == "events":
        write_jsonl(backend.events(args.id), None)
    elif args.action == "watch":
        return follow(backend, args.id)
    elif args.action == "cancel":
        print(json.dumps(backend.cancel(args.id)))
    return 0


def share(backend: JobBackend, args) -> int:
    """`lmq presets share NAME TENANT`: let another tenant, or every tenant ("*"), use a preset."""
    print(json.dumps(backend.share(args.name, args.tenant)))
    return 0


def follow(backend: JobBackend, job_id: str, output: str | None = None) -> int:
    """A live progress bar until the job finishes; its summary goes to stdout, and with `output` its results there."""
    summary = follow_job(job_id, lambda: backend.job(job_id), lambda seen: backend.events(job_id, after=seen))
    print(json.dumps(summary))
    if output:
        write_jsonl(backend.results(job_id), output)
    return report_finished(summary)
