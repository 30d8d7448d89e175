"""``CausalLM``: next-token prediction, text generation, scoring and fine-tuning."""

import numpy as np
import torch

from lmq.core.adapters import ADAPTER_CONFIG, AdapterBank, is_adapter_preset, read_adapter
from lmq.core.generation import DecoderOnlyModel
from lmq.core.models.generative_task import GenerativeTask, token_limits, with_completions
from lmq.core.models.preprocessor import is_token_rows
from lmq.core.names import TaskKind
from lmq.core.presets.resolver import PresetResolver


class CausalLM(GenerativeTask):
    task_kind = TaskKind.causal_lm

    def call(self, inputs, training=False):
        """``{"token_ids", "padding_mask"}`` -> logits [batch, length, vocab]."""
        hidden = self.backbone.call(inputs, training=training)
        return self.backbone.token_embedding.reverse(hidden)

    # -- training -----------------------------------------------------------------------

    def fit(self, x=None, y=None, batch_size=None, sample_weight=None, validation_data=None, **kwargs):
        """Raw strings go through the preprocessor, and so do rows of token ids with one weight per
        token in ``sample_weight`` (``lmq.core.models.training_data``: the loss on a chat's
        assistant turns only), and ``validation_data`` as ``(rows, None, weights)``; token-id
        dicts are used as given."""
        if _is_text(x) or is_token_rows(x):
            x, y, sample_weight = self._preprocess_for_training(x, y, sample_weight)
        if _is_text(validation_data):
            validation_data = self._preprocess_for_training(validation_data, None, None)
        elif isinstance(validation_data, tuple) and is_token_rows(validation_data[0]):
            rows, labels, weights = (*validation_data, None)[:3]
            validation_data = self._preprocess_for_training(rows, labels, weights)
        return super().fit(
            x=x,
            y=y,
            batch_size=batch_size,
            sample_weight=sample_weight,
            validation_data=validation_data,
            **kwargs,
        )

    def evaluate(self, x=None, y=None, batch_size=None, sample_weight=None, **kwargs):
        if _is_text(x) or is_token_rows(x):
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

    # -- adapters -----------------------------------------------------------------------

    @property
    def adapters(self):
        """The ``AdapterBank`` of adapters loaded over this model, which ``generate`` rows may name."""
        if getattr(self, "_adapter_bank", None) is None:
            self._adapter_bank = AdapterBank()
        return self._adapter_bank

    def load_adapter(self, preset, name=None, resolver=None):
        """Loads an adapter preset (``lmq.core.adapters``) of this model's base, to be named by
        ``generate(adapter=name)`` (default: the handle); this model's weights stay as they are,
        so many adapters serve over one base. Returns the ``Adapter``."""
        files = (resolver or PresetResolver()).files(preset)
        if not is_adapter_preset(files):
            raise ValueError(f"Preset {files.name!r} is no adapter preset (it has no {ADAPTER_CONFIG}, or a model of its own).")
        adapter = read_adapter(files, self.backbone, name or str(preset))
        self.adapters.add(adapter)
        return adapter

    # -- generation ---------------------------------------------------------------------

    def generate(
        self,
        inputs,
        max_length=None,
        stop_token_ids="auto",
        strip_prompt=False,
        *,
        sampler=None,
        max_new_tokens=None,
        stop=None,
        seed=None,
        stream=None,
        on_result=None,
        max_rows=None,
        max_cache_tokens=None,
        between_steps=None,
        return_details=False,
        processing=None,
        response_format=None,
        adapter=None,
        engine=None,
        priority=0,
        tenant=None,
    ):
        """Generates text for a prompt or a list of prompts (KerasHub semantics, plus more).

        A prompt is a string (the start token is added before its ids) or a list of token ids,
        used as they are (a chat's, from ``lmq.core.chat.chat_token_ids``).

        - ``sampler``: this call's sampler, in place of the compiled one (an lmq extension;
          anything ``compile(sampler=...)`` takes, a list of one per prompt included).
        - ``max_length``: prompt plus completion, in tokens (default: the
          preprocessor's ``sequence_length``); ``max_new_tokens`` caps the completion
          (one number for every row, or a list with one per row).
        - ``stop_token_ids``: "auto" (the tokenizer's end tokens), None, or a sequence of ids;
          or a list of one such value per row.
        - ``stop``: strings; a row stops when its completion contains one, which is cut off.
          Or a list of one list of strings (or None) per row: rows of different stops decode
          in one pass, and only the rows with stop strings have their text decoded per token.
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
        - ``processing``: a ``RowProcessing`` (``lmq.core.samplers.processing``: penalties,
          logit bias, min-p, log-probabilities) for every row, or a list of one per row (None:
          nothing); rows choose in one pass with their own. Needs a token sampler.
        - ``response_format``: a structured output for every row, or a list of one per row (None:
          free text): OpenAI's ``{"type": "json_schema", "json_schema": {"name", "schema"}}`` or
          ``{"type": "json_object"}``, or ``{"type": "regex", "regex"}``, ``{"type": "choice",
          "choice": [...]}``. A row's tokens are masked to its grammar, which ends the row once
          complete; a format the grammar engine cannot compile is a ValueError naming what.
        - ``adapter``: the name of an adapter loaded with ``load_adapter`` for every row, or a list
          of one per row (None: the base alone); rows of different adapters decode in one batch.
        - ``engine``: a running ``lmq.core.generation.Engine`` of this model's (a worker's shared
          one) that the prompts join, beside other callers' requests, as a group of ``priority``
          (lower first) and ``tenant``; ``max_rows`` then caps this call's requests in flight and
          the engine's own budget holds. Token samplers only: a search runs in its own engine.

        Without a preprocessor, ``inputs`` is ``{"token_ids", "padding_mask"}``
        (right-padded) and the same dict comes back with the completions written in.
        """
        sampler = self._sampler(sampler)
        options = dict(
            stream=stream, max_rows=max_rows, max_cache_tokens=max_cache_tokens, between_steps=between_steps, adapters=adapter
        )
        if engine is not None:
            options.update(engine=engine, job_priority=priority, tenant=tenant)
        if isinstance(inputs, dict):
            return self._generate_from_ids(inputs, sampler, stop_token_ids, max_new_tokens, seed, **options)
        if self.preprocessor is None:
            raise ValueError(
                "This task has no preprocessor: pass {'token_ids', 'padding_mask'}, not strings."
            )
        single = isinstance(inputs, str)
        prompts = self.preprocessor.generate_preprocess([inputs] if single else inputs)
        if max_length is None:
            max_length = self.preprocessor.sequence_length
        outputs = self._generate_texts(
            DecoderOnlyModel(self.backbone, self.adapters),
            prompts,
            token_limits(prompts, max_length, max_new_tokens),
            sampler,
            stop_token_ids=stop_token_ids,
            stop=stop,
            strip_prompt=strip_prompt,
            seed=seed,
            on_result=on_result,
            return_details=return_details,
            processing=processing,
            response_format=response_format,
            **options,
        )
        return outputs[0] if single else outputs

    def _generate_from_ids(self, inputs, sampler, stop_token_ids, max_new_tokens, seed, **options):
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
        limits = token_limits(prompts, token_ids.shape[1], max_new_tokens)
        model = DecoderOnlyModel(self.backbone, self.adapters)
        result = self._decode(model, prompts, limits, sampler, stop_token_ids, seed, **options)
        out_ids, out_mask = with_completions(token_ids, padding_mask, prompts, result.completions)
        return {"token_ids": out_ids, "padding_mask": out_mask}


def _is_text(x):
    if isinstance(x, str):
        return True
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(isinstance(i, str) for i in x)
