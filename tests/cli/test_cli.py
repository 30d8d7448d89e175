"""The `lmq` command line without a model: bad input, the store commands, the worker guard."""

import json
import subprocess
import sys

import pytest
from hostile_presets import BIG_INTEGER, HOSTILE_PRESETS, make_hostile_preset

from lmq.api.cli import main
from lmq.core.config import load_settings
from lmq.core.store import queries, session_scope, sessions


def run_cli(capsys, *argv):
    """(exit code, stdout, stderr) of `lmq argv...` run in this process."""
    try:
        code = main(list(argv))
    except SystemExit as exit:
        code = exit.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def write_jsonl(path, rows):
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return str(path)


@pytest.fixture
def prompts(tmp_path):
    return write_jsonl(tmp_path / "in.jsonl", [{"custom_id": "a", "prompt": "Hello"}])


@pytest.fixture
def preset_dir(tmp_path):
    directory = tmp_path / "some-preset"
    directory.mkdir()
    return str(directory)


def nothing_written(home):
    """Not a job, not even a database: bad input is refused before the store is touched."""
    return not home.exists()


@pytest.mark.parametrize(
    "lines, extra, message",
    [
        (['{"prompt": "ok"}', '{"prompt": "broken'], [], "in.jsonl line 2: not valid JSON"),
        (['{"prompt": "ok"}', "[1, 2]"], [], "in.jsonl line 2: expected a JSON object, got list"),
        (['{"custom_id": "x"}'], [], "in.jsonl line 1: missing field 'prompt'"),
        (['{"custom_id": "x", "prompt": 5}'], [], "in.jsonl line 1: 'prompt' must be a string, got int"),
        ([], [], "in.jsonl has no inputs"),
        (['{"prompt": "ok"}'], ["--max-length", "0"], "--max-length must be at least 1, got 0"),
        (['{"prompt": "ok"}'], ["--max-new-tokens", "-3"], "--max-new-tokens must be at least 1"),
        (['{"prompt": "ok"}'], ["--sampler", "nucleus"], "--sampler 'nucleus' is not one of greedy"),
        (['{"prompt": "ok"}'], ["--max-length", "ten"], "argument --max-length: invalid int value"),
        # The job request model's own checks and limits, as POST /v1/jobs applies them.
        (['{"prompt": "ok"}'], ["--sampler", '{"name": "top_k", "p": 0.5}'], "--sampler: sampler 'top_k' takes no p"),
        (['{"prompt": "ok"}'], ["--sampler", '{"name": "top_p", "p": 1.5}'], "--sampler p must be at most 1.0"),
        (['{"prompt": "ok"}'], ["--sampler", '{"name": "top_p"'], "--sampler is not valid JSON"),
        (['{"prompt": "ok"}'], ["--max-new-tokens", "5000"], "--max-new-tokens must be at most 4096, got 5000"),
        (['{"prompt": "ok"}'], ["--dtype", "float17"], "--dtype 'float17' is not one of float32, float16 or bfloat16"),
        (['{"prompt": "ok"}', '{"prompt": ""}'], [], "in.jsonl line 2: 'prompt' must not be empty"),
        (['{"prompt": "ok"}', "", '{"encoder_text": "x"}'], [], "in.jsonl line 3: 'encoder_text': the job's first"),
    ],
)
def test_bad_generate_input_is_one_line_exit_2_and_writes_nothing(
    capsys, lmq_home, tmp_path, preset_dir, lines, extra, message
):
    source = write_jsonl(tmp_path / "in.jsonl", lines)
    output = tmp_path / "out.jsonl"
    code, out, err = run_cli(capsys, "generate", "--preset", preset_dir, source, "-o", str(output), *extra)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("lmq: error: ") and message in err
    assert out == "" and not output.exists()
    assert nothing_written(lmq_home)


