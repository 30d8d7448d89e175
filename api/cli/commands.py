"""The `lmq` command line.

`generate` and `fit` run one job here and now through the same job runner as
the Celery workers; `submit` hands a job to the workers through the broker;
`serve` runs the HTTP API; `jobs`, `presets`, `architectures` and `db` read
and change the store. `submit`, `jobs` and `presets share` are written once
(api/cli/jobs.py) against the store (`Store`, here) or, with `--server` (or
LMQ_SERVER), a server's HTTP API (api/cli/remote.py).

Bad input is one line on stderr naming the problem, exit code 2, and nothing
written: every input is read and checked before a job exists.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import NoReturn

import lmq.api.cli.remote as remote
from lmq.api import schemas
from lmq.api.cli.jobs import (
    BadInput,
    Failed,
    JobBackend,
    JobFromFlags,
    check_output,
    manage_jobs,
    report_finished,
    request_defaults,
    say_empty,
    share,
    submit,
    write_jsonl,
)
from lmq.api.app.auth import LOCAL_TENANT
from lmq.api.cli.progress import Progress, unit_of
from lmq.api.app.serving import ServeLimits, serve
from lmq.api.suggest import did_you_mean, preset_names
from lmq.core.chat_templates import CHAT_TEMPLATE_FILE, builtin_template_name, read_builtin_template
from lmq.core.config import Settings, SettingsError, load_settings
from lmq.core.domain.jobs import OutputPresetTaken, check_output_name, job_summary, store_job
from lmq.core.logfmt import log_to_stderr
from lmq.core.names import DTYPES, SAMPLER_NAMES, JobKind, JobState, check_preset_name
from lmq.core.presets import PresetNotFound
from lmq.core.presets.files import PresetFileError
from lmq.core.storage import preset_store
from lmq.core.store import SchemaOutOfDate, queries, session_scope, sessions
from lmq.core.store.db import database_exists
from lmq.core.store.presets import (
    PresetRefused,
    check_preset_for_job,
    preset_architecture,
    store_resolver,
    stored_preset_directory,
)

LOOPBACK = ("127.0.0.1", "localhost", "::1")


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help names its default: argparse's own, or the help's words for a computed one."""

    def _get_help_string(self, action):
        if action.required:
            return f"{action.help} (required)"
        if "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, formatter_class=DefaultsFormatter, **kwargs)

    def error(self, message: str) -> NoReturn:
        fail(f"{self.prog}: {message}")


def fail(message: str) -> NoReturn:
    print(f"lmq: error: {message}", file=sys.stderr)
    raise SystemExit(2)


# ---------------------------------------------------------------- creating jobs


def open_store(settings: Settings):
    try:
        return sessions(settings)
    except SchemaOutOfDate as error:
        raise BadInput(str(error)) from None


def create_job(settings: Settings, kind: str, args) -> str:
    """Check everything about the job, then write it; returns the job id."""
    flags = JobFromFlags(kind, args)
    job = flags.checked(settings.limits)
    # Check against the store without creating it: bad input leaves no trace, not even a database.
    existing = open_store(settings) if database_exists(settings) else None
    with session_scope(existing) if existing else nullcontext() as session:
        location = locate(session, job.preset)
        check_preset(location, job.preset, settings, job)
        flags.check_fits(job, location)
    with session_scope(existing or open_store(settings)) as session:
        try:
            if job.kind == JobKind.fit.value:  # the local user sees every tenant's names
                check_output_name(session, job.output_preset)
            return store_job(session, job, job.preset, tenant=LOCAL_TENANT).id
        except OutputPresetTaken as error:  # the transaction is rolled back: no job either
            raise BadInput(str(error)) from None


def locate(session, handle: str, *, fetch: bool = False):
    """Where `handle`'s preset is (with `fetch`, its `PresetFiles` in a local directory), or BadInput
    naming the closest store and built-in names when it is misspelt. Store names are the local
    tenant's, as for the jobs this CLI runs (a server's tenants' presets are theirs)."""
    resolver = store_resolver(session, tenant=LOCAL_TENANT)
    try:
        return resolver.files(handle) if fetch else resolver.locate(handle)
    except PresetNotFound as error:
        raise BadInput(f"{error}{did_you_mean(handle, preset_names(session, LOCAL_TENANT))}") from None


