"""The job runner on the embedded default, with a stand-in model so that batching,
splitting, cancellation and redelivery are checked exactly and fast.
(tests/test_jobs_end_to_end.py runs the same runner on a real model.)"""

import threading
import time
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from service_support import lease_runs_out

from lmq.api.schemas import result_line
from lmq.core.domain.jobs import job_summary
from lmq.core.config import load_settings
from lmq.core.store import leases, queries, session_scope, sessions
from lmq.workers.pool import ModelPool
from lmq.workers.runner import JobRunner


class WordPreprocessor:
    """Words as token ids: the runner tokenizes each prompt once (`generate_preprocess`) and hands
    `generate` the ids; the stand-in reads its words back."""

    def __init__(self):
        self.words = []
        self.tokenizer = SimpleNamespace(tokenize=lambda text: text.split())

    def generate_preprocess(self, text):
        ids = []
        for word in text.split():
            if word not in self.words:
                self.words.append(word)
            ids.append(self.words.index(word))
        return [ids]

    def text(self, ids):
        return " ".join(self.words[i] for i in ids)


class StandInLM:
    """Upper-cases prompts, as the decode engine schedules them: shortest first, at most
    `max_rows` in flight (recorded in `batches`), each result handed to `on_result` as it
    finishes. Runs out of memory above `fits` rows; rejects "TOO LONG". Has no `compile`: the
    runner gives each call its sampler (recorded in `sampler`) and leaves the model as it is."""

    def __init__(self, fits=1000):
        self.fits = fits
        self.batches = []
        self.preprocessor = WordPreprocessor()
        self.backbone = SimpleNamespace(device=torch.device("cpu"))

    def generate(
        self, prompts, sampler, return_details, on_result, between_steps, max_rows, max_cache_tokens, **arguments
    ):
        assert all(isinstance(prompt, list) for prompt in prompts)  # tokenized once, by the runner
        prompts = [self.preprocessor.text(prompt) for prompt in prompts]
        self.sampler, self.arguments = sampler, arguments
        if min(max_rows, len(prompts)) > self.fits:
            raise RuntimeError("CUDA out of memory. Tried to allocate 1 GiB")
        if any("TOO LONG" in prompt for prompt in prompts):
            raise ValueError("prompt is longer than max_length")
        order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i].split()), i))
        for start in range(0, len(order), max_rows):
            between_steps()
            rows = order[start : start + max_rows]
            self.run_rows([prompts[i] for i in rows])
            for i in rows:
                on_result(i, self.generation(prompts[i]))

    def run_rows(self, prompts):
        self.batches.append(list(prompts))

    @staticmethod
    def generation(prompt):
        from lmq.core.generation import Generation

        return Generation(prompt.upper(), [0], prompt_tokens=len(prompt.split()), completion_tokens=1, finish_reason="length")


class WorkerDied(BaseException):
    """Stands in for SIGKILL: nothing in the runner gets to handle it."""


@pytest.fixture
def setup(lmq_home, tmp_path):
    preset = tmp_path / "preset"
    preset.mkdir()
    settings = load_settings()
    return settings, sessions(settings), str(preset)


def submit(factory, preset, prompts, **params):
    with session_scope(factory) as session:
        job = queries.create_generate_job(
            session,
            preset=preset,
            inputs=[{"custom_id": f"q{i}", "prompt": p} for i, p in enumerate(prompts)],
            params={"micro_batch_size": 2, **params},
        )
        return job.id


def runner_for(settings, lm, **kwargs):
    loads = []

    def load(location, dtype):
        loads.append(location)
        return lm

    runner = JobRunner(settings, ModelPool(2**30, load=load, measure=lambda m: 1), **kwargs)
    return runner, loads


def results(factory, job_id):
    with session_scope(factory) as session:
        lines = [result_line(item) for item in queries.job_items(session, job_id)]
        return lines, job_summary(queries.get_job(session, job_id))


PROMPTS = ["one", "two words", "three little words", "four", "five and six", "seven"]