def test_a_bad_sampler_is_refused_before_keras_is_imported(lmq_home, tmp_path, preset_dir):
    """Not only before the model loads: before the model library is imported at all."""
    source = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "ok"}])
    sampler = json.dumps({"name": "top_k", "p": 0.5})
    code = (
        "import sys\n"
        "from lmq.api.cli import main\n"
        "try:\n"
        f"    main(['generate', '--preset', {preset_dir!r}, {source!r}, '--sampler', {sampler!r}])\n"
        "except SystemExit as exit:\n"
        "    assert exit.code == 2, exit.code\n"
        "assert 'keras' not in sys.modules and 'torch' not in sys.modules, 'the model library was imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stderr == "lmq: error: --sampler: sampler 'top_k' takes no p\n"
    assert nothing_written(lmq_home)


def test_the_limits_are_the_servers(capsys, lmq_home, monkeypatch, tmp_path, preset_dir):
    """LMQ_MAX_* bound `lmq generate` as they bound POST /v1/jobs."""
    monkeypatch.setenv("LMQ_MAX_PROMPT_CHARS", "4")
    monkeypatch.setenv("LMQ_MAX_INPUTS", "2")
    source = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "ok"}, {"prompt": "too long"}])
    code, _, err = run_cli(capsys, "generate", "--preset", preset_dir, source)
    assert code == 2 and "in.jsonl line 2: 'prompt' must be at most 4 characters long" in err
    source = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "a"}] * 3)
    code, _, err = run_cli(capsys, "generate", "--preset", preset_dir, source)
    assert code == 2 and "in.jsonl has 3 entries, more than the 2 allowed" in err
    assert nothing_written(lmq_home)


def test_unknown_preset_is_named(capsys, lmq_home, tmp_path, prompts):
    output = tmp_path / "out.jsonl"
    code, _, err = run_cli(capsys, "generate", "--preset", "no-such-model", prompts, "-o", str(output))
    assert code == 2 and err.count("\n") == 1
    assert "unknown preset 'no-such-model'" in err
    assert not output.exists() and nothing_written(lmq_home)


def test_a_misspelt_preset_gets_the_closest_names(capsys, lmq_home, tmp_path, prompts, preset_dir):
    code, _, err = run_cli(capsys, "generate", "--preset", "llama2_7b_em", prompts)
    assert code == 2 and err.count("\n") == 1
    assert "unknown preset 'llama2_7b_em'" in err and "(did you mean 'llama2_7b_en'" in err
    with session_scope(sessions(load_settings())) as session:
        queries.register_preset(session, name="support-bot", path=preset_dir, architecture=None, source=None)
    code, _, err = run_cli(capsys, "generate", "--preset", "suport-bot", prompts)
    assert code == 2 and "(did you mean 'support-bot'?)" in err
    code, _, err = run_cli(capsys, "presets", "show", "support-bto")
    assert code == 2 and "no preset 'support-bto' in the store (did you mean 'support-bot'?)" in err
    code, _, err = run_cli(capsys, "presets", "import", "suport-bot", "--name", "copy")
    assert code == 2 and "(did you mean 'support-bot'?)" in err
    # Nothing close: no suggestion.
    code, _, err = run_cli(capsys, "generate", "--preset", "zzzzzz", prompts)
    assert code == 2 and "did you mean" not in err


def test_empty_listings_say_so(capsys, lmq_home):
    code, out, err = run_cli(capsys, "jobs", "list")
    assert (code, out, err) == (0, "", "lmq: no jobs\n")
    code, out, err = run_cli(capsys, "jobs", "list", "--status", "failed", "--kind", "fit")
    assert (code, out, err) == (0, "", "lmq: no failed fit jobs\n")
    code, out, err = run_cli(capsys, "presets", "list")
    assert code == 0 and out == "" and err.startswith("lmq: the preset store has no presets yet")


def test_no_architectures_says_so(capsys, lmq_home, monkeypatch):
    import lmq.core.plugins

    monkeypatch.setattr(lmq.core.plugins, "get_registry", EmptyRegistry)
    code, out, err = run_cli(capsys, "architectures")
    assert code == 0 and out == "" and "lmq: no architectures are registered" in err


class EmptyRegistry:
    """What LMQ_PLUGINS naming no installed plugin leaves."""

    load_errors = {}
    installed_plugins = ["llama"]
    unknown_plugins = []

    def architectures(self):
        return []


def test_every_option_shows_its_default():
    """`--help` names each option's default (or says it is required), on every command."""
    import argparse

    from lmq.api.cli.commands import build_parser

    pending, checked = [build_parser()], 0
    while pending:
        parser = pending.pop()
        formatter = parser._get_formatter()
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                pending.extend(action.choices.values())
            elif action.option_strings and not isinstance(action, argparse._HelpAction):
                shown = formatter._expand_help(action)
                assert "(default" in shown or "(required)" in shown, (parser.prog, action.option_strings, shown)
                checked += 1
    assert checked > 60


def test_submit_writes_results_only_when_it_waits(capsys, lmq_home, prompts, preset_dir, tmp_path):
    code, _, err = run_cli(capsys, "submit", "generate", "--preset", preset_dir, prompts, "-o", str(tmp_path / "o"))
    assert code == 2 and "-o/--output needs --wait" in err
    assert nothing_written(lmq_home)


