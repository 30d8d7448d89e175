"""Real jobs on a tiny real model on the embedded default (SQLite, no broker):
`lmq generate` gives what `CausalLM.generate` gives, and `lmq fit` produces a
preset that the next job uses by name."""

import json

import numpy as np
import pytest
from service_support import PROMPTS, lease_runs_out, read_results, reference, write_prompts

from lmq.api.cli import main
from lmq.core.config import load_settings
from lmq.core.domain.jobs import create_fit_job, job_summary
from lmq.core.store import queries, session_scope, sessions
from lmq.workers.runner import JobRunner, pool_from_settings


def test_lmq_generate_equals_causal_lm_generate(lmq_home, tmp_path, tiny_llama_preset):
    source = write_prompts(tmp_path / "in.jsonl", PROMPTS)
    output = tmp_path / "out.jsonl"
    code = main(
        ["generate", "--preset", str(tiny_llama_preset), source, "-o", str(output),
         "--max-length", "40", "--micro-batch-size", "2"]
    )
    assert code == 0
    results = read_results(output)
    assert [r["index"] for r in results] == list(range(len(PROMPTS)))
    assert [r["custom_id"] for r in results] == [f"q{i}" for i in range(len(PROMPTS))]
    expected = reference(tiny_llama_preset, PROMPTS, max_length=40)
    assert [{k: r[k] for k in expected[0]} for r in results] == expected
    assert all(r["error"] is None for r in results)


def test_strip_prompt_max_new_tokens_and_stdin(lmq_home, tmp_path, tiny_llama_preset, monkeypatch, capsys):
    import io

    lines = "".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS[:3])
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(lines.encode())))  # bytes underneath, as a real stdin
    code = main(
        ["generate", "--preset", str(tiny_llama_preset), "-", "--max-new-tokens", "5", "--strip-prompt"]
    )
    assert code == 0
    results = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    expected = reference(tiny_llama_preset, PROMPTS[:3], max_new_tokens=5, strip_prompt=True)
    assert [r["output"] for r in results] == [e["output"] for e in expected]
    assert all(r["custom_id"] is None and r["completion_tokens"] <= 5 for r in results)


def test_a_prompt_longer_than_max_length_fails_alone(lmq_home, tmp_path, tiny_llama_preset):
    source = write_prompts(tmp_path / "in.jsonl", ["Short one", " ".join(["word"] * 60)])
    output = tmp_path / "out.jsonl"
    code = main(["generate", "--preset", str(tiny_llama_preset), source, "-o", str(output), "--max-length", "16"])
    assert code == 0
    short, long = read_results(output)
    assert short["error"] is None and short["output"]
    assert long["output"] is None and "max_length" in long["error"]


def test_a_second_job_on_a_pinned_model_loads_nothing(lmq_home, tiny_llama_preset):
    settings = load_settings()
    factory = sessions(settings)
    runner = JobRunner(settings, pool_from_settings(settings))
    jobs = []
    for prompt in PROMPTS[:2]:
        with session_scope(factory) as session:
            jobs.append(
                queries.create_generate_job(
                    session, preset=str(tiny_llama_preset), inputs=[{"prompt": prompt}], params={"max_length": 20}
                ).id
            )
        assert runner.run(jobs[-1]) == "succeeded"
    with session_scope(factory) as session:
        loads = [
            next(e.data for e in queries.job_events(session, job_id) if e.type == "model")
            for job_id in jobs
        ]
    assert loads[0]["pool_hit"] is False and loads[0]["load_seconds"] > 0
    assert loads[1]["pool_hit"] is True and loads[1]["load_seconds"] == 0.0
    assert (runner.pool.hits, runner.pool.misses) == (1, 1)
    # The memory budget counts the real weights: float32, four bytes a parameter.
    (key,) = runner.pool.keys()
    assert runner.pool.pinned_bytes == 4 * runner.pool.get(*key).model.count_params()