def check_preset(location, handle: str, settings: Settings, job=None) -> None:
    """BadInput for a local preset whose JSON does not parse or whose sizes cannot fit (`check_preset_for_job`)."""
    try:
        check_preset_for_job(location, handle, settings, job)
    except PresetRefused as error:
        raise BadInput(str(error)) from None


def check_name(name: str) -> None:
    try:
        check_preset_name(name)
    except ValueError as error:
        raise BadInput(str(error)) from None


# ---------------------------------------------------------------- commands


def cmd_run_here(args) -> int:
    """`lmq generate` / `lmq fit`: one job, in this process, with a progress bar."""
    from lmq.workers.runner import JobRunner, pool_from_settings

    check_output(getattr(args, "output", None))
    settings = load_settings()
    job_id = create_job(settings, args.command, args)
    with Progress(f"{args.command} {job_id[:8]}", unit_of(args.command)) as progress:

        def on_progress(done: int, total: int, loss: float | None = None) -> None:
            progress.update(done, total, loss=loss)

        runner = JobRunner(settings, pool_from_settings(settings), on_progress=on_progress)
        try:
            runner.run(job_id)
        except KeyboardInterrupt:
            runner.finish(job_id, JobState.cancelled, error="interrupted")
            print(f"\nlmq: job {job_id} cancelled; finished results stay in the store", file=sys.stderr)
            return 130
    with session_scope(runner.sessions) as session:
        job = queries.get_job(session, job_id)
        summary = job_summary(job)
        if args.command == "generate":
            write_results(session, job_id, args.output)
    return report_finished(summary)


def cmd_submit(args) -> int:
    output = getattr(args, "output", None)
    if output and not args.wait:
        raise BadInput("-o/--output needs --wait: a job's results are there once it has finished")
    check_output(output)
    with backend(args) as jobs:
        return submit(jobs, args)


class Store:
    """The commands' JobBackend through SQL: the store's own user sees every tenant's jobs and presets."""

    def __init__(self, settings: Settings):
        self.settings = settings

    @property
    def sessions(self):
        """Opened when first used: `lmq submit` refused before that leaves no database behind."""
        return open_store(self.settings)

    def submit(self, args) -> dict:
        """Written to the store, then sent to the workers through the broker."""
        from kombu.exceptions import OperationalError

        from lmq.workers.celery_app import enqueue_job, make_celery

        if self.settings.broker_url is None:
            raise BadInput(
                "LMQ_BROKER_URL is not set: give --server URL (or LMQ_SERVER) to submit to an lmq server, "
                "or use `lmq generate` or `lmq fit` to run a job here"
            )
        job_id = create_job(self.settings, args.kind, args)
        try:
            enqueue_job(make_celery(self.settings), self.settings, job_id, args.kind)
        except OperationalError as error:
            raise Failed(f"job {job_id} could not be sent to the broker: {error}") from None
        return self.job(job_id)

    def jobs(self, status: str | None, kind: str | None, limit: int) -> list[dict]:
        with session_scope(self.sessions) as session:
            return [job_summary(job) for job in queries.list_jobs(session, state=status, kind=kind, limit=limit)]

    def job(self, job_id: str) -> dict:
        with session_scope(self.sessions) as session:
            return job_summary(require_job(session, job_id))

    def results(self, job_id: str) -> Iterator[dict]:
        """Read as they are written out, from a session that lives as long as the writing."""
        with session_scope(self.sessions) as session:
            yield from map(schemas.result_line, queries.job_items(session, job_id))

    def events(self, job_id: str, after: int = 0) -> list[dict]:
        with session_scope(self.sessions) as session:
            require_job(session, job_id)
            return [schemas.event_line(event) for event in queries.job_events(session, job_id, after)]

    def cancel(self, job_id: str) -> dict:
        with session_scope(self.sessions) as session:
            job = queries.request_cancel(session, job_id)
            if job is None:
                raise BadInput(f"no job {job_id!r}")
            return job_summary(job)

    def share(self, name: str, tenant: str) -> dict:
        """The store's own user shares on the owner's behalf."""
        with session_scope(self.sessions) as session:
            preset = queries.get_preset(session, name)
            if preset is None:
                raise BadInput(f"no preset {name!r} in the store")
            if not tenant or any(character.isspace() for character in tenant):
                raise BadInput(f"tenant {tenant!r} is not a tenant name")
            queries.share_preset(session, name, owner=preset.tenant, tenant=tenant)
            return {"name": name, "shared_with": queries.preset_shares(session, name)}