def test_worker_dtype_is_checked_before_anything_loads(capsys, lmq_home):
    code, _, err = run_cli(capsys, "worker", "--dtype", "float17")
    assert code == 2 and err.count("\n") == 1 and "invalid choice: 'float17'" in err


def test_missing_input_file_is_named(capsys, lmq_home, tmp_path, preset_dir):
    code, _, err = run_cli(capsys, "generate", "--preset", preset_dir, str(tmp_path / "nope.jsonl"))
    assert code == 2 and "nope.jsonl' does not exist" in err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--output-preset", "bad name!"], "preset name 'bad name!' is not valid"),
        (["--output-preset", "ok", "--epochs", "0"], "--epochs must be at least 1"),
        (["--output-preset", "ok", "--learning-rate", "-1"], "--learning-rate must be positive"),
        (["--output-preset", "ok", "--dtype", "float17"], "--dtype 'float17' is not one of float32"),
    ],
)
def test_bad_fit_input(capsys, lmq_home, tmp_path, preset_dir, extra, message):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": "some text"}])
    code, _, err = run_cli(capsys, "fit", "--preset", preset_dir, train, *extra)
    assert code == 2 and err.count("\n") == 1 and message in err
    assert nothing_written(lmq_home)


def test_fit_needs_text_lines(capsys, lmq_home, tmp_path, preset_dir):
    train = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "not text"}])
    code, _, err = run_cli(capsys, "fit", "--preset", preset_dir, train, "--output-preset", "x")
    assert code == 2 and "missing field 'text'" in err


def test_fit_refuses_a_mix_of_causal_and_sequence_to_sequence_examples(capsys, lmq_home, tmp_path, preset_dir):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": "fine"}, {"encoder_text": "q", "decoder_text": "a"}])
    code, _, err = run_cli(capsys, "fit", "--preset", preset_dir, train, "--output-preset", "x")
    assert code == 2 and err.count("\n") == 1
    assert "train.jsonl line 2: 'encoder_text': the job's first input is for a causal LM ('text')" in err
    assert nothing_written(lmq_home)


def test_fit_refuses_an_existing_output_preset(capsys, lmq_home, tmp_path, preset_dir):
    with session_scope(sessions(load_settings())) as session:
        queries.register_preset(session, name="taken", path=preset_dir, architecture=None, source=None)
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": "some text"}])
    code, _, err = run_cli(capsys, "fit", "--preset", preset_dir, train, "--output-preset", "taken")
    assert code == 2 and "preset 'taken' already exists" in err
    with session_scope(sessions(load_settings())) as session:
        assert queries.list_jobs(session) == []


def test_submit_and_worker_need_a_broker(capsys, lmq_home, prompts, preset_dir):
    code, _, err = run_cli(capsys, "submit", "generate", "--preset", preset_dir, prompts)
    assert code == 2 and "LMQ_BROKER_URL is not set" in err
    code, _, err = run_cli(capsys, "worker")
    assert code == 2 and "LMQ_BROKER_URL is not set" in err
    assert nothing_written(lmq_home)


def test_jobs_commands_read_the_store(capsys, lmq_home, prompts):
    with session_scope(sessions(load_settings())) as session:
        job_id = queries.create_generate_job(
            session, preset="p", inputs=[{"custom_id": "a", "prompt": "Hi"}], params={}
        ).id
    code, out, _ = run_cli(capsys, "jobs", "list")
    assert code == 0 and json.loads(out)["id"] == job_id
    code, out, _ = run_cli(capsys, "jobs", "show", job_id)
    assert json.loads(out)["status"] == "queued"
    code, out, _ = run_cli(capsys, "jobs", "results", job_id)
    assert json.loads(out) == {
        "index": 0,
        "custom_id": "a",
        "output": None,
        "prompt_tokens": None,
        "completion_tokens": None,
        "finish_reason": None,
        "error": None,
        "choices": None,
    }
    code, out, _ = run_cli(capsys, "jobs", "cancel", job_id)
    assert json.loads(out)["status"] == "cancelled"
    code, out, _ = run_cli(capsys, "jobs", "events", job_id)
    assert [json.loads(line)["state"] for line in out.splitlines()] == ["queued", "cancelled"]
    code, out, _ = run_cli(capsys, "jobs", "watch", job_id)
    assert code == 1 and json.loads(out)["status"] == "cancelled"
    code, _, err = run_cli(capsys, "jobs", "show", "nope")
    assert code == 2 and "no job 'nope'" in err