def test_fit_registers_a_preset_that_generate_uses_by_name(lmq_home, tmp_path, tiny_llama_preset, capsys):
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"text": p}) + "\n" for p in PROMPTS * 2))
    validation = tmp_path / "validation.jsonl"
    validation.write_text("".join(json.dumps({"text": p}) + "\n" for p in PROMPTS[:3]))
    code = main(
        ["fit", "--preset", str(tiny_llama_preset), str(train), "--output-preset", "tuned",
         "--validation", str(validation), "--epochs", "2", "--batch-size", "4", "--sequence-length", "24",
         "--learning-rate", "0.01"]
    )
    assert code == 0, capsys.readouterr().err
    settings = load_settings()
    with session_scope(sessions(settings)) as session:
        preset = queries.get_preset(session, "tuned")
        fit_job = queries.get_job(session, preset.job_id)
        steps = [e.data for e in queries.job_events(session, fit_job.id) if e.type == "step"]
        epochs = [e.data for e in queries.job_events(session, fit_job.id) if e.type == "epoch"]
    assert [e["epoch"] for e in epochs] == [1, 2]
    assert all(e["val_loss"] > 0 and e["checkpoint"] for e in epochs)
    assert preset.path == str(lmq_home / "presets" / "tuned")
    assert preset.architecture == "llama" and preset.parent == str(tiny_llama_preset)
    assert preset.details["training_examples"] == 12 and preset.details["steps"] == 6
    assert fit_job.state == "succeeded" and fit_job.output_preset == "tuned" and fit_job.progress == 1.0
    assert [s["step"] for s in steps] == [1, 2, 3, 4, 5, 6]
    assert all(s["loss"] > 0 and s["tokens_per_second"] > 0 for s in steps)
    assert steps[-1]["loss"] < steps[0]["loss"]

    source = write_prompts(tmp_path / "in.jsonl", PROMPTS[:2])
    output = tmp_path / "out.jsonl"
    assert main(["generate", "--preset", "tuned", source, "-o", str(output), "--max-length", "24"]) == 0
    results = read_results(output)
    expected = reference(preset.path, PROMPTS[:2], max_length=24)
    assert [r["output"] for r in results] == [e["output"] for e in expected]
    assert expected != reference(tiny_llama_preset, PROMPTS[:2], max_length=24)
    # Handed the store's resolver, the library finds store names too: from_preset("tuned") is the fine-tuned model.
    from lmq.core.models import CausalLM
    from lmq.core.store.presets import store_resolver

    with session_scope(sessions(settings)) as session:
        tuned = CausalLM.from_preset("tuned", resolver=store_resolver(session))
    tuned.compile(sampler="greedy")
    assert tuned.generate(PROMPTS[:2], max_length=24) == [e["output"] for e in expected]


def test_lora_fit_registers_a_merged_preset(lmq_home, tmp_path, tiny_llama_preset, capsys):
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"text": p}) + "\n" for p in PROMPTS * 2))
    code = main(
        ["fit", "--preset", str(tiny_llama_preset), str(train), "--output-preset", "adapted", "--lora-rank", "4",
         "--epochs", "2", "--batch-size", "4", "--sequence-length", "24", "--learning-rate", "0.01"]
    )
    assert code == 0, capsys.readouterr().err
    with session_scope(sessions(load_settings())) as session:
        path = queries.get_preset(session, "adapted").path
    from lmq.core.models import CausalLM

    tuned, base = CausalLM.from_preset(path), CausalLM.from_preset(str(tiny_llama_preset))
    ids = np.array([[1, 30, 31, 32]])
    layer = lambda lm: lm.backbone.transformer_layers[0]  # noqa: E731
    # Only the query and value projections changed (LoRA), and the preset is a plain model.
    assert not np.allclose(layer(tuned).attention.query_kernel.numpy(), layer(base).attention.query_kernel.numpy())
    assert np.array_equal(layer(tuned).attention.key_kernel.numpy(), layer(base).attention.key_kernel.numpy())
    assert np.array_equal(layer(tuned).feedforward.gate_kernel.numpy(), layer(base).feedforward.gate_kernel.numpy())
    assert not layer(tuned).attention.lora
    assert not np.allclose(tuned.score(ids).numpy(), base.score(ids).numpy())


class WorkerDied(BaseException):
    """Stands in for SIGKILL: nothing in the runner gets to handle it."""


def fit_job(factory, preset, output, epochs=2):
    with session_scope(factory) as session:
        return create_fit_job(
            session,
            preset=str(preset),
            training_data=[{"text": p} for p in PROMPTS],
            validation_data=None,
            hyperparameters={"epochs": epochs, "batch_size": 3, "sequence_length": 24},
            output_preset=output,
        ).id


def test_a_redelivered_fit_job_resumes_from_its_last_checkpoint(lmq_home, tiny_llama_preset):
    settings = load_settings()
    factory = sessions(settings)
    job_id = fit_job(factory, tiny_llama_preset, "resumed")
    with session_scope(factory) as session:  # steps while queued too: 6 examples in batches of 3, 2 epochs
        assert job_summary(queries.get_job(session, job_id))["counts"] == {"total": 4, "completed": 0, "failed": 0}

    def die_late_in_the_second_epoch(step, total, **details):
        if step == 4:  # step 3, past the checkpoint, is recorded and will be redone
            raise WorkerDied

    with pytest.raises(WorkerDied):
        JobRunner(settings, pool_from_settings(settings), on_progress=die_late_in_the_second_epoch).run(job_id)
    assert sorted(path.name for path in (lmq_home / "checkpoints" / job_id).iterdir()) == ["epoch-1.weights.h5", "latest.json"]

    lease_runs_out(factory, job_id)
    assert JobRunner(settings, pool_from_settings(settings)).run(job_id) == "succeeded"
    with session_scope(factory) as session:
        events = queries.job_events(session, job_id)
        assert queries.get_preset(session, "resumed").job_id == job_id
        summary = job_summary(queries.get_job(session, job_id))
    assert [e.data["epochs_done"] for e in events if e.type == "resumed"] == [1]
    # Each step and epoch recorded once, though step 3 ran twice.
    assert [e.data["step"] for e in events if e.type == "step"] == [1, 2, 3, 4]
    assert [e.data["epoch"] for e in events if e.type == "epoch"] == [1, 2]
    # A fit job counts training steps (two epochs of two batches).
    assert summary["counts"] == {"total": 4, "completed": 4, "failed": 0} and summary["progress"] == 1.0
    assert not (lmq_home / "checkpoints" / job_id).exists()