def test_every_input_gets_its_result_in_input_order(setup):
    settings, factory, preset = setup
    lm = StandInLM()
    job_id = submit(factory, preset, PROMPTS)
    runner, _ = runner_for(settings, lm)
    assert runner.run(job_id) == "succeeded"
    lines, summary = results(factory, job_id)
    assert [line["output"] for line in lines] == [p.upper() for p in PROMPTS]
    assert [line["custom_id"] for line in lines] == [f"q{i}" for i in range(6)]
    assert summary["counts"] == {"total": 6, "completed": 6, "failed": 0}
    assert summary["progress"] == 1.0
    # Micro-batches of two, shortest prompts first.
    assert [len(batch) for batch in lm.batches] == [2, 2, 2]
    assert lm.batches[0] == ["one", "four"]
    assert lm.sampler == "greedy"


def test_a_batch_that_runs_out_of_memory_is_split_and_retried(setup):
    settings, factory, preset = setup
    lm = StandInLM(fits=1)
    job_id = submit(factory, preset, PROMPTS, micro_batch_size=4)
    runner, _ = runner_for(settings, lm)
    assert runner.run(job_id) == "succeeded"
    lines, summary = results(factory, job_id)
    assert [line["output"] for line in lines] == [p.upper() for p in PROMPTS]
    assert all(len(batch) == 1 for batch in lm.batches)
    with session_scope(factory) as session:
        splits = [e.data for e in queries.job_events(session, job_id) if e.type == "split"]
    assert splits and all(split["reason"] == "out_of_memory" for split in splits)


def test_a_bad_prompt_fails_alone(setup):
    settings, factory, preset = setup
    job_id = submit(factory, preset, ["fine", "TOO LONG x", "also fine"], micro_batch_size=3)
    runner, _ = runner_for(settings, StandInLM())
    assert runner.run(job_id) == "succeeded"
    lines, summary = results(factory, job_id)
    assert [line["output"] for line in lines] == ["FINE", None, "ALSO FINE"]
    # The row's own index and custom_id, not the index within the batch of one that raised.
    assert lines[1]["error"] == "input 1 (custom_id 'q1'): prompt is longer than max_length"
    assert summary["counts"] == {"total": 3, "completed": 2, "failed": 1}


def test_cancel_stops_within_one_micro_batch_and_keeps_finished_results(setup):
    settings, factory, preset = setup
    job_id = submit(factory, preset, PROMPTS)

    def cancel_after_first_batch(done, total):
        if done == 2:
            with session_scope(factory) as session:
                queries.request_cancel(session, job_id)

    lm = StandInLM()
    runner, _ = runner_for(settings, lm, on_progress=cancel_after_first_batch)
    assert runner.run(job_id) == "cancelled"
    assert len(lm.batches) == 1
    lines, summary = results(factory, job_id)
    assert [line["output"] for line in lines] == ["ONE", None, None, "FOUR", None, None]
    assert summary["counts"]["completed"] == 2


def test_a_redelivered_job_runs_only_what_is_left_and_writes_each_result_once(setup):
    settings, factory, preset = setup
    job_id = submit(factory, preset, PROMPTS)

    def die_after_two_batches(done, total):
        if done == 4:
            raise WorkerDied

    first = StandInLM()
    with pytest.raises(WorkerDied):
        runner_for(settings, first, on_progress=die_after_two_batches)[0].run(job_id)
    assert results(factory, job_id)[1]["status"] == "running"

    # Until its lease runs out the job is the dead worker's: a delivery now does nothing.
    early = StandInLM()
    assert runner_for(settings, early)[0].run(job_id) == "running"
    assert early.batches == []

    lease_runs_out(factory, job_id)
    second = StandInLM()
    assert runner_for(settings, second)[0].run(job_id) == "succeeded"
    generated = [p for batch in first.batches + second.batches for p in batch]
    assert sorted(generated) == sorted(PROMPTS)
    lines, summary = results(factory, job_id)
    assert [line["output"] for line in lines] == [p.upper() for p in PROMPTS]
    assert summary["attempts"] == 2

    # Delivered once more after it finished: nothing runs, nothing changes.
    third = StandInLM()
    assert runner_for(settings, third)[0].run(job_id) == "succeeded"
    assert third.batches == []