def test_presets_import_copies_into_the_store(capsys, lmq_home, preset_dir):
    code, out, _ = run_cli(capsys, "presets", "import", preset_dir, "--name", "mine")
    assert code == 0
    stored = json.loads(out)
    assert stored["name"] == "mine" and stored["source"] == preset_dir
    assert stored["path"] == str(lmq_home / "presets" / "mine")
    code, out, _ = run_cli(capsys, "presets", "list")
    assert [json.loads(line)["name"] for line in out.splitlines()] == ["mine"]
    code, out, _ = run_cli(capsys, "presets", "show", "mine")
    assert json.loads(out)["name"] == "mine"
    code, _, err = run_cli(capsys, "presets", "import", preset_dir, "--name", "mine")
    assert code == 2 and "already exists" in err
    code, _, err = run_cli(capsys, "presets", "show", "other")
    assert code == 2 and "no preset 'other'" in err


def test_architectures_lists_the_registry(capsys, lmq_home):
    code, out, _ = run_cli(capsys, "architectures")
    names = [json.loads(line)["name"] for line in out.splitlines()]
    assert code == 0 and "llama" in names


def test_db_upgrade_and_the_console_script(lmq_home, tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "lmq.api.cli", "db", "upgrade"], capture_output=True, text=True, check=True
    )
    assert "up to date" in done.stderr
    assert (lmq_home / "lmq.db").exists()
    # The same one-line error through a real process.
    failed = subprocess.run(
        [sys.executable, "-m", "lmq.api.cli", "generate", "--preset", "nowhere", "-"],
        input='{"prompt": "hi"}\n',
        capture_output=True,
        text=True,
    )
    assert failed.returncode == 2
    assert failed.stderr.strip().startswith("lmq: error: unknown preset 'nowhere'")