@contextmanager
def backend(args) -> Iterator[JobBackend]:
    """The server `--server` names (or LMQ_SERVER), else this machine's store."""
    if args.server:
        with remote.server(args) as server:
            yield server
    else:
        yield Store(load_settings())


def require_job(session, job_id: str):
    job = queries.get_job(session, job_id)
    if job is None:
        raise BadInput(f"no job {job_id!r}")
    return job


def write_results(session, job_id: str, output: str | None) -> None:
    write_jsonl(map(schemas.result_line, queries.job_items(session, job_id)), output)


def cmd_jobs(args) -> int:
    with backend(args) as jobs:
        return manage_jobs(jobs, args)


def cmd_presets(args) -> int:
    if args.action == "share":
        with backend(args) as jobs:
            return share(jobs, args)
    settings = load_settings()
    factory = open_store(settings)
    with session_scope(factory) as session:
        if args.action == "list":
            stored = queries.list_presets(session)
            for preset in stored:
                print(json.dumps(schemas.preset_summary(preset)))
            if not stored:
                say_empty(
                    "the preset store has no presets yet (`lmq presets import` or `lmq fit` adds one; "
                    "`lmq architectures` lists the built-in presets)"
                )
        elif args.action == "show":
            preset = queries.get_preset(session, args.name)
            if preset is None:
                names = [stored.name for stored in queries.list_presets(session)]
                raise BadInput(f"no preset {args.name!r} in the store{did_you_mean(args.name, names)}")
            summary = {**schemas.preset_summary(preset), "chat_template": chat_template_source(str(stored_preset_directory(preset.path)))}
            print(json.dumps(summary, indent=2))
        elif args.action == "import":
            import_preset(settings, session, args.handle, args.name, args.tenant)
    return 0


def import_preset(settings: Settings, session, handle: str, name: str, tenant: str = LOCAL_TENANT) -> None:
    """Copy a preset from any handle into the store as `tenant`'s, so that tenant's jobs can name it."""
    check_name(name)
    try:
        check_output_name(session, name)
    except OutputPresetTaken as error:
        raise BadInput(str(error)) from None
    source = locate(session, handle, fetch=True)
    check_preset(source.directory, handle, settings)
    presets = preset_store(settings)
    made_by = f"import-{uuid.uuid4().hex[:12]}"  # a remote store's presets are published whole (core/storage)
    target = settings.preset_store / name if presets.storage.is_local else presets.staging(name, made_by)
    # A preset already in the store's directory (made under another LMQ_DATABASE_URL) is registered in place.
    if source.directory.resolve() != target.resolve():
        if target.exists():
            raise BadInput(f"{target} already exists")
        try:
            source.copy_to(target)  # only the preset's own files: no link out of it is followed
        except PresetFileError as error:  # refused before anything is copied
            raise BadInput(str(error)) from None
        builtin = builtin_template_name(handle)
        if builtin is not None and not (target / CHAT_TEMPLATE_FILE).exists():
            # the copy's name is no built-in preset's: it keeps the template its handle gives
            (target / CHAT_TEMPLATE_FILE).write_text(read_builtin_template(builtin), encoding="utf-8")
    architecture, location = preset_architecture(target), str(target)
    if not presets.storage.is_local:
        try:
            location = presets.publish(target, name, made_by)
        except FileExistsError:
            raise BadInput(f"{presets.storage.url_of(f'presets/{name}')} already exists") from None
    preset = queries.register_preset(
        session,
        name=name,
        path=location,
        architecture=architecture,
        source=handle,
        tenant=tenant,
    )
    print(json.dumps(schemas.preset_summary(preset)))


