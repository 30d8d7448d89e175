"""``Seq2SeqLM``: an encoder-decoder that generates text from an input text (summarisation,
translation, rewriting), on the same decode engine as ``CausalLM``."""

import numpy as np
import torch

from lmq.core.models.generative_task import GenerativeTask, token_limits, with_completions
from lmq.core.models.seq2seq_lm_preprocessor import split_pairs
from lmq.core.names import TaskKind


class EncoderDecoderModel:
    """An encoder-decoder backbone (``BartBackbone``) as the decode engine drives it.

    The engine's prompts are the decoder prompts (the decoder start tokens); the
    encoder inputs are kept here, by request id: ``prefill`` encodes each request's
    once, into the cache's ``EncoderMemory``, which every decoder step attends to.
    """

    def __init__(self, backbone, encoder_inputs, pad_token_id, sampler):
        self.backbone = backbone
        self.encoder_inputs = encoder_inputs  # request id -> encoder token ids
        self.pad_token_id = pad_token_id
        self.device = backbone.device
        # The rows the engine gives each request (beams): they share its encoder memory.
        self.rows_per_request = sampler.rows_per_prompt(backbone.token_embedding.embeddings.shape[0])

    def new_cache(self, rows, max_length, prompt_width):
        encoder_length = max(len(ids) for ids in self.encoder_inputs)
        return self.backbone.new_cache(rows, max_length, encoder_length, self.rows_per_request)

    def _padded(self, rows):
        width = max(len(r) for r in rows)
        token_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        padding_mask = torch.zeros((len(rows), width), dtype=torch.bool)
        for i, row in enumerate(rows):
            token_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            padding_mask[i, : len(row)] = True
        return token_ids.to(self.device), padding_mask.to(self.device)

    def prefill(self, cache, prompts, rows, requests):
        """Encodes the requests' inputs and runs their decoder prompts; hidden [prompts, width, hidden]."""
        encoder_ids, encoder_mask = self._padded([self.encoder_inputs[r] for r in requests])
        decoder_ids, _ = self._padded(prompts)
        return self.backbone.prefill(encoder_ids, encoder_mask, decoder_ids, cache, rows)

    def step(self, cache, tokens, positions, key_length):
        return self.backbone.decode(tokens[:, None], positions, cache, key_length)[:, 0]

    def logits(self, hidden):
        return self.backbone.token_embedding.reverse(hidden)


