"""Issue 27's hostile inputs against a real `lmq serve` on loopback (PostgreSQL, Redis, no worker), two tenants.

Each case is refused with a 4xx that says why and leaves nothing behind (no job, no preset, no
directory, no batch line run): JSON that is not UTF-8, a preset name with a trailing newline, a
preset whose config.json does not parse, a preset whose declared sizes cannot fit, and another
tenant's preset name, which is answered exactly as a free one. No answer is a 5xx, and the
server's log has no traceback.
"""

import json
import shutil

import pytest
from api_support import TEAM_A, TEAM_B, generate_body, settled_batch, two_tenant_server, watched_client
from hostile_presets import BIG_INTEGER, HOSTILE_PRESETS, TINY_LLAMA, make_hostile_preset

from lmq.core.store import queries, session_scope, sessions

BUILTIN = "llama2_7b_en"
UTF8_RULE = "must be UTF-8 (RFC 8259"


@pytest.fixture(scope="module")
def server(tmp_path_factory, postgres_url):
    root = tmp_path_factory.mktemp("hostile-inputs")
    started = two_tenant_server(root, postgres_url)
    home = started.home
    with session_scope(sessions(started.settings)) as session:
        for name in (*HOSTILE_PRESETS, BIG_INTEGER, "team-a-secret"):
            directory = home / "presets" / name
            if name == "team-a-secret":
                shutil.copytree(TINY_LLAMA, directory)
            else:
                make_hostile_preset(directory, name)
            queries.register_preset(
                session, name=name, path=str(directory), architecture="llama", source=None, tenant="team-a"
            )
    yield started
    started.stop()
    assert not [s for s in started.statuses if s >= 500], started.statuses
    assert "Traceback" not in (root / "server.log").read_text()



@pytest.fixture
def team_a(server):
    with watched_client(server, TEAM_A) as client:
        yield client


@pytest.fixture
def team_b(server):
    with watched_client(server, TEAM_B) as client:
        yield client


def job_ids(client) -> set[str]:
    return {job["id"] for job in client.get("/v1/jobs", params={"limit": 500}).json()["jobs"]}


def fit_body(output_preset, preset=BUILTIN):
    return {"kind": "fit", "preset": preset, "training_data": [{"text": "x"}], "output_preset": output_preset}


# ---------------------------------------------------------------- 1. JSON is UTF-8


@pytest.mark.parametrize("content_type", ["application/json", "application/merge-patch+json", None])
@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le"])
def test_a_job_body_in_another_encoding_than_utf8_is_refused(team_a, encoding, content_type):
    """FastAPI reads a body as JSON under either content type, or none."""
    before = job_ids(team_a)
    body = json.dumps(generate_body(BUILTIN, ["Hello"])).encode(encoding)
    headers = {"Content-Type": content_type} if content_type else {}
    refused = team_a.post("/v1/jobs", content=body, headers=headers)
    assert refused.status_code == 415, refused.text
    assert "the request body is not UTF-8" in refused.json()["detail"] and UTF8_RULE in refused.json()["detail"]
    assert job_ids(team_a) == before


def test_every_json_route_refuses_utf16(team_a):
    body = json.dumps({"tenant": "team-b"}).encode("utf-16")
    shared = team_a.post("/v1/presets/huge-hidden/shares", content=body, headers={"Content-Type": "application/json"})
    assert shared.status_code == 415 and UTF8_RULE in shared.json()["detail"]
    batch = json.dumps({"input_file_id": "file-x", "endpoint": "/v1/completions", "completion_window": "24h"})
    refused = team_a.post("/v1/batches", content=batch.encode("utf-16"), headers={"Content-Type": "application/json"})
    assert refused.status_code == 415 and UTF8_RULE in refused.json()["error"]["message"]
    assert team_a.get("/v1/batches").json()["data"] == []


def batch_lines(count: int) -> str:
    line = {"method": "POST", "url": "/v1/completions", "body": {"model": BUILTIN, "prompt": "Hi", "max_tokens": 2}}
    return "".join(json.dumps({"custom_id": f"r{i}", **line}) + "\n" for i in range(count))


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be"])
def test_a_batch_file_in_utf16_is_refused_whole_at_upload(server, team_a, encoding):
    files_before = team_a.get("/v1/files").json()["data"]
    upload = {"file": ("batch.jsonl", batch_lines(3).encode(encoding), "application/jsonl")}
    refused = team_a.post("/v1/files", files=upload, data={"purpose": "batch"})
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert error["code"] == "invalid_file_encoding" and "the file is not UTF-8" in error["message"]
    assert UTF8_RULE in error["message"]
    assert team_a.get("/v1/files").json()["data"] == files_before
    assert not list((server.home / "files").glob(".upload-*"))  # not even the temporary file


def test_a_stored_utf16_batch_file_fails_validation_and_no_line_runs(server, team_a):
    """A file stored before uploads were checked: line 1 of UTF-16-LE text is refused, and so, as a
    whole, are the lines after it (which start with a NUL byte and json.loads reads as UTF-16-BE)."""
    from lmq.core.store.batches import add_file, new_id

    file_id = new_id("file-")
    (server.home / "files").mkdir(exist_ok=True)
    (server.home / "files" / file_id).write_bytes(batch_lines(3).encode("utf-16-le"))
    with session_scope(sessions(server.settings)) as session:
        add_file(session, file_id=file_id, tenant="team-a", purpose="batch", filename="old.jsonl", size=1)
    jobs_before = job_ids(team_a)
    batch = team_a.post(
        "/v1/batches", json={"input_file_id": file_id, "endpoint": "/v1/completions", "completion_window": "24h"}
    ).json()
    shown = settled_batch(team_a, batch["id"])
    assert shown["status"] == "failed", shown
    error = shown["errors"]["data"][0]
    assert error["code"] == "invalid_file_encoding" and UTF8_RULE in error["message"], error
    assert shown["request_counts"]["total"] == 0 and job_ids(team_a) == jobs_before  # no job: no line runs


