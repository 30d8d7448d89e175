"""The HTTP API against a real `lmq serve` on loopback, with PostgreSQL and Redis
(no worker: these jobs only need to be accepted, listed, read and cancelled).

Tenants, 401, 404, every 4xx of a bad submission, idempotency, pagination."""

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from api_support import TEAM_A, TEAM_B, TOKENS, ApiServer, free_port, generate_body
from conftest import _service_urls

from lmq.api.cli import main
from lmq.core.config import load_settings
from lmq.core.store import queries, session_scope, sessions

BUILTIN = "llama2_7b_en"  # a built-in name: accepted without loading anything


@pytest.fixture(scope="module")
def server(tmp_path_factory, postgres_url):
    import redis

    _, broker = _service_urls()
    redis.Redis.from_url(broker).flushdb()
    root = tmp_path_factory.mktemp("api")
    home = root / "home"
    (home / "presets" / "a-directory-preset").mkdir(parents=True)
    env = {
        "LMQ_HOME": str(home),
        "LMQ_DATABASE_URL": postgres_url,
        "LMQ_BROKER_URL": broker,
        "LMQ_API_TOKENS": TOKENS,
        "LMQ_MAX_INPUTS": "5",
        "LMQ_MAX_PROMPT_CHARS": "50",
        "LMQ_MAX_EPOCHS": "3",
    }
    started = ApiServer(env, root / "server.log")
    started.home = home
    yield started
    started.stop()


@pytest.fixture
def team_a(server):
    with server.client(TEAM_A) as client:
        yield client


@pytest.fixture
def team_b(server):
    with server.client(TEAM_B) as client:
        yield client


def submit(client, body=None, **headers):
    response = client.post("/v1/jobs", json=body or generate_body(BUILTIN, ["Hello"]), headers=headers)
    assert response.status_code == 202, response.text
    return response.json()


