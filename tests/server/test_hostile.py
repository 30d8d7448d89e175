"""Hostile input against a real `lmq serve` on loopback (PostgreSQL, Redis, no worker) from two tenants.

What issue 11's probe found, each as a test that fails if it comes back: a built-in preset name
taken over by a fit, another tenant's presets listed, read or used (by name or by their directory
in the store), handles and paths that gave 500s or told which directories exist, an
Idempotency-Key reused for another request, a 404 that takes longer for another tenant's job than
for an unknown id, and a slow-loris client locking others out. No answer here may be a 5xx.
"""

import json
import socket
import statistics
import threading
import time

import httpx
import pytest
from api_support import TEAM_A, TEAM_B, TOKENS, ApiServer, generate_body, two_tenant_server, watched_client
from sqlalchemy import select

from lmq.core.store import JobState, queries, session_scope, sessions
from lmq.core.store.models import PresetShare

BUILTIN = "llama2_7b_en"


@pytest.fixture(scope="module")
def server(tmp_path_factory, postgres_url):
    started = two_tenant_server(tmp_path_factory.mktemp("hostile"), postgres_url)
    home = started.home
    (home / "presets" / "team-a-model").mkdir(parents=True)
    (home / "presets" / ".team-a-unfinished.partial").mkdir()
    with session_scope(sessions(started.settings)) as session:
        queries.register_preset(
            session, name="team-a-model", path=str(home / "presets" / "team-a-model"), architecture="llama",
            source=None, parent=BUILTIN, details={"training_examples": 3, "final_loss": 0.5}, tenant="team-a",
        )
    yield started
    started.stop()
    assert not [s for s in started.statuses if s >= 500], started.statuses



@pytest.fixture
def team_a(server):
    with watched_client(server, TEAM_A) as client:
        yield client


@pytest.fixture
def team_b(server):
    with watched_client(server, TEAM_B) as client:
        yield client


def fit_body(output_preset, preset=BUILTIN):
    return {"kind": "fit", "preset": preset, "training_data": [{"text": "secret"}], "output_preset": output_preset}


def job_ids(client) -> set[str]:
    return {job["id"] for job in client.get("/v1/jobs", params={"limit": 500}).json()["jobs"]}


def unknown_preset_message(response, handle) -> str:
    """The refusal of a preset, with the handle taken out: the same for every reason of refusing."""
    assert response.status_code == 422, response.text
    return response.json()["message"].replace(repr(handle), "<handle>")


# ---------------------------------------------------------------- names


@pytest.mark.parametrize("name", [BUILTIN, BUILTIN.upper(), "llama", "Mistral"])
def test_builtin_preset_and_architecture_names_cannot_be_taken(team_b, name):
    before = job_ids(team_b)
    refused = team_b.post("/v1/jobs", json=fit_body(name))
    assert refused.status_code == 409 and "reserved" in refused.json()["detail"], refused.text
    assert job_ids(team_b) == before  # refused before any work: no job


def test_a_builtin_name_in_the_store_does_not_shadow_the_builtin(server, team_a):
    """A store row named like a built-in (as an older lmq let a fit write) changes nothing a job runs."""
    with session_scope(sessions(server.settings)) as session:
        queries.register_preset(
            session, name=BUILTIN, path=str(server.home / "presets" / "team-a-model"), architecture="llama",
            source=None, tenant="team-b",
        )
    shown = team_a.get(f"/v1/presets/{BUILTIN}").json()
    assert shown["builtin"] is True and shown["handle"].startswith(("hf://", "kaggle://")), shown
    job = team_a.post("/v1/jobs", json=generate_body(BUILTIN, ["x"]))
    assert job.status_code == 202 and job.json()["preset"] == BUILTIN