class Seq2SeqLM(GenerativeTask):
    task_kind = TaskKind.seq2seq_lm

    def call(self, inputs, training=False):
        """``{"encoder_token_ids", "encoder_padding_mask", "decoder_token_ids", "decoder_padding_mask"}``
        -> decoder logits [batch, decoder length, vocab]."""
        hidden = self.backbone.call(inputs, training=training)["decoder_sequence_output"]
        return self.backbone.token_embedding.reverse(hidden)

    # -- training -----------------------------------------------------------------------

    def fit(self, x=None, y=None, batch_size=None, sample_weight=None, validation_data=None, **kwargs):
        """``{"encoder_text", "decoder_text"}`` goes through the preprocessor; token-id dicts are used as given."""
        if _is_text_pairs(x):
            x, y, sample_weight = self._preprocess_for_training(x)
        if _is_text_pairs(validation_data):
            validation_data = self._preprocess_for_training(validation_data)
        return super().fit(
            x=x, y=y, batch_size=batch_size, sample_weight=sample_weight, validation_data=validation_data, **kwargs
        )

    def evaluate(self, x=None, y=None, batch_size=None, sample_weight=None, **kwargs):
        if _is_text_pairs(x):
            x, y, sample_weight = self._preprocess_for_training(x)
        return super().evaluate(x=x, y=y, batch_size=batch_size, sample_weight=sample_weight, **kwargs)

    def _preprocess_for_training(self, x):
        if self.preprocessor is None:
            raise ValueError("This task has no preprocessor: pass token ids, not strings.")
        return self.preprocessor(x)

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
        prefix_cache=True,
        return_details=False,
        processing=None,
        response_format=None,
    ):
        """Generates decoder text for an encoder text, a list of them, or
        ``{"encoder_text", "decoder_text"}`` (the decoder text starts the output), with
        ``CausalLM.generate``'s options. ``max_length`` counts decoder tokens (default: the
        preprocessor's ``decoder_sequence_length``). ``prefix_cache`` is accepted and has no
        effect: a decoder's keys depend on its encoder's input as well as its own tokens.

        Without a preprocessor, ``inputs`` is ``{"encoder_token_ids", "encoder_padding_mask",
        "decoder_token_ids", "decoder_padding_mask"}`` (right-padded); the same dict comes back
        with the completions written into the decoder ids.
        """
        sampler = self._sampler(sampler)
        options = dict(
            stream=stream, max_rows=max_rows, max_cache_tokens=max_cache_tokens, between_steps=between_steps,
            prefix_cache=prefix_cache,
        )
        if isinstance(inputs, dict) and "encoder_token_ids" in inputs:
            return self._generate_from_ids(inputs, sampler, stop_token_ids, max_new_tokens, seed, **options)
        if self.preprocessor is None:
            raise ValueError("This task has no preprocessor: pass the token-id dict, not strings.")
        single = isinstance(inputs, str) or (isinstance(inputs, dict) and isinstance(inputs.get("encoder_text"), str))
        encoder_inputs, prompts = self.preprocessor.generate_preprocess(inputs)
        max_length = max_length or self.preprocessor.decoder_sequence_length
        outputs = self._generate_texts(
            EncoderDecoderModel(self.backbone, encoder_inputs, self.preprocessor.tokenizer.pad_token_id, sampler),
            prompts,
            self._limits(prompts, max_length, max_new_tokens),
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

    def _limits(self, prompts, max_length, max_new_tokens):
        """Each prompt's token limit within ``max_length`` decoder tokens; the positions they
        reach must be learned ones (checked here once, not at every decode step)."""
        limits = token_limits(prompts, max_length, max_new_tokens)
        self.backbone.decoder_position_embedding.check(max((len(p) + n for p, n in zip(prompts, limits)), default=0))
        return limits

    def _generate_from_ids(self, inputs, sampler, stop_token_ids, max_new_tokens, seed, **options):
        encoder_inputs = _unpadded(inputs, "encoder")
        prompts = _unpadded(inputs, "decoder")
        decoder_ids = np.asarray(inputs["decoder_token_ids"])
        result = self._decode(
            EncoderDecoderModel(self.backbone, encoder_inputs, self._pad_id(), sampler),
            prompts,
            self._limits(prompts, decoder_ids.shape[1], max_new_tokens),
            sampler,
            stop_token_ids,
            seed,
            **options,
        )
        decoder_mask = np.asarray(inputs["decoder_padding_mask"]).astype(bool)
        out_ids, out_mask = with_completions(decoder_ids, decoder_mask, prompts, result.completions)
        return {**inputs, "decoder_token_ids": out_ids, "decoder_padding_mask": out_mask}

    def _pad_id(self):
        return self.preprocessor.tokenizer.pad_token_id if self.preprocessor is not None else 0


def _unpadded(inputs, side):
    """The rows of ``{side}_token_ids`` without their right padding, as lists of ids."""
    token_ids = np.asarray(inputs[f"{side}_token_ids"])
    padding_mask = np.asarray(inputs.get(f"{side}_padding_mask", np.ones_like(token_ids))).astype(bool)
    if token_ids.ndim != 2 or token_ids.shape != padding_mask.shape:
        raise ValueError(
            f"{side}_token_ids and {side}_padding_mask must be equal [batch, length] arrays, got "
            f"{token_ids.shape} and {padding_mask.shape}."
        )
    lengths = padding_mask.sum(axis=1)
    if not all(padding_mask[i, :n].all() for i, n in enumerate(lengths)) or (lengths == 0).any():
        raise ValueError(f"{side}_padding_mask must be right-padded, with at least one token per row.")
    return [row[:n].tolist() for row, n in zip(token_ids, lengths)]


def _is_text_pairs(x):
    if not isinstance(x, dict) or "encoder_text" not in x:
        return False
    split_pairs(x)  # a clear error for a malformed dict
    return True
