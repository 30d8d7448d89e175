"""``GenerativeTask``: what the tasks that generate text (``CausalLM``, ``Seq2SeqLM``) share.

KerasHub's compile defaults, the sampler ``compile`` sets as ``generate``'s default, and
the way from token-id prompts through the decode engine to text. A subclass turns its
inputs into prompts and names the model the engine drives.
"""

import dataclasses

import keras
from pydantic import ValidationError

from lmq.core import samplers
from lmq.core.domain.formats import ResponseFormat
from lmq.core.generation import Generation, StopStrings, decode
from lmq.core.samplers.processing import BatchProcessing, RowProcessing
from lmq.core.models.task import Task


class GenerativeTask(Task):
    default_sampler = "top_k"  # KerasHub's default

    def __init__(self, backbone, preprocessor=None, **kwargs):
        super().__init__(backbone, preprocessor, **kwargs)
        self.compile()

    def compile(self, optimizer="auto", loss="auto", *, weighted_metrics="auto", sampler=None, **kwargs):
        """KerasHub's defaults: Adam(2e-5), sparse cross-entropy on logits, weighted accuracy.
        ``sampler`` becomes ``generate``'s default; ``generate(sampler=...)`` overrides it for one call."""
        if optimizer == "auto":
            optimizer = keras.optimizers.Adam(2e-5)
        if loss == "auto":
            loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        if weighted_metrics == "auto":
            weighted_metrics = [keras.metrics.SparseCategoricalAccuracy()]
        super().compile(optimizer=optimizer, loss=loss, weighted_metrics=weighted_metrics, **kwargs)
        self.sampler = samplers.get(sampler if sampler is not None else self.default_sampler)

    def _sampler(self, sampler):
        """One ``generate`` call's sampler: its own (anything ``compile`` takes, a list included),
        else the compiled default. The call's own leaves the model unchanged, so one loaded model
        serves requests with different samplers (the job runner's)."""
        return self.sampler if sampler is None else samplers.get(sampler)

    def _decode(self, model, prompts, limits, sampler, stop_token_ids, seed, **options):
        """The decode engine with ``generate``'s ``stop_token_ids`` and ``seed`` resolved."""
        return decode(
            model,
            prompts,
            limits,
            sampler,
            stop_token_ids=self._stop_ids(stop_token_ids, len(prompts)),
            seeds=self._seeds(seed, len(prompts), sampler),
            **options,
        )

    def _processed(self, sampler, processing, rows, response_format=None):
        """(the sampler that applies ``processing``, its ``BatchProcessing``): ``processing`` and
        ``response_format`` are each one value for every row or a list of one per row; (``sampler``,
        None) when they ask nothing."""
        per_row = _per_row(processing, rows, "processing")
        for row, each in enumerate(_per_row(response_format, rows, "response_format")):
            if each is not None:
                per_row[row] = dataclasses.replace(per_row[row] or RowProcessing(), response_format=_checked_format(each))
        if not any(each is not None and each.asks_anything for each in per_row):
            return sampler, None
        if not sampler.independent_rows:
            raise ValueError(
                f"processing (penalties, logit_bias, min_p, logprobs, response_format) needs a token sampler, not {sampler.name!r}."
            )
        token_samplers = sampler.samplers if isinstance(sampler, samplers.PerRequestSampler) else [sampler] * rows
        batch_processing = BatchProcessing(
            per_row, self.backbone.token_embedding.embeddings.shape[0], self.preprocessor.tokenizer
        )
        return samplers.PerRequestSampler(token_samplers, batch_processing), batch_processing

    def _generate_texts(
        self, model, prompts, limits, sampler, *, stop_token_ids, stop, strip_prompt, seed, on_result, return_details,
        processing=None, response_format=None, **options,
    ):
        """Decodes token-id prompts through ``model`` and turns each completion into text
        (or a ``Generation``) as its row finishes."""
        stop_strings = self._stop_strings(stop, len(prompts))
        if seed is None and not isinstance(sampler, samplers.PerRequestSampler):
            seed = getattr(sampler, "seed", None)  # seed + i per row, as without processing
        sampler, batch_processing = self._processed(sampler, processing, len(prompts), response_format)

        def output(row, completion):
            prompt, ids = prompts[row], completion.token_ids
            text = self.preprocessor.generate_postprocess([ids if strip_prompt else prompt + ids])[0]
            if stop_strings[row] is not None:
                text = _cut_after_prompt(text, stop_strings[row], [] if strip_prompt else prompt)
            logprobs = None if batch_processing is None else batch_processing.take(row)
            generation = Generation(text, ids, len(prompt), len(ids), completion.finish_reason, logprobs)
            return generation if return_details else text

        outputs = {}

        def finished(row, completion):
            outputs[row] = output(row, completion)
            if on_result is not None:
                on_result(row, outputs[row])

        self._decode(
            model, prompts, limits, sampler, stop_token_ids, seed,
            stop_strings=stop_strings, on_finish=finished, **options,
        )
        return [outputs[row] for row in range(len(prompts))]

    def _stop_strings(self, stop, rows):
        """Each row's ``StopStrings`` (None: it has none): ``stop`` is strings for every row, or
        a list of one list of strings (or None) per row; rows of equal stops share one."""
        per_prompt = isinstance(stop, (list, tuple)) and any(not isinstance(each, str) for each in stop)
        per_row = _per_row(stop, rows, "stop") if per_prompt else [stop] * rows
        tokenizer = self.preprocessor.tokenizer
        shared = {key: StopStrings(tokenizer, key) for key in {tuple(each) for each in per_row if each}}
        return [shared[tuple(each)] if each else None for each in per_row]

    def _stop_ids(self, stop_token_ids, rows):
        """Each row's stop ids: ``stop_token_ids`` ("auto", None or ids) for every row, or a list of
        one such value per row."""
        per_prompt = isinstance(stop_token_ids, (list, tuple)) and any(
            each is None or isinstance(each, (str, list, tuple)) for each in stop_token_ids
        )
        if per_prompt:
            return [self._row_stop_ids(each) for each in _per_row(stop_token_ids, rows, "stop_token_ids")]
        return [self._row_stop_ids(stop_token_ids)] * rows

    def _row_stop_ids(self, stop_token_ids):
        if stop_token_ids is None:
            return ()
        if isinstance(stop_token_ids, str):
            if stop_token_ids != "auto":
                raise ValueError(f"stop_token_ids must be 'auto', None or ids, got {stop_token_ids!r}.")
            if self.preprocessor is None:
                raise ValueError(
                    'stop_token_ids="auto" needs a preprocessor (its end tokens); pass ids or None.'
                )
            return self.preprocessor.tokenizer.stop_token_ids
        return tuple(int(t) for t in stop_token_ids)

    @staticmethod
    def _seeds(seed, rows, sampler):
        """Each row's seed: ``seed[i]``, or ``seed + i`` (the sampler's seed by default); None unseeded."""
        seed = seed if seed is not None else getattr(sampler, "seed", None)
        if seed is None:
            return None
        if isinstance(seed, (list, tuple)):
            if len(seed) != rows:
                raise ValueError(f"seed has {len(seed)} values for {rows} prompts; give one per prompt or one int.")
            return [int(s) for s in seed]
        return [int(seed) + i for i in range(rows)]