def test_a_fit_job_that_died_after_moving_its_preset_into_the_store_registers_it_once(
    lmq_home, tiny_llama_preset, monkeypatch
):
    from lmq.workers import fit

    settings = load_settings()
    factory = sessions(settings)
    job_id = fit_job(factory, tiny_llama_preset, "moved", epochs=1)
    register = fit._register

    def die_before_registering(*args):
        raise WorkerDied

    monkeypatch.setattr(fit, "_register", die_before_registering)
    with pytest.raises(WorkerDied):
        JobRunner(settings, pool_from_settings(settings)).run(job_id)
    assert (settings.preset_store / "moved").is_dir()

    monkeypatch.setattr(fit, "_register", register)
    lease_runs_out(factory, job_id)
    assert JobRunner(settings, pool_from_settings(settings)).run(job_id) == "succeeded"
    with session_scope(factory) as session:
        assert queries.get_preset(session, "moved").path == str(settings.preset_store / "moved")
        events = queries.job_events(session, job_id)
    # The second attempt registered what the first had trained and saved, and trained nothing.
    assert len([e for e in events if e.type == "step"]) == 2
    assert sorted(path.name for path in settings.preset_store.iterdir()) == ["moved"]


def test_a_cancelled_fit_job_registers_nothing(lmq_home, tiny_llama_preset):
    settings = load_settings()
    factory = sessions(settings)
    job_id = fit_job(factory, tiny_llama_preset, "never")

    def cancel(step, total, **details):
        with session_scope(factory) as session:
            queries.request_cancel(session, job_id)

    assert JobRunner(settings, pool_from_settings(settings), on_progress=cancel).run(job_id) == "cancelled"
    with session_scope(factory) as session:
        assert queries.get_preset(session, "never") is None
        assert len([e for e in queries.job_events(session, job_id) if e.type == "step"]) == 1
    assert not (settings.preset_store / "never").exists()


def test_jobs_on_two_stored_adapters_share_one_pinned_base(lmq_home, tmp_path, tiny_llama_preset, capsys):
    """Two LoRA adapters of a stored base, saved as adapter presets and imported under store names:
    `lmq generate` on one gives what the library gives it, and jobs on both run on one base that the
    worker's pool pins once beside the two adapters."""
    import torch

    from lmq.core.adapters import save_adapter_preset
    from lmq.core.models import CausalLM
    from lmq.core.store.presets import store_resolver

    assert main(["presets", "import", str(tiny_llama_preset), "--name", "base-llama"]) == 0
    for seed, name in enumerate(("tuned-a", "tuned-b")):
        lm = CausalLM.from_preset(str(tiny_llama_preset))
        lm.backbone.enable_lora(2)
        generator = torch.Generator().manual_seed(seed)
        for block in lm.backbone.transformer_layers:
            for _, up in block.attention.lora.values():
                up.assign(torch.randn(tuple(up.shape), generator=generator) * 4)
        save_adapter_preset(lm, tmp_path / name, "base-llama")  # its base by store name
        assert main(["presets", "import", str(tmp_path / name), "--name", name]) == 0
    capsys.readouterr()

    source = write_prompts(tmp_path / "in.jsonl", PROMPTS[:3])
    output = tmp_path / "out.jsonl"
    assert main(["generate", "--preset", "tuned-a", source, "-o", str(output), "--max-length", "40"]) == 0
    settings = load_settings()
    with session_scope(sessions(settings)) as session:
        resolver = store_resolver(session)
        expected = {}
        for name in ("base-llama", "tuned-a", "tuned-b"):
            lm = CausalLM.from_preset(name, resolver=resolver)
            lm.compile(sampler="greedy")
            expected[name] = lm.generate(PROMPTS[:3], max_length=40)
        base_location = resolver.locate("base-llama")
        adapter_locations = [resolver.locate(name) for name in ("tuned-a", "tuned-b")]
    assert [r["output"] for r in read_results(output)] == expected["tuned-a"]
    assert len({json.dumps(outputs) for outputs in expected.values()}) == 3  # each adapter changes the text

    runner = JobRunner(settings, pool_from_settings(settings))
    for name in ("tuned-a", "tuned-b"):
        with session_scope(factory := sessions(settings)) as session:
            job_id = queries.create_generate_job(
                session, preset=name, inputs=[{"prompt": p} for p in PROMPTS[:3]], params={"max_length": 40}
            ).id
        assert runner.run(job_id) == "succeeded"
        with session_scope(factory) as session:
            assert [item.output for item in queries.job_items(session, job_id)] == expected[name]
    assert runner.pool.keys() == [(adapter_locations[0], None), (base_location, None), (adapter_locations[1], None)]
    assert (runner.pool.hits, runner.pool.misses) == (1, 3)  # the base: loaded once, then a hit
