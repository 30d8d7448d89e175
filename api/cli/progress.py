"""How `lmq generate`, `lmq fit`, `lmq jobs watch` and `lmq submit --wait` show a job's progress.

On a terminal, a live tqdm bar on stderr: items (prompts) or steps done of the
total, the rate, the time left and, for a fit job, the latest step's loss.
When stderr is not a terminal (a log file, CI), plain lines instead of a
redrawn bar: one every few seconds, and one at the end.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

from tqdm import tqdm

from lmq.core.names import TERMINAL_STATES

PLAIN_LINE_SECONDS = 5.0


def unit_of(kind: str) -> str:
    """What a job counts: prompts for generate, optimizer steps for fit."""
    return "prompt" if kind == "generate" else "step"


class Progress:
    def __init__(self, label: str, unit: str, stream=None):
        self.label = label
        self.unit = unit
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty()
        self.bar: tqdm | None = None  # drawn at the first update, so nothing shows for a job that is not there
        self.started = time.monotonic()
        self.first_done: int | None = None
        self.last_line: float | None = None
        self.shown: tuple | None = None

    def update(self, done: int, total: int, *, loss: float | None = None, status: str | None = None) -> None:
        now = time.monotonic()
        if self.first_done is None:
            # The clock starts with the work, not with the model load; a resumed job's done items are not its rate.
            self.first_done, self.started = done, now
            if self.live:
                self.bar = tqdm(
                    desc=self.label, unit=self.unit, total=total, initial=done, file=self.stream, dynamic_ncols=True
                )
        if self.bar is not None:
            self.bar.total = total
            self.bar.update(done - self.bar.n)  # through update(), so that tqdm measures the rate
            self.bar.set_postfix(self.postfix(loss, status), refresh=True)
            return
        finished = total and done >= total
        due = self.last_line is None or now - self.last_line >= PLAIN_LINE_SECONDS or finished
        if (done, total, status) != self.shown and due:
            self.plain_line(done, total, loss, status, now)

    def plain_line(self, done: int, total: int, loss, status, now: float) -> None:
        line = f"lmq: {self.label}: {done}/{total} {self.unit}s"
        elapsed = now - self.started
        if elapsed > 0 and done > self.first_done:
            line += f", {(done - self.first_done) / elapsed:.2f} {self.unit}s/s"
        for name, value in self.postfix(loss, status).items():
            line += f", {name} {value}"
        print(line, file=self.stream, flush=True)
        self.last_line, self.shown = now, (done, total, status)

    @staticmethod
    def postfix(loss: float | None, status: str | None) -> dict:
        shown = {}
        if loss is not None:
            shown["loss"] = f"{loss:.4f}"
        if status is not None:
            shown["status"] = status
        return shown

    def show_summary(self, summary: dict, loss: float | None = None) -> None:
        """A job summary as the API and the store shape it (api.schemas.job_summary)."""
        counts = summary["counts"]
        self.unit = unit_of(summary["kind"])
        self.update(counts["completed"] + counts["failed"], counts["total"], loss=loss, status=summary["status"])

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def follow_job(
    job_id: str, summary_of: Callable[[], dict], events_after: Callable[[int], list[dict]], poll_seconds: float = 0.5
) -> dict:
    """Poll a job (through the store or the HTTP API) until it finishes, showing its progress; its last summary.

    `summary_of()` is the job's summary now, `events_after(id)` its events after that one (for a fit step's loss).
    """
    loss, seen = None, 0
    with Progress(f"job {job_id[:8]}", "item") as progress:
        while True:
            summary = summary_of()
            if summary["kind"] == "fit":
                events = events_after(seen)
                seen = events[-1]["id"] if events else seen
                loss = latest_loss(events, loss)
            progress.show_summary(summary, loss)
            if summary["status"] in TERMINAL_STATES:
                return summary
            time.sleep(poll_seconds)


def latest_loss(events: list[dict], loss: float | None = None) -> float | None:
    """The loss of the last fit step among `events` (api.schemas.event_line records), else `loss`."""
    for event in events:
        if event["type"] == "step" and event.get("loss") is not None:
            loss = event["loss"]
    return loss
