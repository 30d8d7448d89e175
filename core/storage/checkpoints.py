"""A fit job's checkpoint in the object store, so that any worker on any host resumes it.

`checkpoints/<job id>/epoch-<n>.weights.h5` holds the weights after epoch n, and `latest.json`,
written after them, names the newest: a worker killed while uploading leaves the previous
checkpoint in force, never a half-written one.
"""

from __future__ import annotations

import json
import warnings

from lmq.core.storage.objects import Storage


class Checkpoint:
    def __init__(self, storage: Storage, job_id: str):
        self.storage = storage
        self.prefix = f"checkpoints/{job_id}"

    def save(self, model, epochs_done: int) -> None:
        """Weights first, then the pointer to them; then the weights it no longer points at."""
        weights = f"epoch-{epochs_done}.weights.h5"
        with self.storage.staging(f"{self.prefix}/{weights}") as local:
            model.save_weights(str(local))
        latest = {"epochs_done": epochs_done, "weights": weights}
        self.storage.write_bytes(f"{self.prefix}/latest.json", json.dumps(latest).encode())
        for key in self.storage.list(self.prefix):
            if key.endswith(".weights.h5") and not key.endswith(f"/{weights}"):
                self.storage.delete(key)

    def restore(self, model) -> int:
        """Epochs already done by an earlier attempt (their weights loaded into `model`), or 0."""
        try:
            latest = json.loads(self.storage.read_bytes(f"{self.prefix}/latest.json"))
        except FileNotFoundError:
            return 0
        with self.storage.local_copy(f"{self.prefix}/{latest['weights']}") as local:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
                model.load_weights(str(local))
        return latest["epochs_done"]

    def remove(self) -> None:
        self.storage.delete_tree(self.prefix)