def test_cli_never_imports_keras_for_store_commands(lmq_home):
    code = (
        "import sys; from lmq.api.cli import main; main(['jobs', 'list']); "
        "assert 'keras' not in sys.modules and 'torch' not in sys.modules, 'heavy import'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_job_the_broker_cannot_take_is_failed_not_left_queued(capsys, lmq_home, monkeypatch, prompts, preset_dir):
    import lmq.workers.celery_app as celery_app

    make_celery = celery_app.make_celery

    def without_retries(settings):
        app = make_celery(settings)
        app.conf.task_publish_retry = False
        return app

    monkeypatch.setattr(celery_app, "make_celery", without_retries)
    monkeypatch.setenv("LMQ_BROKER_URL", "redis://127.0.0.1:1/0")  # nothing listens on port 1
    code, _, err = run_cli(capsys, "submit", "generate", "--preset", preset_dir, prompts)
    assert code == 1 and "could not be sent to the broker" in err
    with session_scope(sessions(load_settings())) as session:
        (job,) = queries.list_jobs(session)
        assert job.state == "failed" and job.error.startswith("could not enqueue")


def test_an_output_in_a_missing_directory_is_refused_before_the_job(capsys, lmq_home, tmp_path, prompts, preset_dir):
    output = tmp_path / "missing" / "out.jsonl"
    code, _, err = run_cli(capsys, "generate", "--preset", preset_dir, prompts, "-o", str(output))
    assert code == 2 and "output directory" in err and "does not exist" in err
    assert nothing_written(lmq_home)


def test_presets_import_for_a_tenant_refuses_reserved_names_and_share_is_recorded(capsys, lmq_home, preset_dir):
    for reserved in ("llama2_7b_en", "Llama"):
        code, _, err = run_cli(capsys, "presets", "import", preset_dir, "--name", reserved)
        assert code == 2 and f"preset name {reserved!r} is reserved" in err
    assert not (lmq_home / "presets" / "llama2_7b_en").exists()
    code, out, _ = run_cli(capsys, "presets", "import", preset_dir, "--name", "theirs", "--tenant", "team-a")
    assert code == 0 and json.loads(out)["owner"] == "team-a"
    with session_scope(sessions(load_settings())) as session:
        assert queries.get_preset(session, "theirs", "team-b") is None
    prompts = write_jsonl(lmq_home / "in.jsonl", [{"prompt": "Hello"}])
    code, _, err = run_cli(capsys, "generate", "--preset", "theirs", prompts)  # the local user's jobs are local's
    assert code == 2 and "unknown preset 'theirs'" in err
    code, out, _ = run_cli(capsys, "presets", "share", "theirs", "team-b")
    assert code == 0 and json.loads(out) == {"name": "theirs", "shared_with": ["team-b"]}
    with session_scope(sessions(load_settings())) as session:
        assert queries.get_preset(session, "theirs", "team-b").tenant == "team-a"
        assert queries.get_preset(session, "theirs", "team-c") is None
    code, _, err = run_cli(capsys, "presets", "share", "theirs", "team c")
    assert code == 2 and "tenant 'team c' is not a tenant name" in err
    code, _, err = run_cli(capsys, "presets", "share", "nothing-here", "team-b")
    assert code == 2 and "no preset 'nothing-here'" in err


# ---------------------------------------------------------------- issue 27: hostile inputs, one line each


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-32"])
def test_an_input_file_in_another_encoding_than_utf8_is_refused(capsys, lmq_home, tmp_path, preset_dir, encoding):
    path = tmp_path / "in.jsonl"
    path.write_bytes(json.dumps({"prompt": "Hello"}).encode(encoding) + "\n".encode(encoding))
    for command in (["generate", "--preset", preset_dir, str(path)], ["fit", "--preset", preset_dir, str(path), "--output-preset", "x"]):
        code, _, err = run_cli(capsys, *command)
        assert code == 2 and err.count("\n") == 1, err
        assert f"{path} is not UTF-8" in err and "must be UTF-8 (RFC 8259" in err
    assert nothing_written(lmq_home)


def test_a_5000_digit_number_in_an_input_line_is_one_line(capsys, lmq_home, tmp_path, preset_dir):
    path = write_jsonl(tmp_path / "in.jsonl", ['{"prompt": "x", "seed": ' + "9" * 5000 + "}"])
    code, _, err = run_cli(capsys, "generate", "--preset", preset_dir, path)
    assert code == 2 and err.count("\n") == 1 and "in.jsonl line 1: not valid JSON (a number too long" in err
    assert nothing_written(lmq_home)


@pytest.mark.parametrize("name", ["abc\n", "abc\r\n"])
def test_a_name_with_a_newline_is_refused_by_fit_and_import(capsys, lmq_home, tmp_path, preset_dir, name):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": "some text"}])
    for command in (["fit", "--preset", preset_dir, train, "--output-preset", name], ["presets", "import", preset_dir, "--name", name]):
        code, _, err = run_cli(capsys, *command)
        assert code == 2 and err.count("\n") == 1 and f"preset name {name!r} is not valid" in err, err
    assert not (lmq_home / "presets").exists()
    if (lmq_home / "lmq.db").exists():
        with session_scope(sessions(load_settings())) as session:
            assert queries.list_jobs(session) == [] and queries.list_presets(session) == []


@pytest.fixture(params=[BIG_INTEGER, *sorted(HOSTILE_PRESETS)])
def hostile_preset(request, tmp_path):
    """(its directory, what a refusal must say)"""
    directory = make_hostile_preset(tmp_path / request.param, request.param)
    said = "file config.json: is not valid JSON" if request.param == BIG_INTEGER else HOSTILE_PRESETS[request.param][2]
    return str(directory), said


def test_a_hostile_preset_is_refused_by_generate_fit_and_import(capsys, lmq_home, tmp_path, prompts, hostile_preset):
    directory, said = hostile_preset
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": "some text"}])
    for command in (
        ["generate", "--preset", directory, prompts],
        ["fit", "--preset", directory, train, "--output-preset", "out"],
        ["presets", "import", directory, "--name", "hostile"],
    ):
        code, _, err = run_cli(capsys, *command)
        assert code == 2 and err.count("\n") == 1 and said in err, (command, err)
        assert "Traceback" not in err
    assert not (lmq_home / "presets" / "hostile").exists() and not (lmq_home / "presets" / "out").exists()
    if (lmq_home / "lmq.db").exists():
        with session_scope(sessions(load_settings())) as session:
            assert queries.list_jobs(session) == [] and queries.list_presets(session) == []


def test_fit_refuses_a_name_another_tenant_holds(capsys, lmq_home, tmp_path, preset_dir):
    """The CLI's local user sees every tenant's presets, so for it such a name is simply taken."""
    with session_scope(sessions(load_settings())) as session:
        queries.register_preset(session, name="theirs", path=preset_dir, architecture=None, source=None, tenant="team-a")
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": "some text"}])
    code, _, err = run_cli(capsys, "fit", "--preset", preset_dir, train, "--output-preset", "theirs")
    assert code == 2 and err.count("\n") == 1 and "preset 'theirs' already exists" in err
    with session_scope(sessions(load_settings())) as session:
        assert queries.list_jobs(session) == []