def test_an_output_name_taken_or_pending_is_a_409_at_submission(team_a, team_b):
    """For the tenant that can see it; another tenant's name is answered as a free one (issue 27)."""
    assert team_a.post("/v1/jobs", json=fit_body("team-a-model")).status_code == 409  # in the store
    first = team_a.post("/v1/jobs", json=fit_body("wanted-twice"))
    assert first.status_code == 202
    taken = team_a.post("/v1/jobs", json=fit_body("wanted-twice"))  # a queued fit's output is taken too
    assert taken.status_code == 409 and "already exists" in taken.json()["detail"]
    hidden = team_b.post("/v1/jobs", json=fit_body("wanted-twice"))
    assert hidden.status_code == 202  # team-b cannot tell that team-a's fit is making it
    for job in (first, hidden):
        assert team_a.post(f"/v1/jobs/{job.json()['id']}/cancel").status_code in (200, 404)
    assert team_b.post(f"/v1/jobs/{hidden.json()['id']}/cancel").json()["status"] == "cancelled"
    assert team_a.post("/v1/jobs", json=fit_body("wanted-twice")).status_code == 202  # free again


# ---------------------------------------------------------------- tenants' presets


def test_another_tenants_preset_is_not_listed_shown_or_used(server, team_a, team_b):
    mine = team_a.get("/v1/presets/team-a-model").json()
    assert mine["owner"] == "team-a" and mine["details"]["final_loss"] == 0.5
    assert "team-a-model" in [p["name"] for p in team_a.get("/v1/presets").json()["presets"]]
    assert not any("path" in p or str(server.home) in str(p) for p in team_a.get("/v1/presets").json()["presets"])

    assert "team-a-model" not in [p["name"] for p in team_b.get("/v1/presets").json()["presets"]]
    theirs, nothing = team_b.get("/v1/presets/team-a-model"), team_b.get("/v1/presets/team-z-model")
    assert theirs.status_code == nothing.status_code == 404
    assert theirs.json()["detail"].replace("team-a", "team-z") == nothing.json()["detail"]
    assert "team-a-model" not in team_b.get("/v1/presets/team-a-modle").json()["detail"]  # not suggested either

    directory = str(server.home / "presets" / "team-a-model")
    unfinished = str(server.home / "presets" / ".team-a-unfinished.partial")
    refusals = {
        unknown_preset_message(team_b.post("/v1/jobs", json=body), handle)
        for handle in ("team-a-model", directory, unfinished, "team-z-model")
        for body in (generate_body(handle, ["x"]), fit_body("b-output", preset=handle))
    }
    assert len(refusals) == 1, refusals
    assert team_a.post("/v1/jobs", json=generate_body("team-a-model", ["x"])).status_code == 202
    assert team_a.post("/v1/jobs", json=generate_body(directory, ["x"])).status_code == 202


def test_a_worker_resolves_a_jobs_store_name_as_its_tenant(server):
    """A job that reached SQL naming another tenant's preset (not through the API) fails unloaded."""
    from lmq.workers.runner import JobRunner

    with session_scope(sessions(server.settings)) as session:
        job = queries.create_generate_job(
            session, preset="team-a-model", inputs=[{"prompt": "x"}], params={}, tenant="team-b"
        )
        job_id = job.id
    runner = JobRunner(server.settings, pool=None)  # the pool is never reached
    assert runner.run(job_id) == JobState.failed.value
    with session_scope(sessions(server.settings)) as session:
        assert "unknown preset 'team-a-model'" in queries.get_job(session, job_id).error