def chat_template_source(path: str) -> str:
    """Which chat template a stored preset's tokenizer uses, or why it has none."""
    from lmq.core.presets import load_tokenizer

    try:
        return load_tokenizer(path, cls=object).chat_template_source
    except (ValueError, OSError) as error:  # a preset whose tokenizer does not load
        return f"unknown: its tokenizer does not load ({error})"


def cmd_architectures(args) -> int:
    from lmq.core.plugins import get_registry

    registry = get_registry()
    if registry.unknown_plugins:
        raise BadInput(
            f"LMQ_PLUGINS names no installed plugin: {', '.join(registry.unknown_plugins)} "
            f"(installed: {', '.join(registry.installed_plugins)})"
        )
    for architecture in registry.architectures():
        print(
            json.dumps(
                {
                    "name": architecture.name,
                    "task_kind": architecture.task_kind,
                    "plugin": architecture.plugin,
                    "hf_model_types": list(architecture.hf_model_types),
                    "presets": sorted(architecture.presets),
                }
            )
        )
    for message in registry.load_errors.values():
        print(f"lmq: warning: {message}", file=sys.stderr)
    if not registry.architectures():
        say_empty("no architectures are registered (see LMQ_PLUGINS and the warnings above)")
    return 0


def cmd_serve(args) -> int:
    """The HTTP API under uvicorn; with no broker configured it runs the jobs itself too."""
    from lmq.api.app.main import create_app

    settings = load_settings()
    if not settings.api_tokens and args.host not in LOOPBACK:
        raise BadInput(
            f"LMQ_API_TOKENS is not set: without tokens `lmq serve` listens on 127.0.0.1 only, not {args.host}"
        )
    open_store(settings)
    limits = ServeLimits(
        request_timeout_s=args.request_timeout, keep_alive_s=args.keep_alive, max_connections=args.max_connections
    )
    log_to_stderr(args.log_level)
    serve(create_app(settings), args.host, args.port, args.log_level, limits)
    return 0


def cmd_db(args) -> int:
    from lmq.core.store import upgrade

    settings = load_settings()
    upgrade(settings.database_url)
    print(f"lmq: database schema is up to date ({settings.database_url.split('@')[-1]})", file=sys.stderr)
    return 0


def cmd_worker(args) -> int:
    """A Celery worker (a pool of LMQ_WORKER_JOBS threads: that many jobs at once, models pinned in
    this process and each one's engine shared by its jobs)."""
    from lmq.workers.celery_app import make_celery, worker_queue
    from lmq.core.store.leases import holder_name
    from lmq.workers.runner import process_runner

    settings = load_settings()
    if settings.broker_url is None:
        raise BadInput("LMQ_BROKER_URL is not set: a worker needs a broker (e.g. redis://127.0.0.1:6379/0)")
    queues = [worker_queue(q.strip()) for q in args.queues.split(",") if q.strip()]
    open_store(settings)
    runner = process_runner(settings)
    for handle in args.preload:
        try:
            location = runner.locate(handle)
        except PresetNotFound as error:
            raise BadInput(str(error)) from None
        lease = runner.pool.get(location, args.dtype)
        print(f"lmq: preloaded {handle} in {lease.load_seconds:.1f}s", file=sys.stderr)
    log_to_stderr(args.loglevel)
    app = make_celery(settings)
    import lmq.workers.tasks  # noqa: F401  registers the task on the app

    app.worker_main(
        [
            "worker",
            "--pool=threads",
            f"--concurrency={settings.worker_jobs}",
            f"--queues={','.join(queues)}",
            f"--hostname={holder_name()}",
            f"--loglevel={args.loglevel}",
            "--without-gossip",
            "--without-mingle",
        ]
    )
    return 0