def test_health_and_readiness(server):
    assert httpx.get(f"{server.url}/healthz").json() == {"ok": True}
    ready = httpx.get(f"{server.url}/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["database"]["ok"] and ready.json()["broker"]["ok"]
    assert httpx.get(f"{server.url}/docs").status_code == 200


@pytest.mark.parametrize(
    "method, path",
    [("GET", "/v1/jobs"), ("POST", "/v1/jobs"), ("GET", "/v1/jobs/0123456789abcdef0123456789abcdef"),
     ("POST", "/v1/jobs/0123456789abcdef0123456789abcdef/cancel"), ("GET", "/v1/presets"),
     ("GET", "/v1/architectures")],
)
@pytest.mark.parametrize("authorization", [None, "Bearer wrong", "Basic dG9rLWE6", "Bearer", "tok-a"])
def test_a_missing_or_wrong_token_is_401(server, method, path, authorization):
    headers = {"Authorization": authorization} if authorization else {}
    response = httpx.request(method, f"{server.url}{path}", headers=headers, json=generate_body(BUILTIN, ["x"]))
    assert response.status_code == 401, response.text
    assert response.headers["WWW-Authenticate"] == "Bearer"


def test_a_tenant_sees_only_its_own_jobs(team_a, team_b):
    job = submit(team_a)
    assert job["status"] == "queued" and job["tenant"] == "team-a"
    assert job["counts"] == {"total": 1, "completed": 0, "failed": 0}
    assert team_a.get(f"/v1/jobs/{job['id']}").json()["id"] == job["id"]
    for method, suffix in [("GET", ""), ("GET", "/results"), ("GET", "/events"), ("POST", "/cancel")]:
        response = team_b.request(method, f"/v1/jobs/{job['id']}{suffix}")
        assert response.status_code == 404, (suffix, response.text)
    assert job["id"] not in [j["id"] for j in team_b.get("/v1/jobs", params={"limit": 500}).json()["jobs"]]
    assert job["id"] in [j["id"] for j in team_a.get("/v1/jobs", params={"limit": 500}).json()["jobs"]]
    # team-b's cancel did nothing.
    assert team_a.get(f"/v1/jobs/{job['id']}").json()["status"] == "queued"
    # Nor can another tenant's job serve as a cursor.
    assert team_b.get("/v1/jobs", params={"cursor": job["id"]}).status_code == 422


@pytest.mark.parametrize("job_id", ["0123456789abcdef0123456789abcdef", "nope", "%00", "x" * 300])
def test_an_unknown_job_is_404(team_a, job_id):
    for suffix in ("", "/results", "/events"):
        assert team_a.get(f"/v1/jobs/{job_id}{suffix}").status_code == 404
    assert team_a.post(f"/v1/jobs/{job_id}/cancel").status_code == 404


def fit_body(**changes):
    body = {"kind": "fit", "preset": BUILTIN, "training_data": [{"text": "some text"}], "output_preset": "tuned-x"}
    return {**body, **changes}


def test_a_queued_fit_job_counts_its_training_steps(team_a):
    """Steps from submission on, as the fit runner counts them: no worker runs these."""
    texts = [{"text": f"example {i}"} for i in range(5)]
    hyperparameters = {"batch_size": 2, "epochs": 3}
    job = submit(team_a, fit_body(training_data=texts, output_preset="steps-x", hyperparameters=hyperparameters))
    assert job["status"] == "queued"
    assert job["counts"] == {"total": 9, "completed": 0, "failed": 0}  # 3 batches (2, 2, 1) x 3 epochs
    assert team_a.get(f"/v1/jobs/{job['id']}").json()["counts"]["total"] == 9
    by_default = submit(team_a, fit_body(training_data=texts, output_preset="steps-y"))
    assert by_default["counts"]["total"] == 1  # one batch of up to 8, one epoch


@pytest.mark.parametrize(
    "body, field",
    [
        ({"kind": "generate", "preset": BUILTIN}, "inputs"),
        ({**generate_body(BUILTIN, ["x"]), "kind": "classify"}, "kind"),
        (generate_body(BUILTIN, []), "inputs"),
        (generate_body(BUILTIN, ["x"] * 6), "inputs"),  # LMQ_MAX_INPUTS=5
        (generate_body(BUILTIN, [""]), "inputs[0].prompt"),
        (generate_body(BUILTIN, ["x" * 51]), "inputs[0].prompt"),  # LMQ_MAX_PROMPT_CHARS=50
        ({**generate_body(BUILTIN, ["x"]), "inputs": [{"prompt": "x", "encoder_text": "y"}]}, "inputs[0]"),
        ({**generate_body(BUILTIN, ["x"]), "inputs": [{"custom_id": "a\x00b", "prompt": "x"}]}, "inputs[0].custom_id"),
        ({**generate_body(BUILTIN, ["x"]), "inputs": [{"prompt": "x", "answer": 1}]}, "inputs[0].answer"),
        (generate_body(BUILTIN, ["x"], max_length=0), "params.max_length"),
        (generate_body(BUILTIN, ["x"], max_length=10**6), "params.max_length"),
        (generate_body(BUILTIN, ["x"], max_new_tokens=-1), "params.max_new_tokens"),
        (generate_body(BUILTIN, ["x"], sampler="nucleus"), "params.sampler"),
        (generate_body(BUILTIN, ["x"], sampler={"name": "top_p", "p": 1.5}), "params.sampler.p"),
        (generate_body(BUILTIN, ["x"], sampler={"name": "greedy", "k": 3}), "params.sampler"),
        (generate_body(BUILTIN, ["x"], stop_token_ids=[-1]), "params.stop_token_ids"),
        (generate_body(BUILTIN, ["x"], max_tokens=5), "params.max_tokens"),
        (fit_body(hyperparameters={"epochs": 4}), "hyperparameters.epochs"),  # LMQ_MAX_EPOCHS=3
        (fit_body(hyperparameters={"batch_size": 0}), "hyperparameters.batch_size"),
        (fit_body(hyperparameters={"learning_rate": -1}), "hyperparameters.learning_rate"),
        (fit_body(training_data=[]), "training_data"),
        (fit_body(training_data=[{"encoder_text": "only half"}]), "training_data[0]"),
        (fit_body(output_preset="../escape"), "output_preset"),
        (fit_body(output_preset=None), "output_preset"),
    ],
)
def test_a_bad_body_is_422_naming_the_field(team_a, body, field):
    response = team_a.post("/v1/jobs", json=body)
    assert response.status_code == 422, response.text
    assert f"{field}:" in response.json()["message"], response.json()["message"]


@pytest.mark.parametrize(
    "body, field",
    [
        ({**generate_body(BUILTIN, ["x"]), "inputs": [{"encoder_text": "y"}]}, "inputs[0]"),
        (fit_body(training_data=[{"encoder_text": "q", "decoder_text": "a"}]), "training_data[0]"),
        (fit_body(validation_data=[{"encoder_text": "q", "decoder_text": "a"}]), "validation_data[0]"),
    ],
)
def test_sequence_to_sequence_inputs_for_a_causal_preset_are_refused(team_a, body, field):
    """The preset's task is known from its name, before any model loads: refused here, not failed in the worker."""
    response = team_a.post("/v1/jobs", json=body)
    assert response.status_code == 422, response.text
    message = response.json()["message"]
    assert f"{field}.encoder_text: preset {BUILTIN!r} is a causal LM" in message, message


@pytest.mark.parametrize("body", ["not json", "[]", '{"kind": 1}', '{"kind": "generate", "preset": NaN}'])
def test_a_malformed_body_is_422(team_a, body):
    response = team_a.post("/v1/jobs", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 422, response.text


def test_a_not_a_number_hyperparameter_is_422(team_a):
    text = '{"kind": "fit", "preset": "%s", "training_data": [{"text": "x"}], "output_preset": "n",' \
           ' "hyperparameters": {"learning_rate": NaN}}' % BUILTIN
    response = team_a.post("/v1/jobs", content=text, headers={"Content-Type": "application/json"})
    assert response.status_code == 422
    assert "hyperparameters.learning_rate:" in response.json()["message"]


@pytest.mark.parametrize("preset", ["no-such-preset", "llama9_1t_en", "/etc", "/no/such/dir", "~", "presets/../.."])
def test_an_unknown_preset_or_a_path_outside_the_preset_roots_is_422(team_a, preset):
    for body in (generate_body(preset, ["x"]), fit_body(preset=preset)):
        response = team_a.post("/v1/jobs", json=body)
        assert response.status_code == 422, response.text
        message = response.json()["message"]
        # The same words whether or not the directory exists: the server's files stay private.
        assert message.startswith(f"preset: preset {preset!r} is not in the preset store"), message


def test_a_misspelt_preset_gets_the_closest_names(team_a):
    response = team_a.post("/v1/jobs", json=generate_body("llama2_7b_em", ["x"]))
    assert response.status_code == 422
    assert "(did you mean 'llama2_7b_en'" in response.json()["message"], response.json()["message"]
    shown = team_a.get("/v1/presets/llama2_7b_em")
    assert shown.status_code == 404 and "(did you mean 'llama2_7b_en'" in shown.json()["detail"]
    assert "did you mean" not in team_a.get("/v1/presets/zzzzzz").json()["detail"]


def test_accepted_presets_built_in_remote_and_under_the_roots(server, team_a):
    local = str(server.home / "presets" / "a-directory-preset")
    for preset in (BUILTIN, "hf://org/model", "kaggle://keras/llama2/keras/llama2_7b_en", local):
        assert submit(team_a, generate_body(preset, ["x"]))["preset"] == preset
    # A directory is recorded as its absolute path, the one the workers will load.
    roundabout = str(server.home / "presets" / "." / "a-directory-preset" / ".." / "a-directory-preset")
    assert submit(team_a, generate_body(roundabout, ["x"]))["preset"] == str(Path(local).resolve())


def test_store_presets_are_listed_usable_by_name_and_not_overwritten(server, team_a, postgres_url):
    settings = load_settings({"LMQ_HOME": str(server.home), "LMQ_DATABASE_URL": postgres_url})
    with session_scope(sessions(settings)) as session:
        queries.register_preset(
            session, name="registered", path=str(server.home / "presets" / "a-directory-preset"),
            architecture="llama", source=BUILTIN, details={"final_loss": 1.5}, tenant="team-a",
        )
    listed = team_a.get("/v1/presets").json()["presets"]
    assert "registered" in [p["name"] for p in listed]
    shown = team_a.get("/v1/presets/registered").json()
    assert (shown["architecture"], shown["source"], shown["details"]) == ("llama", BUILTIN, {"final_loss": 1.5})
    assert submit(team_a, generate_body("registered", ["x"]))["preset"] == "registered"
    taken = team_a.post("/v1/jobs", json=fit_body(output_preset="registered"))
    assert taken.status_code == 409 and "output_preset" in taken.json()["detail"]


def test_builtin_presets_and_architectures_come_from_the_plugin_records(team_a):
    architectures = {a["name"]: a for a in team_a.get("/v1/architectures").json()["architectures"]}
    assert architectures["llama"]["task_kind"] == "causal_lm"
    assert BUILTIN in [p["name"] for p in architectures["llama"]["presets"]]
    builtin = team_a.get(f"/v1/presets/{BUILTIN}").json()
    assert builtin["builtin"] is True and builtin["architecture"] == "llama" and builtin["handle"]
    for name in ("no-such-preset", "a b", "x" * 300):
        assert team_a.get(f"/v1/presets/{name}").status_code == 404


def test_an_idempotency_key_makes_a_resubmission_the_same_job(team_a, team_b):
    first = submit(team_a, generate_body(BUILTIN, ["once"]), **{"Idempotency-Key": "batch-7"})
    again = team_a.post("/v1/jobs", json=generate_body(BUILTIN, ["once"]), headers={"Idempotency-Key": "batch-7"})
    assert again.status_code == 202 and again.json()["id"] == first["id"]
    assert again.headers["Idempotent-Replayed"] == "true"
    # Keys belong to a tenant: the same key elsewhere is a new job.
    assert submit(team_b, generate_body(BUILTIN, ["once"]), **{"Idempotency-Key": "batch-7"})["id"] != first["id"]
    assert submit(team_a, generate_body(BUILTIN, ["once"]))["id"] != first["id"]
    too_long = team_a.post("/v1/jobs", json=generate_body(BUILTIN, ["x"]), headers={"Idempotency-Key": "k" * 129})
    assert too_long.status_code == 422


def test_the_same_key_sent_at_once_makes_one_job(server):
    def send(_):
        with server.client({**TEAM_A, "Idempotency-Key": "raced"}) as client:
            response = client.post("/v1/jobs", json=generate_body(BUILTIN, ["at once"]))
        assert response.status_code == 202, response.text
        return response.json()["id"]

    with ThreadPoolExecutor(8) as pool:
        assert len(set(pool.map(send, range(8)))) == 1


def test_listing_filters_by_status_and_kind_and_pages_with_a_cursor(team_b):
    fit = submit(team_b, fit_body(output_preset="listed-fit"))
    generated = [submit(team_b)["id"] for _ in range(3)]
    cancelled = team_b.post(f"/v1/jobs/{generated[0]}/cancel").json()
    assert cancelled["status"] == "cancelled" and cancelled["finished_at"]

    everything = team_b.get("/v1/jobs", params={"limit": 500}).json()
    assert everything["next_cursor"] is None
    paged, cursor = [], None
    while True:
        page = team_b.get("/v1/jobs", params={"limit": 2, **({"cursor": cursor} if cursor else {})}).json()
        assert len(page["jobs"]) <= 2
        paged += page["jobs"]
        if (cursor := page["next_cursor"]) is None:
            break
    assert [j["id"] for j in paged] == [j["id"] for j in everything["jobs"]]
    assert [j["id"] for j in paged][:3] == generated[::-1]

    fits = team_b.get("/v1/jobs", params={"kind": "fit"}).json()["jobs"]
    assert fit["id"] in [j["id"] for j in fits] and {j["kind"] for j in fits} == {"fit"}
    done = team_b.get("/v1/jobs", params={"status": "cancelled"}).json()["jobs"]
    assert [j["id"] for j in done] == [generated[0]]
    for bad in ({"status": "done"}, {"kind": "train"}, {"limit": 0}, {"limit": 501}):
        response = team_b.get("/v1/jobs", params=bad)
        assert response.status_code == 422 and next(iter(bad)) in response.json()["message"]


def test_events_and_results_of_a_queued_job(team_a):
    job = submit(team_a, generate_body(BUILTIN, ["a", "b"]))
    events = team_a.get(f"/v1/jobs/{job['id']}/events").json()["events"]
    assert [(e["type"], e["state"]) for e in events] == [("state", "queued")]
    assert team_a.get(f"/v1/jobs/{job['id']}/events", params={"after": events[-1]["id"]}).json()["events"] == []
    results = team_a.get(f"/v1/jobs/{job['id']}/results")
    assert results.headers["content-type"] == "application/x-ndjson"
    lines = [json.loads(line) for line in results.text.splitlines()]
    assert [(l["index"], l["custom_id"], l["output"]) for l in lines] == [(0, "q0", None), (1, "q1", None)]
    fit = submit(team_a, fit_body(output_preset="no-results"))
    assert team_a.get(f"/v1/jobs/{fit['id']}/results").status_code == 409


def test_without_a_broker_to_reach_a_job_fails_and_the_server_says_503(tmp_path, postgres_url):
    server = ApiServer(
        {"LMQ_HOME": str(tmp_path), "LMQ_DATABASE_URL": postgres_url, "LMQ_API_TOKENS": TOKENS,
         "LMQ_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0"},
        tmp_path / "server.log",
    )
    try:
        with server.client(TEAM_A) as client:
            ready = client.get("/readyz")
            assert ready.status_code == 503 and not ready.json()["ready"]
            assert ready.json()["database"]["ok"] and not ready.json()["broker"]["ok"]
            refused = client.post("/v1/jobs", json=generate_body(BUILTIN, ["x"]))
            assert refused.status_code == 503 and "broker" in refused.json()["detail"]
            (job,) = client.get("/v1/jobs", params={"limit": 1}).json()["jobs"]
            assert job["status"] == "failed" and "could not enqueue" in job["error"]
    finally:
        server.stop()


def test_the_cli_talks_to_the_api(server, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LMQ_SERVER", server.url)
    monkeypatch.setenv("LMQ_TOKEN", "tok-a")
    prompts = tmp_path / "in.jsonl"
    prompts.write_text('{"custom_id": 7, "prompt": "Hi"}\n{"prompt": "There"}\n')

    def run(*argv):
        code = main(list(argv))
        return code, capsys.readouterr()

    submit_argv = ["submit", "generate", "--preset", BUILTIN, str(prompts), "--idempotency-key", "cli-1"]
    code, out = run(*submit_argv)
    job = json.loads(out.out)
    assert code == 0 and job["status"] == "queued" and job["tenant"] == "team-a"
    assert json.loads(run(*submit_argv)[1].out)["id"] == job["id"]
    assert json.loads(run("jobs", "show", job["id"])[1].out)["counts"]["total"] == 2
    assert [json.loads(line)["state"] for line in run("jobs", "events", job["id"])[1].out.splitlines()] == ["queued"]
    output = tmp_path / "out.jsonl"
    assert run("jobs", "results", job["id"], "-o", str(output))[0] == 0
    assert [json.loads(line)["custom_id"] for line in output.read_text().splitlines()] == ["7", None]
    assert json.loads(run("jobs", "cancel", job["id"])[1].out)["status"] == "cancelled"
    listed = run("jobs", "list", "--status", "cancelled", "--limit", "1")[1].out.splitlines()
    assert [json.loads(line)["id"] for line in listed] == [job["id"]]

    # The server's refusal, naming the field, is the CLI's bad input: exit 2, one line.
    with pytest.raises(SystemExit) as refused:
        main(["submit", "generate", "--preset", "no-such-preset", str(prompts)])
    assert refused.value.code == 2
    assert "preset: preset 'no-such-preset' is not in the preset store" in capsys.readouterr().err
    # The limits are the server's (LMQ_MAX_INPUTS=5 there), not this environment's.
    monkeypatch.setenv("LMQ_MAX_INPUTS", "1")
    assert run("submit", "generate", "--preset", BUILTIN, str(prompts))[0] == 0
    prompts.write_text('{"prompt": "Hi"}\n' * 6)
    with pytest.raises(SystemExit) as refused:
        main(["submit", "generate", "--preset", BUILTIN, str(prompts)])
    assert refused.value.code == 2 and "inputs: List should have at most 5 items" in capsys.readouterr().err
    # What the model refuses whatever the limits is refused here, before any request.
    with pytest.raises(SystemExit) as refused:
        main(["submit", "generate", "--preset", BUILTIN, str(prompts), "--sampler", '{"name": "greedy", "k": 2}'])
    assert refused.value.code == 2 and capsys.readouterr().err == "lmq: error: --sampler: sampler 'greedy' takes no k\n"
    with pytest.raises(SystemExit):
        main(["jobs", "show", job["id"], "--token", "wrong"])
    assert "invalid bearer token" in capsys.readouterr().err
    code, out = run("jobs", "show", job["id"], "--server", f"http://127.0.0.1:{free_port()}")
    assert code == 1 and "cannot reach" in out.err