# ---------------------------------------------------------------- 2. names end where they end


@pytest.mark.parametrize("name", ["abc\n", "abc\r\n", "abc\n\n", "\nabc"])
def test_an_output_preset_with_a_newline_is_refused(server, team_a, name):
    before = job_ids(team_a)
    refused = team_a.post("/v1/jobs", json=fit_body(name))
    assert refused.status_code == 422, refused.text
    assert refused.json()["message"].startswith("output_preset: ") and "is not valid" in refused.json()["message"]
    assert job_ids(team_a) == before
    assert not (server.home / "presets" / name).exists()
    with session_scope(sessions(server.settings)) as session:
        assert queries.get_preset(session, name) is None


@pytest.mark.parametrize("path", ["/v1/presets/huge-hidden%0A", "/v1/presets/huge-hidden%0A/shares"])
def test_a_preset_name_with_a_newline_is_no_name(team_a, path):
    answer = team_a.get(path) if not path.endswith("shares") else team_a.post(path, json={"tenant": "team-b"})
    assert answer.status_code in (404, 422), answer.text


# ---------------------------------------------------------------- 3. and 4. what a preset's files declare


def test_a_preset_whose_config_has_a_5000_digit_integer_is_its_own_clear_error(team_a):
    before = job_ids(team_a)
    for body in (generate_body(BIG_INTEGER, ["x"]), fit_body("from-big-integer", preset=BIG_INTEGER)):
        refused = team_a.post("/v1/jobs", json=body)
        assert refused.status_code == 422, refused.text
        message = refused.json()["message"]
        assert message.startswith("preset: ") and f"Preset {BIG_INTEGER!r}, file config.json: is not valid JSON" in message
        assert "9999" not in message  # what the file holds is not quoted
    assert job_ids(team_a) == before


@pytest.mark.parametrize("name", sorted(HOSTILE_PRESETS))
def test_a_preset_too_large_for_the_pool_is_refused_naming_the_field_and_size(server, team_a, name):
    before = job_ids(team_a)
    refused = team_a.post("/v1/jobs", json=generate_body(name, ["x"]))
    assert refused.status_code == 422, refused.text
    message = refused.json()["message"]
    assert message.startswith("preset: ") and HOSTILE_PRESETS[name][2] in message, message
    assert "LMQ_MODEL_MEMORY_GB" in message or "LMQ_MAX_LENGTH" in message
    assert str(server.home) not in message
    assert job_ids(team_a) == before


@pytest.mark.parametrize("name", [BIG_INTEGER, *sorted(HOSTILE_PRESETS)])
def test_a_batch_whose_model_is_a_refused_preset_fails_validation_and_no_line_runs(server, team_a, name):
    line = {"method": "POST", "url": "/v1/completions", "body": {"model": name, "prompt": "Hi", "max_tokens": 2}}
    content = "".join(json.dumps({"custom_id": f"r{i}", **line}) + "\n" for i in range(2))
    uploaded = team_a.post(
        "/v1/files", files={"file": ("batch.jsonl", content.encode(), "application/jsonl")}, data={"purpose": "batch"}
    ).json()
    jobs_before = job_ids(team_a)
    batch = team_a.post(
        "/v1/batches", json={"input_file_id": uploaded["id"], "endpoint": "/v1/completions", "completion_window": "24h"}
    ).json()
    shown = settled_batch(team_a, batch["id"])
    assert shown["status"] == "failed", shown
    error = shown["errors"]["data"][0]
    assert error["code"] == "model_not_usable" and f"model {name!r} cannot run here" in error["message"], error
    expected = "is not valid JSON" if name == BIG_INTEGER else HOSTILE_PRESETS[name][2]
    assert expected in error["message"] and str(server.home) not in error["message"], error
    assert shown["request_counts"]["total"] == 0 and job_ids(team_a) == jobs_before  # no job: no line runs


# ---------------------------------------------------------------- 5. another tenant's names


def test_another_tenants_preset_name_is_answered_as_a_free_one(server, team_a, team_b):
    taken, free = team_b.post("/v1/jobs", json=fit_body("team-a-secret")), team_b.post("/v1/jobs", json=fit_body("b-free"))
    assert taken.status_code == free.status_code == 202, (taken.text, free.text)
    assert set(taken.json()) == set(free.json()) and taken.json()["output_preset"] == "team-a-secret"
    assert team_b.get("/v1/presets/team-a-secret").status_code == 404
    for job in (taken, free):
        team_b.post(f"/v1/jobs/{job.json()['id']}/cancel")
    assert team_a.post("/v1/jobs", json=fit_body("team-a-secret")).status_code == 409  # its own name stays taken
    assert team_b.post("/v1/jobs", json=fit_body(BUILTIN)).status_code == 409  # built-ins are everyone's
