"""Presets whose files declare what no deployment can hold, for the hostile tests (issue 27)."""

import json
import shutil
from pathlib import Path

TINY_LLAMA = Path(__file__).resolve().parent / "fixtures" / "keras_hub_presets" / "llama"
HUGE = 10**12
# name -> (file, what to set in its "config", the field a refusal must name)
HOSTILE_PRESETS = {
    "huge-vocabulary": ("config.json", {"vocabulary_size": HUGE}, "vocabulary_size 1000000000000"),
    "huge-hidden": ("config.json", {"hidden_dim": 10**9}, "hidden_dim 1000000000"),
    "long-sequence": ("preprocessor.json", {"sequence_length": HUGE}, "sequence_length 1000000000000"),
}
BIG_INTEGER = "big-integer"  # config.json's vocabulary_size has 5000 digits


def make_hostile_preset(directory: Path, name: str) -> Path:
    """A copy of the tiny KerasHub Llama fixture at `directory`, made hostile as `name` says."""
    shutil.copytree(TINY_LLAMA, directory)
    if name == BIG_INTEGER:
        config = (directory / "config.json").read_text()
        (directory / "config.json").write_text(config.replace('"vocabulary_size": 1000', '"vocabulary_size": ' + "9" * 5000))
        return directory
    file, changes, _ = HOSTILE_PRESETS[name]
    data = json.loads((directory / file).read_text())
    data["config"].update(changes)
    (directory / file).write_text(json.dumps(data))
    return directory