def test_a_second_job_on_the_same_preset_loads_nothing(setup):
    settings, factory, preset = setup
    runner, loads = runner_for(settings, StandInLM())
    first, second = submit(factory, preset, ["a"]), submit(factory, preset, ["b"])
    runner.run(first)
    runner.run(second)
    assert loads == [preset]
    with session_scope(factory) as session:
        models = [
            next(e.data for e in queries.job_events(session, job) if e.type == "model")
            for job in (first, second)
        ]
    assert [m["pool_hit"] for m in models] == [False, True]
    assert models[1]["load_seconds"] == 0.0


def test_an_unexpected_error_fails_the_job_with_its_message(setup):
    settings, factory, preset = setup
    job_id = submit(factory, preset, ["a"])

    def broken(location, dtype):
        raise OSError("model.weights.h5 is truncated")

    runner = JobRunner(settings, ModelPool(2**30, load=broken))
    assert runner.run(job_id) == "failed"
    assert results(factory, job_id)[1]["error"] == "OSError: model.weights.h5 is truncated"


def test_a_cancelled_queued_job_never_runs(setup):
    settings, factory, preset = setup
    job_id = submit(factory, preset, ["a"])
    with session_scope(factory) as session:
        queries.request_cancel(session, job_id)
    lm = StandInLM()
    assert runner_for(settings, lm)[0].run(job_id) == "cancelled"
    assert lm.batches == []


def test_long_jobs_are_planned_window_by_window(setup):
    settings, factory, preset = setup
    lm = StandInLM()
    job_id = submit(factory, preset, PROMPTS, micro_batch_size=8)
    runner, _ = runner_for(settings, lm)
    runner.planning_window = 4
    assert runner.run(job_id) == "succeeded"
    # Sorted by length within each window of four inputs, never across windows.
    assert lm.batches == [["one", "four", "two words", "three little words"], ["seven", "five and six"]]
    assert [line["output"] for line in results(factory, job_id)[0]] == [p.upper() for p in PROMPTS]


def test_a_paused_run_that_lost_its_lease_stops_and_writes_nothing_more(setup):
    """A worker paused past its lease (SIGSTOP) comes back after another worker
    took the job over and finished it: the job still ends with one result per
    input and exact counts."""
    settings, factory, preset = setup
    job_id = submit(factory, preset, PROMPTS)
    duplicate = StandInLM()

    def paused_while_another_runs_everything_after_the_first_batch(done, total):
        if done == 2:
            lease_runs_out(factory, job_id)
            assert runner_for(settings, duplicate)[0].run(job_id) == "succeeded"

    live = StandInLM()
    runner, _ = runner_for(settings, live, on_progress=paused_while_another_runs_everything_after_the_first_batch)
    assert runner.run(job_id) == "succeeded"
    # The live run found its lease gone at its next check and stopped there.
    assert len(live.batches) == 1 and len(duplicate.batches) == 2
    lines, summary = results(factory, job_id)
    assert [line["output"] for line in lines] == [p.upper() for p in PROMPTS]
    assert summary["counts"] == {"total": 6, "completed": 6, "failed": 0}
    assert summary["attempts"] == 2


class TakenOverDuringBatch(StandInLM):
    """Pauses during its second group of rows, long enough for another worker to take the job."""

    def __init__(self, factory, job_id):
        super().__init__()
        self.factory, self.job_id = factory, job_id

    def run_rows(self, prompts):
        if len(self.batches) == 1:
            lease_runs_out(self.factory, self.job_id)
            with session_scope(self.factory) as session:
                assert leases.claim(session, self.job_id, "second-worker", lease_s=60).attempts == 2
        super().run_rows(prompts)


def test_results_of_a_run_that_lost_its_lease_mid_batch_are_refused(setup):
    settings, factory, preset = setup
    job_id = submit(factory, preset, PROMPTS)
    lm = TakenOverDuringBatch(factory, job_id)
    assert runner_for(settings, lm)[0].run(job_id) == "running"
    assert len(lm.batches) == 2  # it generated a second batch, and could not write it
    lines, summary = results(factory, job_id)
    assert [line["output"] for line in lines] == ["ONE", None, None, "FOUR", None, None]
    assert summary["counts"]["completed"] == 2
    with session_scope(factory) as session:
        job = queries.get_job(session, job_id)
        assert (job.worker, job.attempts) == ("second-worker", 2)


