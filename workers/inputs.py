"""A generate job's item input as the model reads it.

An item's ``input`` is ``{"prompt": str}`` (a causal LM), ``{"encoder_text": str}``
(a sequence-to-sequence model) or ``{"messages": [{"role", "content"}, ...]}`` (a
causal LM with a chat template), optionally with ``"params"``: the item's own
``max_new_tokens``, ``sampler``, ``stop``, ``stop_token_ids`` and ``seed``, in place
of the job's (see docs/seq2seq-jobs.md), checked by the model every front end checks
them with (lmq.core.domain.generation).
"""

from __future__ import annotations

import functools
import json
from typing import Callable

from pydantic import ValidationError

from lmq.core.domain.generation import NO_LIMITS, generate_models
from lmq.core.domain.requests import field_name, problems
from lmq.core.names import GENERATE_TEXT_FIELDS, TaskKind
from lmq.workers.batching import Prompt

# The settings each row's logits are processed by, beside the other rows (lmq.core.samplers.processing).
PROCESSING = ("presence_penalty", "frequency_penalty", "logit_bias", "min_p", "logprobs", "response_format")


def model_input(item_input: dict, task_kind: str, tokenizer) -> tuple[str | list[int], list[int]]:
    """(the prompt `generate` takes: text, or a chat's token ids; extra stop token ids) for one
    item, or a ValueError naming what is wrong with it: an input of another task than the
    model's, or bad chat messages."""
    task = TaskKind(task_kind)
    given = [name for name in GENERATE_TEXT_FIELDS if name in item_input]
    if len(given) != 1:
        raise ValueError(f"the input must give one of 'prompt', 'encoder_text' or 'messages', got {sorted(item_input)}")
    field = given[0]
    if field == "messages" and task is TaskKind.causal_lm:
        from lmq.core.chat import chat_token_ids, end_of_turn_token_ids

        return chat_token_ids(tokenizer, item_input["messages"]), list(end_of_turn_token_ids(tokenizer))
    if field != task.prompt_field:
        raise ValueError(f"the model is {task.description}: give {task.prompt_field!r}, not {field!r}")
    if not isinstance(item_input[field], str):
        raise ValueError(f"{field!r} must be a string, got {type(item_input[field]).__name__}")
    return item_input[field], []


def item_params(item_input: dict) -> dict:
    """The item's own settings (no nulls), or a ValueError naming what is wrong with them. The
    server's limits were applied when the job was made; here the model checks all else."""
    params = item_input.get("params") or {}
    if not isinstance(params, dict):
        raise ValueError(f"'params' must be an object, got {type(params).__name__}")
    model = generate_models(NO_LIMITS).params
    try:
        return model.model_validate(params).model_dump(mode="json", exclude_none=True)
    except ValidationError as error:
        found = problems(error.errors())
    unknown = sorted(str(problem["loc"][0]) for problem in found if problem["type"] == "extra_forbidden")
    if unknown:
        raise ValueError(f"'params' takes {', '.join(model.model_fields)}; unknown: {', '.join(unknown)}")
    raise ValueError(f"{field_name(found[0]['loc'])!r} {found[0]['msg']}")


def group_sampler(prompts: list[Prompt]):
    """What `generate(sampler=...)` takes for these rows: their sampler when they share one,
    else the list of each row's (a PerRequestSampler)."""
    parsed = {key: json.loads(key) for key in {prompt.sampler for prompt in prompts}}
    if len(parsed) == 1:
        return next(iter(parsed.values()))
    return [parsed[prompt.sampler] for prompt in prompts]


