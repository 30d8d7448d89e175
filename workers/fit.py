"""Fit jobs: fine-tune through `CausalLM.fit` (rows of `text`; or, from OpenAI's fine-tuning API,
chats and prompt/completion pairs, trained on their answers alone) or `Seq2SeqLM.fit` (rows of
`encoder_text` and `decoder_text`), then register the result as a preset.

Training changes weights, so a fit job loads its own copy of the base model
instead of borrowing the pinned one. A fit job's counts are in training steps
(`total` = steps per epoch x epochs). Each step records an event (step, loss,
tokens/s) and checks for a cancel request; each epoch ends with a checkpoint
of the weights in the object store (core/storage/checkpoints.py). On success the
model is saved with `save_to_preset` (a LoRA fine-tune of the fine-tuning API as
an adapter preset over its base), published to the preset store
(core/storage/presets.py) and registered in SQL with its lineage.

A fit job taken over from a dead worker resumes from its last checkpoint
(weights only: the optimizer starts afresh). The step and epoch events of the
lost attempt after that checkpoint are dropped, since that training is redone,
so each step is recorded once; and the preset is registered once, even when
the earlier attempt died after moving it into the store.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
from sqlalchemy.exc import IntegrityError

from lmq.core import adapters
from lmq.core.domain.fine_tuning import FINE_TUNING, MAX_LINE_PROBLEMS, TrainingFileInvalid
from lmq.core.domain.fit import FIT_DEFAULTS, fit_steps
from lmq.core.models.training_data import row_example
from lmq.core.names import JobState, TaskKind
from lmq.core.presets import PresetResolver
from lmq.core.storage import PresetStore, preset_store, storage
from lmq.core.storage.checkpoints import Checkpoint
from lmq.core.store import queries
from lmq.core.store.db import DatabaseUnavailable
from lmq.core.store.leases import LeaseLost
from lmq.core.store.presets import preset_architecture
from lmq.workers import metrics
from lmq.workers.attempt import Attempt
from lmq.workers.pool import load_task

# The preprocessor settings the `sequence_length` hyperparameter sets, by task.
SEQUENCE_LENGTHS = {
    TaskKind.causal_lm: ("sequence_length",),
    TaskKind.seq2seq_lm: ("encoder_sequence_length", "decoder_sequence_length"),
}


class StepEvents(keras.callbacks.Callback):
    """Per-step events, counts and cooperative cancellation, from inside `fit`."""

    def __init__(self, attempt: Attempt, checkpoint: Checkpoint, first_step, total_steps, tokens_per_step):
        super().__init__()
        self.attempt = attempt
        self.checkpoint = checkpoint
        self.total_steps = total_steps
        self.tokens_per_step = tokens_per_step
        self.step = first_step
        self.loss = None
        self.stopped = False
        self._last = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        now = time.perf_counter()
        seconds, self._last = now - self._last, now
        self.step += 1
        self.loss = float(logs["loss"]) if logs and "loss" in logs else None
        self.attempt.report_progress(self.step, self.total_steps, loss=self.loss)
        metrics.fit_step(self.attempt.job_id, self.step, self.total_steps, self.loss)
        tokens_per_second = round(self.tokens_per_step / seconds, 1) if seconds > 0 else None

        def record_step(session) -> bool:
            queries.add_event(
                session, self.attempt.job_id, "step", step=self.step, loss=self.loss, tokens_per_second=tokens_per_second
            )
            queries.set_steps(session, self.attempt.job_id, self.step, self.total_steps)
            return self.attempt.stop_requested(session)

        self.stopped = self.attempt.write(record_step)
        if self.stopped:
            self.model.stop_training = True

    def on_epoch_end(self, epoch, logs=None):
        if self.stopped:
            return
        self.attempt.confirm()  # a paused attempt that lost the job must not write its checkpoint
        self.checkpoint.save(self.model, epoch + 1)
        metrics = {name: float(value) for name, value in (logs or {}).items()}
        self.attempt.event("epoch", epoch=epoch + 1, step=self.step, checkpoint=True, **metrics)


class OutputNameTaken(ValueError):
    """The output name was taken by another job before this one could register it. The same words
    whether that job ran at the same time or long before (another tenant's, which this job's
    submission was not shown), and no server path."""

    def __init__(self, name: str):
        super().__init__(f"output_preset {name!r} was taken by another job before this one could register it; fit again under another name")


def run_fit(attempt: Attempt, location: str) -> None:
    """Fine-tune the base preset at `location` as the job asks, under `attempt`'s lease."""
    job_id, settings = attempt.job_id, attempt.settings

    def read_job(session):
        job = queries.get_job(session, job_id)
        return job.preset, job.output_preset, dict(job.params), job.data, queries.get_preset(session, job.output_preset)

    preset, output, params, data, registered = attempt.write(read_job)
    presets = preset_store(settings)
    if registered is not None and registered.job_id == job_id:
        attempt.finish(JobState.succeeded)
        return
    published = None if registered is not None else presets.published_by(output, job_id)
    if published is not None:  # the last attempt died between publishing and registering
        architecture = preset_architecture(presets.fetch(published))
        details = {"training_examples": len(data["training_data"])}
        _register(attempt, presets, published, architecture, preset, output, details, None)
        return
    if registered is not None or presets.taken(output):  # another tenant's name, which its submission could not see
        raise OutputNameTaken(output)

    started = time.perf_counter()
    lm = load_task(location, params.get("dtype"), budget_bytes=int(settings.model_memory_gb * 2**30))
    attempt.event("model", preset=preset, pool_hit=False, load_seconds=round(time.perf_counter() - started, 3))

    if params.get("sequence_length"):
        for name in SEQUENCE_LENGTHS[TaskKind(lm.task_kind)]:
            setattr(lm.preprocessor, name, params["sequence_length"])
    try:
        examples = training_examples(lm, data["training_data"], "training_file")
        validation = training_examples(lm, data.get("validation_data") or [], "validation_file")
    except TrainingFileInvalid as invalid:  # no step has run
        attempt.finish(JobState.failed, error=str(invalid), code=invalid.code, param=invalid.param)
        return
    schedule = fit_steps(len(data["training_data"]), params)
    if params.get("seed") is not None:
        keras.utils.set_random_seed(params["seed"])
    if params.get("lora_rank"):
        lm.backbone.enable_lora(params["lora_rank"])  # merged into the saved preset, or an adapter (adapter_base)
    learning_rate = params.get("learning_rate") or FIT_DEFAULTS.learning_rate
    # The loss of a step is the mean over the tokens trained on (a chat's answers), not over every position.
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="mean_with_sample_weight")
    lm.compile(optimizer=keras.optimizers.AdamW(learning_rate=learning_rate), loss=loss)

    checkpoint = Checkpoint(storage(settings), job_id)
    epochs_done = checkpoint.restore(lm)
    first_step = epochs_done * schedule.per_epoch

    def start_steps(session) -> None:
        queries.forget_steps_after(session, job_id, first_step, epochs_done)
        queries.set_steps(session, job_id, first_step, schedule.total)
        if epochs_done:
            queries.add_event(session, job_id, "resumed", epochs_done=epochs_done, step=first_step)

    attempt.write(start_steps)

    steps = StepEvents(
        attempt,
        checkpoint,
        first_step=first_step,
        total_steps=schedule.total,
        tokens_per_step=training_tokens(lm, examples) / schedule.per_epoch,
    )
    lm.fit(
        x=examples.x,
        sample_weight=examples.sample_weight,
        batch_size=schedule.batch_size,
        epochs=schedule.epochs,
        initial_epoch=epochs_done,
        callbacks=[steps],
        validation_data=validation.validation_data if validation else None,
        verbose=0,
    )
    if steps.stopped:  # cancelled or paused
        return
    details = {
        "training_examples": len(data["training_data"]),
        "steps": steps.step,
        "final_loss": steps.loss,
        "trained_tokens": training_tokens(lm, examples) * schedule.epochs,
    }
    location, architecture = _save(lm, attempt, presets, output, adapter_base(params, preset, location))
    _register(attempt, presets, location, architecture, preset, output, details, steps.loss)
    checkpoint.remove()