class OutlastsTheLease(StandInLM):
    """A batch that lasts until `rival_tried` is set: longer than any number of leases."""

    def __init__(self, rival_tried: threading.Event):
        super().__init__()
        self.rival_tried = rival_tried

    def run_rows(self, prompts):
        assert self.rival_tried.wait(60)
        super().run_rows(prompts)


def test_the_heartbeat_keeps_the_lease_through_a_batch_longer_than_the_lease(setup):
    settings, factory, preset = setup
    # Ten heartbeats to a lease: a thread stalled for a second on a loaded machine still renews in time.
    settings = replace(settings, lease_s=2.0, heartbeat_s=0.2)
    job_id = submit(factory, preset, ["one"])
    refused, rival_tried = [], threading.Event()

    def claim_after_two_leases():
        time.sleep(2 * settings.lease_s)
        with session_scope(factory) as session:
            refused.append(leases.claim(session, job_id, "second-worker", lease_s=60) is None)
        rival_tried.set()

    rival = threading.Thread(target=claim_after_two_leases)
    rival.start()
    assert runner_for(settings, OutlastsTheLease(rival_tried))[0].run(job_id) == "succeeded"
    rival.join()
    assert refused == [True]


def test_every_result_line_of_a_failed_job_carries_its_error(setup):
    settings, factory, preset = setup
    job_id = submit(factory, preset, ["a", "b"])

    def broken(location, dtype):
        raise OSError("model.weights.h5 is truncated")

    assert JobRunner(settings, ModelPool(2**30, load=broken)).run(job_id) == "failed"
    lines, summary = results(factory, job_id)
    assert [line["error"] for line in lines] == ["OSError: model.weights.h5 is truncated"] * 2
    assert summary["counts"] == {"total": 2, "completed": 0, "failed": 2}


class OutOfMemoryMidway(StandInLM):
    """Runs out of memory at its second group of rows while more than one row is in flight."""

    def run_rows(self, prompts):
        if len(self.batches) == 1 and len(prompts) > 1:
            raise RuntimeError("CUDA out of memory. Tried to allocate 1 GiB")
        super().run_rows(prompts)


def test_out_of_memory_mid_job_keeps_finished_rows_and_reruns_the_rest_on_a_smaller_budget(setup):
    settings, factory, preset = setup
    job_id = submit(factory, preset, PROMPTS, micro_batch_size=2)
    reported = []
    lm = OutOfMemoryMidway()
    runner, _ = runner_for(settings, lm, on_progress=lambda done, total: reported.append(done))
    assert runner.run(job_id) == "succeeded"
    # The first two rows were committed before the error and never ran again.
    assert lm.batches == [["one", "four"], ["seven"], ["two words"], ["three little words"], ["five and six"]]
    lines, summary = results(factory, job_id)
    assert [line["output"] for line in lines] == [p.upper() for p in PROMPTS]
    assert summary["counts"] == {"total": 6, "completed": 6, "failed": 0}
    with session_scope(factory) as session:
        splits = [e.data for e in queries.job_events(session, job_id) if e.type == "split"]
    assert splits == [{"reason": "out_of_memory", "size": 2}]
    # Progress advanced row by row once the budget was one row.
    assert reported == [0, 2, 3, 4, 5, 6]


def test_a_seeded_job_seeds_each_input_by_its_index(setup):
    """Input i samples from seed + i wherever it lands in the batch, so a retried or taken-over
    job samples what the first attempt would have."""
    settings, factory, preset = setup
    job_id = submit(factory, preset, PROMPTS, seed=7, sampler="top_k")
    lm = StandInLM()
    assert runner_for(settings, lm)[0].run(job_id) == "succeeded"
    assert lm.arguments["seed"] == [7 + i for i in range(6)]  # the job's inputs, in order