# ---------------------------------------------------------------- the parser


def add_server_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--server", default=os.environ.get("LMQ_SERVER") or None, help="an lmq API URL (default: $LMQ_SERVER)"
    )
    parser.add_argument(
        "--token", default=os.environ.get("LMQ_TOKEN") or None, help="bearer token (default: $LMQ_TOKEN)"
    )


def add_generate_flags(parser: argparse.ArgumentParser) -> None:
    params = request_defaults("generate")
    parser.add_argument("--preset", required=True, help="store name, built-in name, hf://, kaggle:// or a directory")
    parser.add_argument(
        "input",
        help='JSONL with {"custom_id", "prompt"} per line ("encoder_text" for a seq2seq preset, '
        'or chat "messages"; optional "params"); "-" reads stdin',
    )
    parser.add_argument(
        "--max-length", type=int, help="prompt plus completion, in tokens (default: the preset's sequence length)"
    )
    parser.add_argument("--max-new-tokens", type=int, help="the longest completion (default: up to --max-length)")
    parser.add_argument(
        "--sampler",
        help=f"one of {', '.join(SAMPLER_NAMES)}, or a JSON object such as "
        f"'{{\"name\": \"top_p\", \"p\": 0.9}}' (default: {params.sampler})",
    )
    parser.add_argument("--seed", type=int, help="makes a sampling sampler reproducible (default: unseeded)")
    parser.add_argument(
        "--stop", action="append", help="a stop string, repeatable (default: none; the end token stops a row)"
    )
    parser.add_argument(
        "--strip-prompt", action="store_true", default=None,
        help="results hold the completion only (default: the prompt and its completion)",
    )
    parser.add_argument("--dtype", help=f"one of {', '.join(DTYPES)} (default: the preset's)")
    parser.add_argument(
        "--micro-batch-size", type=int, help="the most prompts decoded at once (default: $LMQ_MICRO_BATCH_SIZE)"
    )


def add_fit_flags(parser: argparse.ArgumentParser) -> None:
    hyperparameters = request_defaults("fit")
    parser.add_argument("--preset", required=True, help="the base preset")
    parser.add_argument(
        "input",
        help='JSONL with {"text"} per line ({"encoder_text", "decoder_text"} for a seq2seq preset); "-" reads stdin',
    )
    parser.add_argument("--output-preset", required=True, help="name to register the result under")
    parser.add_argument("--validation", help="JSONL of validation rows, as the input's (default: none)")
    parser.add_argument("--epochs", type=int, help=f"passes over the training data (default: {hyperparameters.epochs})")
    parser.add_argument("--batch-size", type=int, help=f"examples per step (default: {hyperparameters.batch_size})")
    parser.add_argument("--learning-rate", type=float, help=f"AdamW's (default: {hyperparameters.learning_rate})")
    parser.add_argument(
        "--sequence-length", type=int, help="tokens per training example (default: the preset's sequence length)"
    )
    parser.add_argument("--lora-rank", type=int, help="train LoRA adapters of this rank (default: train every weight)")
    parser.add_argument("--dtype", help=f"one of {', '.join(DTYPES)} (default: the preset's)")