def _per_row(value, rows, name):
    """One value per row: ``value`` itself when a list (of ``rows`` values), else ``value`` for every row."""
    per_row = list(value) if isinstance(value, (list, tuple)) else [value] * rows
    if len(per_row) != rows:
        raise ValueError(f"{name} has {len(per_row)} values for {rows} prompts; give one per prompt or one.")
    return per_row


def _checked_format(response_format):
    """``response_format`` as the engine takes it, or a ValueError saying what is wrong with it (a schema
    feature the grammar engine cannot compile, a missing field)."""
    try:
        return ResponseFormat.model_validate(response_format).model_dump(mode="json", exclude_none=True)
    except ValidationError as error:
        found = error.errors()[0]
        where = ".".join(str(part) for part in found["loc"])
        raise ValueError(f"response_format{'.' + where if where else ''}: {found['msg']}") from None


def token_limits(prompts, max_length, max_new_tokens):
    """Each prompt's completion limit: the room ``max_length`` leaves it, capped by its ``max_new_tokens``."""
    if max_length is None or max_length < 1:
        raise ValueError(f"max_length must be a positive integer, got {max_length!r}.")
    per_row = max_new_tokens if isinstance(max_new_tokens, (list, tuple)) else [max_new_tokens] * len(prompts)
    if len(per_row) != len(prompts):
        raise ValueError(f"max_new_tokens has {len(per_row)} values for {len(prompts)} prompts.")
    limits = []
    for i, (prompt, new_tokens) in enumerate(zip(prompts, per_row)):
        if new_tokens is not None and new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {new_tokens!r}.")
        if len(prompt) > max_length:
            raise ValueError(
                f"Prompt {i} is {len(prompt)} tokens, longer than max_length={max_length}."
            )
        room = max_length - len(prompt)
        limits.append(room if new_tokens is None else min(room, new_tokens))
    return limits


def with_completions(token_ids, padding_mask, prompts, completions):
    """Right-padded ``token_ids`` and ``padding_mask`` (copies) with each completion written after its prompt."""
    out_ids, out_mask = token_ids.copy(), padding_mask.copy()
    for i, (prompt, completion) in enumerate(zip(prompts, completions)):
        out_ids[i, len(prompt) : len(prompt) + len(completion)] = completion
        out_mask[i, : len(prompt) + len(completion)] = True
    return out_ids, out_mask


def _cut_after_prompt(text, stop_strings, prompt_ids):
    """Cuts ``text`` at the first stop string in its completion; the prompt may contain one."""
    prefix = stop_strings.text(prompt_ids) if prompt_ids else ""
    if prefix and text.startswith(prefix):
        return prefix + stop_strings.cut(text[len(prefix) :])
    return stop_strings.cut(text)