def test_sharing_is_explicit_recorded_and_only_the_owners(server, team_a, team_b):
    with session_scope(sessions(server.settings)) as session:
        queries.register_preset(
            session, name="shared-model", path=str(server.home / "presets" / "team-a-model"), architecture="llama",
            source="/srv/private/base", parent="/srv/private/base", job_id=None, tenant="team-a",
        )
    assert team_b.post("/v1/jobs", json=generate_body("shared-model", ["x"])).status_code == 422
    stolen = team_b.post("/v1/presets/shared-model/shares", json={"tenant": "team-b"})
    assert stolen.status_code == 404  # only the owner shares
    shared = team_a.post("/v1/presets/shared-model/shares", json={"tenant": "team-b"})
    assert shared.status_code == 201 and shared.json()["shared_with"] == ["team-b"]

    seen = team_b.get("/v1/presets/shared-model").json()
    assert seen["owner"] == "team-a" and seen["source"] is None and seen["parent"] is None, seen
    assert "shared-model" in [p["name"] for p in team_b.get("/v1/presets").json()["presets"]]
    assert team_b.post("/v1/jobs", json=generate_body("shared-model", ["x"])).json()["preset"] == "shared-model"
    assert team_b.get("/v1/presets/team-a-model").status_code == 404  # one preset shared, not all

    assert team_a.post("/v1/presets/shared-model/shares", json={"tenant": "*"}).json()["shared_with"] == ["*", "team-b"]
    with session_scope(sessions(server.settings)) as session:
        rows = session.execute(select(PresetShare.tenant, PresetShare.shared_by).where(PresetShare.preset == "shared-model"))
        assert sorted(rows) == [("*", "team-a"), ("team-b", "team-a")]
    assert team_a.post("/v1/presets/shared-model/shares", json={"tenant": ""}).status_code == 422


def test_lmq_presets_share_over_http_acts_as_the_tokens_tenant(server, capsys):
    from lmq.api.cli import main

    with session_scope(sessions(server.settings)) as session:
        queries.register_preset(
            session, name="cli-shared", path=str(server.home / "presets" / "cli-shared"), architecture=None,
            source=None, tenant="team-a",
        )
    share = ["presets", "share", "cli-shared", "team-b", "--server", server.url, "--token"]
    with pytest.raises(SystemExit) as refused:
        main([*share, "tok-b"])
    assert refused.value.code == 2 and "no preset 'cli-shared' of yours" in capsys.readouterr().err
    assert main([*share, "tok-a"]) == 0
    assert json.loads(capsys.readouterr().out) == {"name": "cli-shared", "shared_with": ["team-b"]}


# ---------------------------------------------------------------- handles


@pytest.mark.parametrize(
    "handle",
    ["hf://x/../../y", "hf://../etc", "hf://org/", "hf://org/name@", "hf://o/" + "n" * 200, "kaggle://a",
     "kaggle://a//b/c", "kaggle://a/b/c/d/e/f", "kaggle://a/b/../d"],
)
def test_malformed_remote_handles_are_refused_at_submission(team_a, handle):
    before = job_ids(team_a)
    response = team_a.post("/v1/jobs", json=generate_body(handle, ["x"]))
    assert unknown_preset_message(response, handle).startswith("preset: preset <handle> is not in the preset store")
    assert job_ids(team_a) == before


def test_paths_that_gave_500s_or_told_what_exists_all_get_one_answer(server, team_a):
    presets = server.home / "presets"
    handles = [
        str(presets / ("x" * 300)),  # too long a name, under a directory that exists
        str(presets / "team-a-model" / ("y" * 300)),
        "~nosuchuser_lmq/x",
        "~root",
        "/etc",
        str(presets / "not-there"),
        "/no/such/dir",
        "a/" * 200,
    ]
    messages = {unknown_preset_message(team_a.post("/v1/jobs", json=generate_body(h, ["x"])), h) for h in handles}
    assert len(messages) == 1, messages


def test_an_input_naming_another_tenants_preset_as_its_model_is_refused_and_makes_no_job(server, team_a, team_b):
    """An input's own `model` (an adapter to run it with) is checked as the job's preset is: team B may
    not name team A's preset, nor a path, and gets the same answer as for one that does not exist."""
    before = job_ids(team_b)
    for handle in ["team-a-model", str(server.home / "presets" / "team-a-model"), "no-such-adapter"]:
        body = generate_body(BUILTIN, ["one", "two"])
        body["inputs"][1]["model"] = handle
        response = team_b.post("/v1/jobs", json=body)
        assert unknown_preset_message(response, handle).startswith("inputs[1].model: preset <handle> is not in the preset store")
    assert job_ids(team_b) == before


