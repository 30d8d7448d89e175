"""Fit jobs: fine-tune through `CausalLM.fit`, then register the result as a preset.

Training changes weights, so a fit job loads its own copy of the base model
instead of borrowing the pinned one. Each step records an event (step, loss,
tokens/s) and checks whether to stop (see `JobRunner.should_stop`); each epoch ends with a checkpoint
of the weights under LMQ_HOME/checkpoints/<job id>. On success the model is
saved with `save_to_preset` into the preset store and registered in SQL with
its lineage. A redelivered fit job resumes from its last checkpoint (weights
only: the optimizer starts afresh), or only marks the job done when its
preset is already registered.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import warnings
from pathlib import Path

import keras

from core.store import JobState, queries, session_scope
from core.store.presets import preset_architecture
from workers.pool import load_task


class StepEvents(keras.callbacks.Callback):
    """Per-step events and cooperative cancellation, from inside `fit`."""

    def __init__(self, runner, job_id, checkpoint: Path, first_step, total_steps, tokens_per_step):
        super().__init__()
        self.runner = runner
        self.job_id = job_id
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
        self.runner.report_progress(self.step, self.total_steps)
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
        self.stopped = self.runner.should_stop(self.job_id)
        if self.stopped:
            self.model.stop_training = True

    def on_epoch_end(self, epoch, logs=None):
        if self.stopped:
            return
        save_checkpoint(self.model, self.checkpoint, epoch + 1)
        metrics = {name: float(value) for name, value in (logs or {}).items()}
        self.runner.event(self.job_id, "epoch", epoch=epoch + 1, checkpoint=True, **metrics)


def save_checkpoint(model, directory: Path, epochs_done: int) -> None:
    """Weights first, then the epoch count: a checkpoint is never half written."""
    directory.mkdir(parents=True, exist_ok=True)
    partial = directory / "partial.weights.h5"
    model.save_weights(str(partial))
    os.replace(partial, directory / "latest.weights.h5")
    (directory / "latest.json.partial").write_text(json.dumps({"epochs_done": epochs_done}))
    os.replace(directory / "latest.json.partial", directory / "latest.json")


def restore_checkpoint(model, directory: Path) -> int:
    """Epochs already done by an earlier attempt (their weights loaded), or 0."""
    try:
        epochs_done = json.loads((directory / "latest.json").read_text())["epochs_done"]
    except FileNotFoundError:
        return 0
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
        model.load_weights(str(directory / "latest.weights.h5"))
    return epochs_done


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
        lm.backbone.enable_lora(params["lora_rank"])  # the saved preset has the adapters merged in
    lm.compile(optimizer=keras.optimizers.AdamW(learning_rate=params.get("learning_rate") or 2e-5))

    checkpoint = runner.settings.home / "checkpoints" / job_id
    epochs_done = restore_checkpoint(lm, checkpoint)
    if epochs_done:
        runner.event(job_id, "resumed", epochs_done=epochs_done)

    tokenize = lm.preprocessor.tokenizer.tokenize
    sequence_length = lm.preprocessor.sequence_length
    tokens = sum(min(len(tokenize(text)) + 1, sequence_length) for text in texts)
    steps_per_epoch = math.ceil(len(texts) / batch_size)
    steps = StepEvents(
        runner,
        job_id,
        checkpoint,
        first_step=epochs_done * steps_per_epoch,
        total_steps=steps_per_epoch * epochs,
        tokens_per_step=tokens / steps_per_epoch,
    )
    lm.fit(
        x=texts,
        batch_size=batch_size,
        epochs=epochs,
        initial_epoch=epochs_done,
        callbacks=[steps],
        validation_data=validation or None,
        verbose=0,
    )
    if steps.stopped:  # cancelled, or finished by a duplicate delivery
        return
    _save_and_register(runner, job_id, lm, preset, output, len(texts), steps)
    shutil.rmtree(checkpoint, ignore_errors=True)


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
                architecture=preset_architecture(final),
                source=None,  # made here, not imported: `parent` and `job_id` say how
                parent=base,
                job_id=job_id,
                details={"training_examples": examples, "steps": steps.step, "final_loss": steps.loss},
            )
            queries.finish_job(session, job_id, JobState.succeeded, final_loss=steps.loss)
    except Exception:
        shutil.rmtree(final, ignore_errors=True)
        raise
