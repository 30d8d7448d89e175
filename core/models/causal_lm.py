"""``CausalLM``: next-token prediction, text generation, scoring and fine-tuning."""

import keras
import numpy as np
import torch

from lmq.core import samplers
from lmq.core.generation import DecoderOnlyModel, Generation, StopStrings, decode
from lmq.core.models.task import Task


class CausalLM(Task):
    task_kind = "causal_lm"
    default_sampler = "top_k"  # KerasHub's default for Llama, Mistral, Phi-3

    def __init__(self, backbone, preprocessor=None, **kwargs):
        super().__init__(backbone, preprocessor, **kwargs)
        self.compile()

    def call(self, inputs, training=False):
        """``{"token_ids", "padding_mask"}`` -> logits [batch, length, vocab]."""
        hidden = self.backbone.call(inputs, training=training)
        return self.backbone.token_embedding.reverse(hidden)

    def compile(self, optimizer="auto", loss="auto", *, weighted_metrics="auto", sampler=None, **kwargs):
        """KerasHub's defaults: Adam(2e-5), sparse cross-entropy on logits, weighted accuracy."""
        if optimizer == "auto":
            optimizer = keras.optimizers.Adam(2e-5)
        if loss == "auto":
            loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        if weighted_metrics == "auto":
            weighted_metrics = [keras.metrics.SparseCategoricalAccuracy()]
        super().compile(optimizer=optimizer, loss=loss, weighted_metrics=weighted_metrics, **kwargs)
        self.sampler = samplers.get(sampler if sampler is not None else self.default_sampler)

    # -- training -----------------------------------------------------------------------

    def fit(self, x=None, y=None, batch_size=None, sample_weight=None, validation_data=None, **kwargs):
        """Raw strings go through the preprocessor; token-id dicts are used as given."""
        if _is_text(x):
            x, y, sample_weight = self._preprocess_for_training(x, y, sample_weight)
        if _is_text(validation_data):
            validation_data = self._preprocess_for_training(validation_data, None, None)
        return super().fit(
            x=x,
            y=y,
            batch_size=batch_size,
            sample_weight=sample_weight,
            validation_data=validation_data,
            **kwargs,
        )

    def evaluate(self, x=None, y=None, batch_size=None, sample_weight=None, **kwargs):
        if _is_text(x):
            x, y, sample_weight = self._preprocess_for_training(x, y, sample_weight)
        return super().evaluate(x=x, y=y, batch_size=batch_size, sample_weight=sample_weight, **kwargs)

    def _preprocess_for_training(self, x, y, sample_weight):
        if self.preprocessor is None:
            raise ValueError("This task has no preprocessor: pass token ids, not strings.")
        return self.preprocessor([x] if isinstance(x, str) else list(x), y, sample_weight)

    # -- scoring ------------------------------------------------------------------------

    def score(self, token_ids, padding_mask=None, scoring_mode="logits", target_ids=None):
        """Logits [batch, length, vocab], or per-token loss [batch, length] ("loss").

        For "loss", ``target_ids`` default to the next token; positions with no
        next token (or padding) score 0.
        """
        if scoring_mode not in ("logits", "loss"):
            raise ValueError(f"scoring_mode must be 'logits' or 'loss', got {scoring_mode!r}.")
        token_ids = torch.as_tensor(np.asarray(token_ids), device=self.backbone.device).long()
        if padding_mask is None:
            padding_mask = torch.ones_like(token_ids, dtype=torch.bool)
        padding_mask = torch.as_tensor(np.asarray(padding_mask), device=token_ids.device).bool()
        with torch.inference_mode():
            logits = self.call({"token_ids": token_ids, "padding_mask": padding_mask})
            if scoring_mode == "logits":
                return logits
            if target_ids is None:
                target_ids = torch.roll(token_ids, -1, dims=1)
                weights = torch.roll(padding_mask, -1, dims=1) & padding_mask
                weights[:, -1] = False
            else:
                target_ids = torch.as_tensor(np.asarray(target_ids), device=token_ids.device).long()
                weights = padding_mask
            losses = torch.nn.functional.cross_entropy(
                logits.float().transpose(1, 2), target_ids, reduction="none"
            )
            return losses * weights

    # -- generation ---------------------------------------------------------------------

    def generate(
        self,
        inputs,
        max_length=None,
        stop_token_ids="auto",
        strip_prompt=False,
        *,
        max_new_tokens=None,
        stop=None,
        seed=None,
        stream=None,
        on_result=None,
        max_rows=None,
        max_cache_tokens=None,
        between_steps=None,
        return_details=False,
    ):
        """Generates text for a prompt or a list of prompts (KerasHub semantics, plus more).

        A prompt is a string (the start token is added before its ids) or a list of token ids,
        used as they are (a chat's, from ``lmq.core.chat.chat_token_ids``).

        - ``max_length``: prompt plus completion, in tokens (default: the
          preprocessor's ``sequence_length``); ``max_new_tokens`` caps the completion
          (one number for every row, or a list with one per row).
        - ``stop_token_ids``: "auto" (the tokenizer's end tokens), None, or a sequence of ids.
        - ``stop``: strings; a row stops when its completion contains one, which is cut off.
        - ``seed``: makes a sampling sampler reproducible: row i draws from its own
          generator seeded ``seed + i`` (or ``seed[i]``, a list), so a row's output
          depends on its prompt and seed, never on the other rows.
        - ``stream``: ``stream(row, token_id)`` is called for each new token.
        - ``on_result``: ``on_result(row, output)`` is called as each row finishes, with
          what the return value holds for that row.
        - ``max_rows``, ``max_cache_tokens``: the most rows decoded at once, and KV-cache
          positions (rows x positions per row); the other prompts join as rows finish
          (continuous batching). By default every prompt runs at once.
        - ``between_steps()``: called before each decode step; what it raises ends the call.
        - ``return_details``: ``Generation`` records (text, token counts, finish reason).

        Without a preprocessor, ``inputs`` is ``{"token_ids", "padding_mask"}``
        (right-padded) and the same dict comes back with the completions written in.
        """
        batching = dict(max_rows=max_rows, max_cache_tokens=max_cache_tokens, between_steps=between_steps)
        if isinstance(inputs, dict):
            return self._generate_from_ids(inputs, stop_token_ids, max_new_tokens, seed, stream, batching)
        if self.preprocessor is None:
            raise ValueError(
                "This task has no preprocessor: pass {'token_ids', 'padding_mask'}, not strings."
            )
        single = isinstance(inputs, str)
        prompts = self.preprocessor.generate_preprocess([inputs] if single else inputs)
        if max_length is None:
            max_length = self.preprocessor.sequence_length
        limits = _limits(prompts, max_length, max_new_tokens)
        outputs = self._generate_texts(
            DecoderOnlyModel(self.backbone, self.preprocessor.tokenizer.pad_token_id),
            prompts,
            limits,
            stop_token_ids,
            stop,
            strip_prompt,
            seed,
            stream,
            on_result,
            return_details,
            batching,
        )
        return outputs[0] if single else outputs

    def _generate_texts(
        self, model, prompts, limits, stop_token_ids, stop, strip_prompt, seed, stream, on_result,
        return_details, batching,
    ):
        """Decodes token-id prompts through ``model`` and turns each completion into text
        (or a ``Generation``) as its row finishes; the causal and seq2seq tasks share it."""
        stop_strings = StopStrings(self.preprocessor.tokenizer, stop) if stop else None

        def output(row, completion):
            prompt, ids = prompts[row], completion.token_ids
            text = self.preprocessor.generate_postprocess([ids if strip_prompt else prompt + ids])[0]
            if stop_strings is not None:
                text = _cut_after_prompt(text, stop_strings, [] if strip_prompt else prompt)
            generation = Generation(text, ids, len(prompt), len(ids), completion.finish_reason)
            return generation if return_details else text

        outputs = {}

        def finished(row, completion):
            outputs[row] = output(row, completion)
            if on_result is not None:
                on_result(row, outputs[row])

        decode(
            model,
            prompts,
            limits,
            self.sampler,
            stop_token_ids=self._stop_ids(stop_token_ids),
            seeds=self._seeds(seed, len(prompts)),
            stop_strings=stop_strings,
            stream=stream,
            on_finish=finished,
            **batching,
        )
        return [outputs[row] for row in range(len(prompts))]

    def _generate_from_ids(self, inputs, stop_token_ids, max_new_tokens, seed, stream, batching):
        token_ids = np.asarray(inputs["token_ids"])
        padding_mask = np.asarray(inputs.get("padding_mask", np.ones_like(token_ids))).astype(bool)
        if token_ids.ndim != 2 or token_ids.shape != padding_mask.shape:
            raise ValueError(
                f"token_ids and padding_mask must be equal [batch, length] arrays, got "
                f"{token_ids.shape} and {padding_mask.shape}."
            )
        lengths = padding_mask.sum(axis=1)
        if not all(padding_mask[i, :n].all() for i, n in enumerate(lengths)):
            raise ValueError("padding_mask must be right-padded: each row's prompt first, then padding.")
        if (lengths == 0).any():
            raise ValueError("Each row needs at least one prompt token.")
        prompts = [row[:n].tolist() for row, n in zip(token_ids, lengths)]
        max_length = token_ids.shape[1]
        result = decode(
            DecoderOnlyModel(self.backbone),
            prompts,
            _limits(prompts, max_length, max_new_tokens),
            self.sampler,
            stop_token_ids=self._stop_ids(stop_token_ids),
            seeds=self._seeds(seed, len(prompts)),
            stream=stream,
            **batching,
        )
        out_ids, out_mask = token_ids.copy(), padding_mask.copy()
        for i, (prompt, completion) in enumerate(zip(prompts, result.completions)):
            out_ids[i, len(prompt) : len(prompt) + len(completion)] = completion
            out_mask[i, : len(prompt) + len(completion)] = True
        return {"token_ids": out_ids, "padding_mask": out_mask}

    def _stop_ids(self, stop_token_ids):
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

    def _seeds(self, seed, rows):
        """Each row's seed: ``seed[i]``, or ``seed + i`` (the sampler's seed by default); None unseeded."""
        seed = seed if seed is not None else getattr(self.sampler, "seed", None)
        if seed is None:
            return None
        if isinstance(seed, (list, tuple)):
            if len(seed) != rows:
                raise ValueError(f"seed has {len(seed)} values for {rows} prompts; give one per prompt or one int.")
            return [int(s) for s in seed]
        return [int(seed) + i for i in range(rows)]


def _limits(prompts, max_length, max_new_tokens):
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


def _cut_after_prompt(text, stop_strings, prompt_ids):
    """Cuts ``text`` at the first stop string in its completion; the prompt may contain one."""
    prefix = stop_strings.text(prompt_ids) if prompt_ids else ""
    if prefix and text.startswith(prefix):
        return prefix + stop_strings.cut(text[len(prefix) :])
    return stop_strings.cut(text)


def _is_text(x):
    if isinstance(x, str):
        return True
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(isinstance(i, str) for i in x)