# ---------------------------------------------------------------- idempotency and 404s


def test_an_idempotency_key_reused_for_another_request_is_a_422(team_a):
    key = {"Idempotency-Key": "hostile-1"}
    first = team_a.post("/v1/jobs", json=generate_body(BUILTIN, ["first"]), headers=key)
    # The same request (written differently) replays the job ...
    written_otherwise = json.dumps(generate_body(BUILTIN, ["first"]), indent=4)
    same = team_a.post("/v1/jobs", content=written_otherwise, headers={**key, "Content-Type": "application/json"})
    assert first.status_code == 202 and same.status_code == 202 and same.json()["id"] == first.json()["id"]
    # ... another one is refused, saying why, and makes no job.
    before = job_ids(team_a)
    other = team_a.post("/v1/jobs", json=generate_body(BUILTIN, ["second"]), headers=key)
    assert other.status_code == 422, other.text
    assert "already used for a different request" in other.json()["message"]
    assert team_a.post("/v1/jobs", json=fit_body("idem-fit"), headers=key).status_code == 422
    assert job_ids(team_a) == before


def test_another_tenants_job_costs_what_an_unknown_id_does(team_a, team_b):
    """The 404s' medians are of one order of magnitude (no wall time is asserted)."""
    big = [{"text": "t" * 4000}] * 1000  # a heavy row: loading it first is what made the difference
    theirs = team_a.post("/v1/jobs", json={**fit_body("timing-fit"), "training_data": big}).json()["id"]
    unknown = "0" * 32

    def seconds(job_id):
        started = time.perf_counter()
        assert team_b.get(f"/v1/jobs/{job_id}").status_code == 404
        return time.perf_counter() - started

    samples = {theirs: [], unknown: []}
    for _ in range(25):
        for job_id in samples:
            samples[job_id].append(seconds(job_id))
    other, absent = statistics.median(samples[theirs]), statistics.median(samples[unknown])
    assert other < 4 * absent and absent < 4 * other, (other, absent)
    assert team_b.get(f"/v1/jobs/{theirs}").json() == team_b.get(f"/v1/jobs/{unknown}").json() | {
        "detail": f"no job {theirs!r}"
    }


# ---------------------------------------------------------------- slow clients


def test_a_slow_loris_client_does_not_lock_others_out(tmp_path, postgres_url):
    """120 connections trickling a request head, one byte every half second, against a server that
    takes 50 connections and gives each request 2 s: they are cut off, and others are answered."""
    server = ApiServer(
        {"LMQ_HOME": str(tmp_path), "LMQ_DATABASE_URL": postgres_url, "LMQ_API_TOKENS": TOKENS},
        tmp_path / "server.log", "--request-timeout", "2", "--max-connections", "50",
    )
    stop = threading.Event()
    loris = []
    try:
        for _ in range(120):
            connection = socket.create_connection(("127.0.0.1", server.port), timeout=5)
            connection.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            loris.append(connection)

        def trickle():
            while not stop.wait(0.5):
                for connection in loris:
                    try:
                        connection.send(b"X")
                    except OSError:
                        pass

        threading.Thread(target=trickle, daemon=True).start()
        answered = None
        for _ in range(300):  # at most about 30 s
            try:
                answered = httpx.get(f"{server.url}/healthz", headers=TEAM_A, timeout=2)
                if answered.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        assert answered is not None and answered.status_code == 200
        for connection in loris:  # each one was cut off by the server, none is still waiting
            connection.settimeout(15)
            try:
                assert connection.recv(1024) == b""
            except ConnectionResetError:
                pass
        with httpx.Client(base_url=server.url, headers=TEAM_A) as client:  # kept-alive requests still work
            assert [client.get("/healthz").status_code for _ in range(3)] == [200, 200, 200]
    finally:
        stop.set()
        for connection in loris:
            connection.close()
        server.stop()
