"""lmq's object store against a real S3-compatible server (SeaweedFS, tests/storage_support.py): objects
written whole, a large weights file uploaded in parts, presets visible only whole and cached once per
host, checkpoints and presets of a fit job kept in the store, a server restarted mid-write, wrong
credentials and an unreachable store refused with a clear error and nothing half-written."""

import hashlib
import json
import threading
import time

import pytest
from service_support import PROMPTS, lease_runs_out, reference
from storage_support import ACCESS_KEY, object_keys, s3_env, s3_server  # noqa: F401  fixtures

from lmq.core.config import load_settings
from lmq.core.domain.jobs import create_fit_job
from lmq.core.storage import PresetCorrupt, PresetStore, StorageRefused, StorageUnavailable, preset_store, storage
from lmq.core.storage.objects import Storage
from lmq.core.store import queries, session_scope, sessions
from lmq.workers.runner import JobRunner, pool_from_settings


def digests(directory):
    return {
        path.relative_to(directory).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in directory.rglob("*")
        if path.is_file()
    }


def test_objects_are_written_whole_listed_read_back_and_deleted(s3_server, s3_env, lmq_home):
    store = storage(load_settings())
    store.write_bytes("files/a", b"first")
    store.write_bytes("files/b", b"second")
    assert store.list("files") == ["files/a", "files/b"]
    assert store.read_bytes("files/b") == b"second" and b"".join(store.iter_bytes("files/a")) == b"first"
    # Through the server's own S3 API, under the prefix of LMQ_STORAGE_URL; nothing under the home.
    assert object_keys(s3_server, s3_env["bucket"]) == ["lmq/files/a", "lmq/files/b"]
    assert not (lmq_home / "files").exists()
    store.delete("files/a")
    assert store.list("files") == ["files/b"] and not store.exists("files/a")
    with pytest.raises(FileNotFoundError):
        store.read_bytes("files/a")