@dataclass(frozen=True)
class Examples:
    """Rows as the task's `fit` takes them: texts, {"encoder_text": [...], "decoder_text": [...]},
    or rows of token ids with a weight per token (`sample_weight`: a chat's answers, a completion)."""

    x: Any
    sample_weight: list | None = None

    @property
    def validation_data(self):
        return self.x if self.sample_weight is None else (self.x, None, self.sample_weight)


def training_examples(lm, rows: list[dict], param: str) -> Examples | None:
    """The rows as `fit` takes them; a ValueError naming the rows' kind when the preset's task reads
    another; TrainingFileInvalid naming the examples that cannot train (see `weighted_examples`)."""
    if not rows:
        return None
    task, given = TaskKind(lm.task_kind), TaskKind.seq2seq_lm if "encoder_text" in rows[0] else TaskKind.causal_lm
    if given is not task:
        wanted, gave = task.fields_read("fit"), given.fields_read("fit")
        raise ValueError(f"the preset is a {type(lm).__name__}: its training rows give {wanted}, not {gave}")
    if task is TaskKind.seq2seq_lm:
        return Examples({side: [row[side] for row in rows] for side in task.training_fields})
    if all("text" in row for row in rows):
        return Examples([row["text"] for row in rows])
    return weighted_examples(lm.preprocessor, rows, param)


