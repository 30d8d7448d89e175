"""Fit jobs: fine-tune through `CausalLM.fit`, then register the result as a preset.

Training changes weights, so a fit job loads its own copy of the base model
instead of borrowing the pinned one. Each step records an event (step, loss,
tokens/s) and checks for a cancel request; on success the model is saved with
`save_to_preset` into the preset store and registered in SQL with its lineage.
A redelivered fit job starts training again, unless its preset was already
registered, in which case it only marks the job done.
"""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path

import keras

from core.store import JobState, session_scope
from core.store import queries
from core.store.presets import preset_architecture
from workers.pool import load_task


class StepEvents(keras.callbacks.Callback):
    """Per-step events and cooperative cancellation, from inside `fit`."""

    def __init__(self, runner, job_id: str, total_steps: int, tokens_per_step: float):
        super().__init__()
        self.runner = runner
        self.job_id = job_id
        self.total_steps = total_steps
        self.tokens_per_step = tokens_per_step
        self.step = 0
        self.loss = None
        self.cancelled = False
        self._last = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        now = time.perf_counter()
        seconds, self._last = now - self._last, now
        self.step += 1
        self.loss = float(logs["loss"]) if logs and "loss" in logs else None
        with session_scope(self.runner.sessions) as session:
            queries.add_event(
                session,
                self.job_id,
                "step",
                step=self.step,
                loss=self.loss,
                tokens_per_second=round(self.tokens_per_step / seconds, 1) if seconds > 0 else None,
            )
            queries.set_progress(session, self.job_id, min(self.step / self.total_steps, 1.0))
            self.cancelled = queries.cancel_requested(session, self.job_id)
        self.runner.report_progress(self.step, self.total_steps)
        if self.cancelled:
            self.model.stop_training = True

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        self.runner.event(
            self.job_id,
            "epoch",
            epoch=epoch + 1,
            **{name: float(value) for name, value in logs.items()},
        )


def run_fit(runner, job_id: str) -> None:
    with session_scope(runner.sessions) as session:
        job = queries.get_job(session, job_id)
        preset, output, params, data = job.preset, job.output_preset, dict(job.params), job.data
        registered = queries.get_preset(session, output)
        if registered is not None and registered.job_id == job_id:
            queries.finish_job(session, job_id, JobState.succeeded)
            return

    started = time.perf_counter()
    lm = load_task(runner.locate(preset), params.get("dtype"))
    runner.event(job_id, "model", preset=preset, pool_hit=False, load_seconds=round(time.perf_counter() - started, 3))

    texts = [row["text"] for row in data["training_data"]]
    validation = [row["text"] for row in data.get("validation_data") or []]
    batch_size = params.get("batch_size") or 8
    epochs = params.get("epochs") or 1
    if params.get("sequence_length"):
        lm.preprocessor.sequence_length = params["sequence_length"]
    if params.get("lora_rank"):
        lm.backbone.enable_lora(params["lora_rank"])
    lm.compile(optimizer=keras.optimizers.AdamW(learning_rate=params.get("learning_rate") or 2e-5))

    tokenize = lm.preprocessor.tokenizer.tokenize
    sequence_length = lm.preprocessor.sequence_length
    tokens = sum(min(len(tokenize(text)) + 1, sequence_length) for text in texts)
    steps_per_epoch = math.ceil(len(texts) / batch_size)
    steps = StepEvents(runner, job_id, steps_per_epoch * epochs, tokens / steps_per_epoch)
    lm.fit(
        x=texts,
        batch_size=batch_size,
        epochs=epochs,
        callbacks=[steps],
        validation_data=validation or None,
        verbose=0,
    )
    if steps.cancelled:
        runner.finish(job_id, JobState.cancelled, steps=steps.step)
        return
    _save_and_register(runner, job_id, lm, preset, output, len(texts), steps)


def _save_and_register(runner, job_id, lm, base, name, examples, steps: StepEvents) -> None:
    """Save beside the final directory, then rename: a preset in the store is always whole."""
    store = runner.settings.preset_store
    store.mkdir(parents=True, exist_ok=True)
    final = store / name
    partial = store / f".{name}.{job_id}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    lm.save_to_preset(str(partial))
    if final.exists():
        raise FileExistsError(f"preset directory {final} already exists")
    partial.rename(final)
    try:
        with session_scope(runner.sessions) as session:
            queries.register_preset(
                session,
                name=name,
                path=str(final),
                architecture=preset_architecture(Path(final)),
                source=base,
                parent=base,
                job_id=job_id,
                details={"training_examples": examples, "steps": steps.step, "final_loss": steps.loss},
            )
            queries.finish_job(session, job_id, JobState.succeeded, final_loss=steps.loss)
    except Exception:
        shutil.rmtree(final, ignore_errors=True)
        raise