def plan(
    items, job_params: dict, task_kind: str, preprocessor, adapter_of: Callable[[str | None], str | None]
) -> tuple[dict[str | None, list[Prompt]], list]:
    """`items` ((index, input, custom_id), ...) as groups of rows that run in one engine pass, and
    (index, custom_id, message) for each item that cannot run (the others do). Each row keeps its
    own token sampler, stops and processing in the pass; a search (beam, contrastive) weighs
    several rows per request together, so its rows run apart: the groups are keyed by the search's
    sampler as JSON, None for the token-sampled rows.

    A row's seed is its own (`params.seed`, else its sampler's), else the job's plus its
    index, so that it never depends on which rows it ran beside. An item of `n` choices is n
    rows, choice i seeded with that seed + i.

    A causal LM's prompt is tokenized here, once: the row's text is its ids, as `generate`
    takes them (the start token added), and `generate` tokenizes nothing again.

    `adapter_of(model)`: the adapter the rows of an item naming its own `model` (None: none
    named) run with, or a ValueError saying why that model cannot serve it.
    """
    tokenizer = preprocessor.tokenizer
    groups: dict[str | None, list[Prompt]] = {}
    refused = []
    job_seed = _seed_of(job_params)
    for index, item_input, custom_id in items:
        try:
            adapter = adapter_of(item_input.get("model"))
            text, end_of_turn = model_input(item_input, task_kind, tokenizer)
            own = item_params(item_input)
            sampler = _sampler_key(own.get("sampler", job_params.get("sampler") or "greedy"))
            search = None if _is_token_sampler(sampler) else sampler
            stop = _strings(own.get("stop", job_params.get("stop")))
            stop_token_ids = _stop_ids(own.get("stop_token_ids", job_params.get("stop_token_ids", "auto")),
                                       end_of_turn, tokenizer)
            processing = _processing({name: own.get(name, job_params.get(name)) for name in PROCESSING}, tokenizer)
        except ValueError as error:
            refused.append((index, custom_id, str(error)))
            continue
        seed = _seed_of(own)
        if seed is None and job_seed is not None:
            seed = job_seed + index
        if isinstance(text, str) and TaskKind(task_kind) is TaskKind.causal_lm:
            text = preprocessor.generate_preprocess(text)[0] or text  # an empty prompt stays text, for its error
        length = len(text) if isinstance(text, list) else len(tokenizer.tokenize(text))
        choices = own.get("n", job_params.get("n")) or 1
        groups.setdefault(search, []).extend(
            Prompt(index, text, length, custom_id,
                   max_new_tokens=own.get("max_new_tokens", job_params.get("max_new_tokens")),
                   seed=None if seed is None else seed + choice, sampler=sampler, choice=choice, choices=choices,
                   processing=processing, stop=stop, stop_token_ids=stop_token_ids, adapter=adapter)
            for choice in range(choices)
        )
    return groups, refused


def _processing(settings: dict, tokenizer) -> dict | None:
    """The row's processing settings that ask for something (None: none), or a ValueError naming a
    logit_bias token outside the vocabulary."""
    found = {name: value for name, value in settings.items() if value not in (None, 0, 0.0, {})}
    if settings.get("logprobs") == 0:  # logprobs 0: the chosen token's alone
        found["logprobs"] = 0
    if "logit_bias" in found:
        size = tokenizer.vocabulary_size()
        outside = [token for token in found["logit_bias"] if int(token) >= size]
        if outside:
            raise ValueError(f"logit_bias names token {outside[0]}, outside the vocabulary (0 to {size - 1})")
    return found or None


def _sampler_key(sampler) -> str:
    """The sampler as JSON, without its seed: rows get their seeds one by one (see `plan`)."""
    if isinstance(sampler, dict):
        sampler = {key: value for key, value in sampler.items() if key != "seed"}
    return json.dumps(sampler, sort_keys=True)


@functools.lru_cache(maxsize=1024)
def _is_token_sampler(key: str) -> bool:
    """Whether the sampler (as JSON) picks each row's token alone, or a ValueError naming what is wrong with it."""
    from lmq.core import samplers  # torch: imported once a job runs, not when `lmq generate` checks its flags

    sampler = json.loads(key)
    if not isinstance(sampler, (str, dict)):
        raise ValueError(f"'sampler' must be a name or an object, got {sampler!r}")
    return samplers.get(sampler).independent_rows


def _seed_of(params: dict) -> int | None:
    """`params`' seed, or its sampler's (an object may carry one)."""
    sampler = params.get("sampler")
    return params.get("seed", sampler.get("seed") if isinstance(sampler, dict) else None)


def _strings(stop) -> tuple[str, ...] | None:
    if stop is None:
        return None
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise ValueError(f"'stop' must be a list of strings, got {stop!r}")
    return tuple(stop)


def _stop_ids(stop_token_ids, end_of_turn: list[int], tokenizer) -> str | tuple[int, ...]:
    """The row's stop ids: "auto" (the tokenizer's end tokens) or ids, plus a chat's end-of-turn ids."""
    if stop_token_ids is None:
        stop_token_ids = ()
    if stop_token_ids == "auto":
        if not end_of_turn:
            return "auto"
        stop_token_ids = tokenizer.stop_token_ids
    if isinstance(stop_token_ids, str) or not all(isinstance(i, int) for i in stop_token_ids):
        raise ValueError(f"'stop_token_ids' must be \"auto\" or a list of ids, got {stop_token_ids!r}")
    return tuple(dict.fromkeys([*stop_token_ids, *end_of_turn]))