def build_parser() -> Parser:
    parser = Parser(prog="lmq", description="Batch generation and queued fine-tuning.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    generate = commands.add_parser("generate", help="run a generate job here, now")
    add_generate_flags(generate)
    generate.add_argument("-o", "--output", help="results JSONL (default: stdout)")
    generate.set_defaults(handler=cmd_run_here)

    fit = commands.add_parser("fit", help="run a fit job here, now")
    add_fit_flags(fit)
    fit.set_defaults(handler=cmd_run_here)

    submit = commands.add_parser("submit", help="send a job to the workers")
    kinds = submit.add_subparsers(dest="kind", required=True, parser_class=Parser)
    for kind, add_flags in (("generate", add_generate_flags), ("fit", add_fit_flags)):
        sub = kinds.add_parser(kind)
        add_flags(sub)
        sub.add_argument(
            "--wait", action="store_true", help="follow the job with a progress bar (default: return once queued)"
        )
        if kind == "generate":
            sub.add_argument("-o", "--output", help="with --wait: the results JSONL (default: the summary only)")
        sub.add_argument(
            "--idempotency-key", help="with --server: a retry with the same key returns the same job (default: none)"
        )
        add_server_flags(sub)
        sub.set_defaults(handler=cmd_submit)

    serve = commands.add_parser("serve", help="run the HTTP API (and, with no broker, the jobs too)")
    serve.add_argument("--host", default="127.0.0.1", help="the address to listen on")
    serve.add_argument("--port", type=int, default=8000, help="the port to listen on")
    serve.add_argument("--log-level", default="info", help="uvicorn's")
    serve.add_argument(
        "--request-timeout",
        type=float,
        default=ServeLimits.request_timeout_s,
        help="seconds a client has to send a whole request, head and body",
    )
    serve.add_argument(
        "--keep-alive", type=int, default=ServeLimits.keep_alive_s, help="seconds an idle connection is kept"
    )
    serve.add_argument(
        "--max-connections",
        type=int,
        default=ServeLimits.max_connections,
        help="open connections beyond which requests get 503",
    )
    serve.set_defaults(handler=cmd_serve)

    worker = commands.add_parser("worker", help="run a Celery worker")
    worker.add_argument("--queues", default="generate,fit", help="job kinds or queue names")
    worker.add_argument(
        "--preload", action="append", default=[], metavar="HANDLE", help="a preset to load at start (default: none)"
    )
    worker.add_argument("--dtype", choices=DTYPES, help="dtype for preloaded presets (default: each preset's)")
    worker.add_argument("--loglevel", default="INFO", help="Celery's")
    worker.set_defaults(handler=cmd_worker)

    jobs = commands.add_parser("jobs", help="list, show, follow and cancel jobs")
    actions = jobs.add_subparsers(dest="action", required=True, parser_class=Parser)
    listing = actions.add_parser("list")
    listing.add_argument("--status", choices=[s.value for s in JobState], help="(default: any)")
    listing.add_argument("--kind", choices=[k.value for k in JobKind], help="(default: any)")
    listing.add_argument("--limit", type=int, default=50, help="the most jobs to list, newest first")
    add_server_flags(listing)
    for action in ("show", "results", "watch", "cancel", "events"):
        sub = actions.add_parser(action)
        sub.add_argument("id")
        add_server_flags(sub)
        if action == "results":
            sub.add_argument("-o", "--output", help="results JSONL (default: stdout)")
    jobs.set_defaults(handler=cmd_jobs)

    presets = commands.add_parser("presets", help="the preset store")
    actions = presets.add_subparsers(dest="action", required=True, parser_class=Parser)
    actions.add_parser("list")
    actions.add_parser("show").add_argument("name")
    importing = actions.add_parser("import")
    importing.add_argument("handle")
    importing.add_argument("--name", required=True, help="the store name to register it under")
    importing.add_argument(
        "--tenant", default=LOCAL_TENANT, help="the tenant whose preset it is (a server without tokens has only local)"
    )
    sharing = actions.add_parser("share", help="let another tenant, or every tenant, use a preset")
    sharing.add_argument("name")
    sharing.add_argument("tenant", help='the tenant to share it with, or "*" for every tenant')
    add_server_flags(sharing)
    presets.set_defaults(handler=cmd_presets)

    commands.add_parser("architectures", help="registered architectures").set_defaults(
        handler=cmd_architectures
    )

    db = commands.add_parser("db", help="database schema")
    db.add_argument("action", choices=["upgrade"])
    db.set_defaults(handler=cmd_db)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (BadInput, SettingsError) as error:
        fail(str(error))
    except Failed as error:
        print(f"lmq: error: {error}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # `lmq jobs results ID | head`: the reader has all it wants.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0