def test_a_large_weights_file_is_uploaded_in_parts_and_comes_back_the_same(s3_server, s3_env, lmq_home, tmp_path):
    weights = tmp_path / "model.weights.h5"
    weights.write_bytes(bytes(range(256)) * (40 * 2**20 // 256) + b"tail")  # 40 MiB: three 16 MiB parts
    expected = hashlib.sha256(weights.read_bytes()).hexdigest()
    store = storage(load_settings())
    store.put_file(weights, "checkpoints/job/epoch-1.weights.h5")
    assert not weights.exists()  # moved to the store, not copied
    head = s3_server.client().head_object(Bucket=s3_env["bucket"], Key="lmq/checkpoints/job/epoch-1.weights.h5")
    assert head["ETag"].strip('"').endswith("-3"), head["ETag"]  # S3's mark of a three-part upload
    assert head["ContentLength"] == 40 * 2**20 + 4
    with store.local_copy("checkpoints/job/epoch-1.weights.h5") as copy:
        assert hashlib.sha256(copy.read_bytes()).hexdigest() == expected


def test_wrong_credentials_are_refused_at_once_and_leave_nothing(s3_server, s3_env, lmq_home, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    store = storage(load_settings())
    upload = tmp_path / "upload.jsonl"
    upload.write_text('{"prompt": "The"}\n')
    started = time.monotonic()
    with pytest.raises(StorageRefused, match=rf"object store {s3_env['LMQ_STORAGE_URL']} refused to upload files/x.*AWS_SECRET_ACCESS_KEY"):
        store.put_file(upload, "files/x")
    with pytest.raises(StorageRefused, match="refused to write"):
        store.write_bytes("files/y", b"y")
    assert time.monotonic() - started < 10  # not retried: waiting does not mend a wrong key
    assert not upload.exists()  # the local copy is not left behind either
    assert object_keys(s3_server, s3_env["bucket"]) == []
    assert storage(load_settings()).check()["ok"] is False


def test_a_store_restarted_mid_write_is_waited_for(s3_server, s3_env, lmq_home):
    store = storage(load_settings())  # the default LMQ_STORAGE_RETRY_S
    store.write_bytes("files/before", b"kept")
    s3_server.stop()
    written = {}

    def write():
        try:
            store.write_bytes("checkpoints/job/latest.json", b'{"epochs_done": 1}')
            written["ok"] = True
        except Exception as error:  # noqa: BLE001  reported below
            written["error"] = error

    writer = threading.Thread(target=write)
    writer.start()
    time.sleep(2)
    assert writer.is_alive() and not written  # still trying
    s3_server.start()
    writer.join(60)
    assert written == {"ok": True}
    assert store.read_bytes("checkpoints/job/latest.json") == b'{"epochs_done": 1}'
    assert store.read_bytes("files/before") == b"kept"
    print(f"\n[storage] SeaweedFS restarted in {s3_server.started_seconds:.1f}s; the write waited for it")


def test_a_store_that_stays_away_fails_after_its_retries_naming_itself(lmq_home, tmp_path, monkeypatch):
    from api_support import free_port

    monkeypatch.setenv("LMQ_STORAGE_URL", "s3://nowhere/prefix")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    monkeypatch.setenv("LMQ_STORAGE_RETRY_S", "3")  # the setting under test
    store = storage(load_settings())
    started = time.monotonic()
    with pytest.raises(StorageUnavailable, match=r"object store s3://nowhere/prefix did not answer \(read files/a\) in \d+ tries over 3 s \(LMQ_STORAGE_RETRY_S\)"):
        store.read_bytes("files/a")
    assert 3 <= time.monotonic() - started < 15
    assert store.check()["ok"] is False


# ---------------------------------------------------------------- presets


def staged_copy(store: PresetStore, preset, name, made_by):
    import shutil

    staged = store.staging(name, made_by)
    shutil.copytree(preset, staged)
    return staged


def test_a_preset_is_visible_only_whole_and_each_host_downloads_it_once(s3_env, lmq_home, tmp_path, tiny_llama_preset, monkeypatch):
    presets = preset_store(load_settings())
    written = Storage.write_bytes

    def manifest_write_fails(self, key, data):
        if key.endswith(".json") and key.startswith("presets/"):
            raise StorageUnavailable("the store went away before the manifest")
        return written(self, key, data)

    monkeypatch.setattr(Storage, "write_bytes", manifest_write_fails)
    with pytest.raises(StorageUnavailable):
        presets.publish(staged_copy(presets, tiny_llama_preset, "tuned", "job-1"), "tuned", "job-1")
    # Every file was uploaded, but without its manifest the preset does not exist for anyone.
    assert len(presets.storage.list("blobs/sha256")) == len(digests(tiny_llama_preset))
    assert not presets.taken("tuned") and presets.published_by("tuned", "job-1") is None
    monkeypatch.setattr(Storage, "write_bytes", written)

    location = presets.publish(staged_copy(presets, tiny_llama_preset, "tuned", "job-1"), "tuned", "job-1")
    assert location == f"{s3_env['LMQ_STORAGE_URL']}/presets/tuned/job-1.json"
    assert presets.taken("tuned") and presets.published_by("tuned", "job-1") == location
    with pytest.raises(FileExistsError):
        presets.publish(staged_copy(presets, tiny_llama_preset, "tuned", "job-2"), "tuned", "job-2")
    assert not list(presets.storage.scratch.rglob("*.json"))  # staging directories are used up

    other_host = PresetStore(presets.storage, tmp_path / "host-b-cache", 2**30)
    fetched = other_host.fetch(location)
    assert fetched.parent == tmp_path / "host-b-cache"
    assert digests(fetched) == digests(tiny_llama_preset)
    monkeypatch.setattr(Storage, "get_file", lambda *args: pytest.fail("downloaded a second time"))
    assert other_host.fetch(location) == fetched


def test_a_preset_whose_file_was_altered_is_refused_and_not_cached(s3_server, s3_env, lmq_home, tmp_path, tiny_llama_preset):
    presets = preset_store(load_settings())
    location = presets.publish(staged_copy(presets, tiny_llama_preset, "tuned", "job-1"), "tuned", "job-1")
    manifest = json.loads(presets.storage.read_bytes("presets/tuned/job-1.json"))
    config = manifest["files"]["config.json"]["sha256"]
    s3_server.client().put_object(Bucket=s3_env["bucket"], Key=f"lmq/blobs/sha256/{config}", Body=b"{}")
    host = PresetStore(presets.storage, tmp_path / "cache", 2**30)
    with pytest.raises(PresetCorrupt, match="config.json does not match its SHA-256"):
        host.fetch(location)
    assert list((tmp_path / "cache").iterdir()) == []  # no half-read preset left to find


def test_the_cache_evicts_the_least_recently_used_preset_past_its_size(s3_env, lmq_home, tmp_path, tiny_llama_preset):
    presets = preset_store(load_settings())
    first = presets.publish(staged_copy(presets, tiny_llama_preset, "one", "job-1"), "one", "job-1")
    second = presets.publish(staged_copy(presets, tiny_llama_preset, "two", "job-2"), "two", "job-2")
    size = sum(path.stat().st_size for path in tiny_llama_preset.rglob("*") if path.is_file())
    host = PresetStore(presets.storage, tmp_path / "cache", int(size * 1.5))  # room for one
    kept = host.fetch(first)
    assert host.fetch(second).is_dir() and not kept.exists()
    assert [path.name for path in (tmp_path / "cache").iterdir()] == [host.fetch(second).name]


# ---------------------------------------------------------------- a fit job's bytes


class WorkerDied(BaseException):
    """Stands in for SIGKILL: nothing in the runner gets to handle it."""


def fit_job(factory, preset, output):
    """Two epochs of two steps."""
    with session_scope(factory) as session:
        return create_fit_job(
            session,
            preset=str(preset),
            training_data=[{"text": p} for p in PROMPTS],
            validation_data=None,
            hyperparameters={"epochs": 2, "batch_size": 3, "sequence_length": 24, "learning_rate": 0.01},
            output_preset=output,
        ).id


def test_a_fit_job_keeps_its_checkpoint_and_preset_in_the_object_store(s3_server, s3_env, lmq_home, tiny_llama_preset, capsys):
    from lmq.api.cli import main

    settings = load_settings()
    factory = sessions(settings)
    job_id = fit_job(factory, tiny_llama_preset, "tuned")

    def die_in_the_second_epoch(step, total, **details):
        if step == 4:
            raise WorkerDied

    with pytest.raises(WorkerDied):
        JobRunner(settings, pool_from_settings(settings), on_progress=die_in_the_second_epoch).run(job_id)
    keys = object_keys(s3_server, s3_env["bucket"])
    assert keys == [f"lmq/checkpoints/{job_id}/epoch-1.weights.h5", f"lmq/checkpoints/{job_id}/latest.json"]
    assert not (lmq_home / "checkpoints").exists()

    lease_runs_out(factory, job_id)
    assert JobRunner(settings, pool_from_settings(settings)).run(job_id) == "succeeded"
    with session_scope(factory) as session:
        preset = queries.get_preset(session, "tuned")
        resumed = [e.data for e in queries.job_events(session, job_id) if e.type == "resumed"]
    assert resumed == [{"epochs_done": 1, "step": 2}]
    assert preset.path == f"{s3_env['LMQ_STORAGE_URL']}/presets/tuned/{job_id}.json" and preset.architecture == "llama"
    keys = object_keys(s3_server, s3_env["bucket"])
    assert not [key for key in keys if "/checkpoints/" in key]  # removed once the preset is registered
    assert f"lmq/presets/tuned/{job_id}.json" in keys
    assert not (lmq_home / "presets").exists()

    # `generate` names it: the preset comes from this host's cache, and gives what the cached files give.
    source = lmq_home.parent / "in.jsonl"
    source.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS[:2]))
    output = lmq_home.parent / "out.jsonl"
    assert main(["generate", "--preset", "tuned", str(source), "-o", str(output), "--max-length", "24"]) == 0, capsys.readouterr().err
    (cached,) = (lmq_home / "cache" / "presets").iterdir()
    results = [json.loads(line)["output"] for line in output.read_text().splitlines()]
    assert results == [e["output"] for e in reference(cached, PROMPTS[:2], max_length=24)]
    assert results != [e["output"] for e in reference(tiny_llama_preset, PROMPTS[:2], max_length=24)]


def test_a_fit_job_waits_for_its_store_restarted_mid_job(s3_server, s3_env, lmq_home, tiny_llama_preset):
    settings = load_settings()  # the default LMQ_STORAGE_RETRY_S
    factory = sessions(settings)
    job_id = fit_job(factory, tiny_llama_preset, "tuned")
    restarted = threading.Thread(target=s3_server.start)

    def restart_the_store_before_the_first_checkpoint(step, total, **details):
        if step == 1:  # the checkpoint comes after step 2: it must wait for the store
            s3_server.stop()
            restarted.start()

    runner = JobRunner(settings, pool_from_settings(settings), on_progress=restart_the_store_before_the_first_checkpoint)
    assert runner.run(job_id) == "succeeded"
    restarted.join()
    with session_scope(factory) as session:
        assert queries.get_preset(session, "tuned").path.startswith(s3_env["LMQ_STORAGE_URL"])
        epochs = [e.data["epoch"] for e in queries.job_events(session, job_id) if e.type == "epoch"]
    assert epochs == [1, 2]
    assert f"lmq/presets/tuned/{job_id}.json" in object_keys(s3_server, s3_env["bucket"])
    print(f"\n[storage] SeaweedFS restarted mid-job in {s3_server.started_seconds:.1f}s; the job waited for it")


def test_a_fit_job_whose_store_stays_away_fails_saying_so(lmq_home, tiny_llama_preset, monkeypatch):
    from api_support import free_port

    monkeypatch.setenv("LMQ_STORAGE_URL", "s3://nowhere/prefix")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    monkeypatch.setenv("LMQ_STORAGE_RETRY_S", "2")
    settings = load_settings()
    job_id = fit_job(sessions(settings), tiny_llama_preset, "tuned")
    assert JobRunner(settings, pool_from_settings(settings)).run(job_id) == "failed"
    with session_scope(sessions(settings)) as session:
        error = queries.get_job(session, job_id).error
    assert error.startswith("StorageUnavailable: object store s3://nowhere/prefix did not answer"), error
    assert "LMQ_STORAGE_RETRY_S" in error


# ---------------------------------------------------------------- the Batch API's files, through `lmq serve`


def test_uploads_live_in_the_store_and_one_it_refuses_is_a_503_that_leaves_nothing(s3_server, s3_env, lmq_home, tmp_path):
    from api_support import ApiServer

    body = b'{"custom_id": "q0", "method": "POST", "url": "/v1/completions", "body": {"model": "m", "prompt": "The"}}\n'
    refused = ApiServer({"AWS_SECRET_ACCESS_KEY": "not-the-secret"}, tmp_path / "refused.log")
    try:
        client = refused.client()
        answer = client.post("/v1/files", files={"file": ("batch.jsonl", body)}, data={"purpose": "batch"})
        assert answer.status_code == 503, answer.text
        error = answer.json()["error"]
        assert error["code"] == "storage_unavailable" and "refused to upload" in error["message"], error
        assert "AWS_SECRET_ACCESS_KEY" in error["message"]
        assert client.get("/v1/files").json()["data"] == []  # no record of it
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["storage"]["ok"] is False
    finally:
        refused.stop()
    assert list((lmq_home / "files").iterdir()) == [] and object_keys(s3_server, s3_env["bucket"]) == []

    served = ApiServer({}, tmp_path / "served.log")
    try:
        client = served.client()
        assert client.get("/readyz").json()["storage"] == {"ok": True, "detail": f"object store {s3_env['LMQ_STORAGE_URL']} reachable"}
        file_id = client.post("/v1/files", files={"file": ("batch.jsonl", body)}, data={"purpose": "batch"}).json()["id"]
        assert object_keys(s3_server, s3_env["bucket"]) == [f"lmq/files/{file_id}"]
        assert list((lmq_home / "files").iterdir()) == []  # streamed through, not kept
        content = client.get(f"/v1/files/{file_id}/content")
        assert content.status_code == 200 and content.content == body
        assert "batch.jsonl" in content.headers["content-disposition"]
        assert client.delete(f"/v1/files/{file_id}").json()["deleted"] is True
        assert object_keys(s3_server, s3_env["bucket"]) == []
    finally:
        served.stop()
