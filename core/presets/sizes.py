"""What a preset takes in memory, told from its config before anything is built.

A config may declare any size (``vocabulary_size`` 1e12, ``hidden_dim`` 1e9, a ``sequence_length``
of 1e12), and building it would fail only when the allocator gives up, with a raw "can't allocate
memory". ``check_preset_fits`` estimates the weights and the KV cache from ``config.json`` (in
KerasHub's field names or transformers') and ``preprocessor.json``, and refuses a preset that cannot
fit a memory budget or a length limit with a ``PresetTooLarge`` naming the field and the size.
The estimates are lower bounds (the largest matrices only, 2 bytes a parameter, 1 for an int8
preset), so a preset that fits is never refused. Standard library only: the API checks too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

# Each size by KerasHub's name, then the names transformers' configs give it.
FIELDS = {
    "vocabulary_size": ("vocabulary_size", "vocab_size"),
    "hidden_dim": ("hidden_dim", "hidden_size"),
    "num_layers": ("num_layers", "num_hidden_layers"),
    "intermediate_dim": ("intermediate_dim", "intermediate_size"),
    "num_heads": ("num_query_heads", "num_heads", "num_attention_heads"),
    "num_kv_heads": ("num_key_value_heads", "num_kv_heads"),
    "head_dim": ("head_dim",),
}
LENGTH_FIELDS = ("sequence_length", "decoder_sequence_length", "encoder_sequence_length")
CAP = 10**18  # sizes are multiplied capped at this, so an absurd one cannot make the arithmetic unbounded
CACHE_BYTES = 2  # a KV cache is float16 or wider, even for an int8 preset


class PresetTooLarge(ValueError):
    """A preset whose declared sizes cannot fit the memory budget or the length limits."""


@dataclass(frozen=True)
class Size:
    bytes: int
    made_of: str  # the fields it comes from, e.g. "vocabulary_size 1000000000000 x hidden_dim 4096"


@dataclass(frozen=True)
class PresetSizes:
    weights: Size
    cache_per_position: int  # bytes of one row's keys and values, for one position
    sequence_length: tuple[str, int] | None  # preprocessor.json's field and value, if it names one


def machine_memory_bytes() -> int | None:
    """This machine's memory (a library call's budget), or None where the system does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def preset_sizes(files) -> PresetSizes:
    """The sizes ``files`` (a ``PresetFiles``) declare; its JSON read through ``read_json``, so a
    file that does not parse is the preset's ``PresetFileError``."""
    serialized = files.read_json("config.json")
    config = serialized.get("config") if isinstance(serialized.get("config"), dict) else serialized
    found = {name: _size(config, aliases) for name, aliases in FIELDS.items()}
    value = {name: min(entry[1], CAP) if entry else 0 for name, entry in found.items()}
    shown = {name: f"{entry[0]} {_number(entry[1])}" for name, entry in found.items() if entry}
    vocabulary, hidden, layers, intermediate = (
        value[n] for n in ("vocabulary_size", "hidden_dim", "num_layers", "intermediate_dim")
    )
    parameter_bytes = 1 if "int8" in str(config.get("dtype")) else 2
    terms = [
        (vocabulary * hidden, ("vocabulary_size", "hidden_dim"), ""),
        (2 * layers * hidden * hidden, ("num_layers", "hidden_dim", "hidden_dim"), "2 x "),
        (2 * layers * hidden * intermediate, ("num_layers", "hidden_dim", "intermediate_dim"), "2 x "),
    ]
    largest, names, factor = max(terms, key=lambda term: term[0])
    made_of = factor + " x ".join(shown[n] for n in names if n in shown)
    weights = Size(sum(term[0] for term in terms) * parameter_bytes, made_of)
    heads = value["num_heads"]
    head_dim = value["head_dim"] or (hidden // heads if heads else 0)
    cache_per_position = 2 * layers * (value["num_kv_heads"] or heads) * head_dim * CACHE_BYTES
    length = None
    if files.is_file("preprocessor.json"):
        preprocessor = files.read_json("preprocessor.json").get("config")
        lengths = [_size(preprocessor, (name,)) for name in LENGTH_FIELDS] if isinstance(preprocessor, dict) else []
        length = max(filter(None, lengths), key=lambda entry: entry[1], default=None)
    return PresetSizes(weights, cache_per_position, length)


def check_preset_fits(
    files,
    budget_bytes: int | None,
    budget_name: str,
    *,
    length: int | None = None,
    to_preset_length: bool = False,
    max_length: int | None = None,
) -> PresetSizes:
    """The preset's sizes, or PresetTooLarge when its weights, and one row's KV cache of `length`
    positions (or, with `to_preset_length`, of the preset's own sequence length, which must then be
    at most `max_length`), do not fit `budget_bytes` (named `budget_name` in the message)."""
    sizes = preset_sizes(files)
    where = f"Preset {files.name!r}"
    if budget_bytes is not None and sizes.weights.bytes > budget_bytes:
        raise PresetTooLarge(
            f"{where}: config.json's {sizes.weights.made_of} make weights of at least "
            f"{_bytes(sizes.weights.bytes)}, more than {budget_name} ({_bytes(budget_bytes)})"
        )
    what = f"{length} positions"
    if to_preset_length and sizes.sequence_length is not None:
        field, length = sizes.sequence_length
        what = f"preprocessor.json's {field} {_number(length)}"
        if max_length is not None and length > max_length:
            raise PresetTooLarge(
                f"{where}: {what} is more than the longest sequence allowed here ({max_length}, LMQ_MAX_LENGTH); "
                "give max_new_tokens or max_length (sequence_length to fit) to stop within it"
            )
    if budget_bytes is not None and length:
        total = sizes.weights.bytes + sizes.cache_per_position * min(length, CAP)
        if total > budget_bytes:
            raise PresetTooLarge(
                f"{where}: a KV cache for {what} and weights of at least {_bytes(sizes.weights.bytes)} take at "
                f"least {_bytes(total)}, more than {budget_name} ({_bytes(budget_bytes)})"
            )
    return sizes


def _size(config: dict, aliases: tuple[str, ...]) -> tuple[str, int] | None:
    """(the field's name, its value) for the first of `aliases` holding a whole non-negative number;
    a value of another type is left to the build, which names it."""
    for name in aliases:
        value = config.get(name)
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return name, value
    return None


def _number(value: int) -> str:
    digits = str(value)
    return digits if len(digits) <= 24 else f"(a number of {len(digits)} digits)"


def _bytes(count: int) -> str:
    for unit, scale in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6)):
        if count >= scale:
            return f"{count / scale:,.1f} {unit}"
    return f"{count} bytes"