def weighted_examples(preprocessor, rows: list[dict], param: str) -> Examples:
    """Chats and prompt/completion pairs as token ids and weights (lmq.core.models.training_data).
    An example its chat template refuses, or none of whose trained tokens is within the sequence
    length, is named in a TrainingFileInvalid: the job fails before its first step."""
    ids, weights, problems = [], [], []
    room = preprocessor.sequence_length + 1  # the packed length: labels are the ids shifted by one
    for number, row in enumerate(rows, 1):
        try:
            row_ids, row_weights = row_example(preprocessor, row)
        except ValueError as error:
            problems.append(f"example {number}: {error}")
            continue
        if not any(row_weights[1:room]):
            problems.append(
                f"example {number}: none of its trained tokens is within the model's sequence length "
                f"({preprocessor.sequence_length} tokens; the example has {len(row_ids)})"
            )
        ids.append(row_ids)
        weights.append(row_weights)
    if problems:
        raise TrainingFileInvalid(param, problems[:MAX_LINE_PROBLEMS], len(problems))
    return Examples(ids, weights)


def training_tokens(lm, examples: Examples) -> int:
    """Tokens of one epoch, as packed (a start or end token added, cut at the sequence length)."""
    tokenize, preprocessor = lm.preprocessor.tokenizer.tokenize, lm.preprocessor
    if isinstance(examples.x, dict):
        lengths = {
            "encoder_text": preprocessor.encoder_sequence_length,
            "decoder_text": preprocessor.decoder_sequence_length,
        }
        return sum(min(len(tokenize(text)) + 2, lengths[side]) for side in lengths for text in examples.x[side])
    if examples.sample_weight is not None:
        return sum(min(len(ids), preprocessor.sequence_length + 1) - 1 for ids in examples.x)
    return sum(min(len(tokenize(text)) + 1, preprocessor.sequence_length) for text in examples.x)


def adapter_base(params: dict, preset: str, location: str) -> str | None:
    """The base a LoRA fine-tune of the fine-tuning API is saved over as an adapter preset (the job's
    own handle for it, as the job's tenant names it); None to save the model whole: a fit of every
    weight, a fit job of /v1/jobs or `lmq fit` (whose LoRA updates are merged in, as documented), or
    a fine-tune of a base that is itself an adapter."""
    if not (params.get("lora_rank") and FINE_TUNING in params):
        return None
    base_is_adapter = Path(location).is_dir() and adapters.is_adapter_preset(PresetResolver().files(location))
    return None if base_is_adapter else preset


def _save(
    lm, attempt: Attempt, presets: PresetStore, name: str, adapter_over: str | None = None
) -> tuple[str, str | None]:
    """Save to a staging directory, then publish: a preset in the store is always whole. A LoRA
    fine-tune is saved as an adapter preset over `adapter_over` (lmq.core.adapters, PEFT's layout).
    Returns where it is published and its architecture."""
    staged = presets.staging(name, attempt.job_id)
    try:
        if adapter_over is None:
            lm.save_to_preset(str(staged))
        else:
            adapters.save_adapter_preset(lm, staged, adapter_over)
        architecture = preset_architecture(staged)
        attempt.confirm()
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    try:
        return presets.publish(staged, name, attempt.job_id), architecture
    except FileExistsError:
        raise OutputNameTaken(name) from None


def _register(
    attempt: Attempt,
    presets: PresetStore,
    location: str,
    architecture: str | None,
    base: str,
    name: str,
    details: dict,
    final_loss: float | None,
) -> None:
    def register(session) -> None:
        queries.register_preset(
            session,
            name=name,
            path=location,
            architecture=architecture,
            source=None,  # made here, not imported: `parent` and `job_id` say how
            parent=base,
            job_id=attempt.job_id,
            details=details,
            tenant=queries.get_job(session, attempt.job_id).tenant,  # the preset is the job's tenant's
        )
        trained_tokens = details.get("trained_tokens")
        queries.finish_job(session, attempt.job_id, JobState.succeeded, final_loss=final_loss, trained_tokens=trained_tokens)

    try:
        attempt.write(register)
    except (LeaseLost, DatabaseUnavailable):
        raise  # the next attempt registers what this one published (see PresetStore.published_by)
    except IntegrityError:  # another job registered the name meanwhile
        presets.remove(location)
        raise OutputNameTaken(name) from None
    except Exception:
        presets.remove(location)
        raise
