"""``Seq2SeqLMPreprocessor``: encoder and decoder texts in, packed token ids out, as in KerasHub.

The encoder side is ``[start] tokens [end] [pad...]``; the decoder side starts with
``[end, start]`` (Bart's decoder start tokens), then ``tokens [end] [pad...]``.
Texts longer than a side's sequence length are truncated (their end token kept), as
KerasHub's ``StartEndPacker`` truncates them.
"""

import numpy as np

from lmq.core.models.preprocessor import Preprocessor, _check_strings

DEFAULT_SEQUENCE_LENGTH = 1024


class Seq2SeqLMPreprocessor(Preprocessor):
    """``__call__`` on ``{"encoder_text", "decoder_text"}`` gives ``(x, y, sample_weight)`` for
    training: ``x`` the four id/mask arrays, ``y`` the decoder ids shifted left by one."""

    def __init__(self, tokenizer, encoder_sequence_length=DEFAULT_SEQUENCE_LENGTH, decoder_sequence_length=DEFAULT_SEQUENCE_LENGTH, **kwargs):
        super().__init__(tokenizer, **kwargs)
        self.encoder_sequence_length = encoder_sequence_length
        self.decoder_sequence_length = decoder_sequence_length

    def get_config(self):
        """KerasHub's keys; a sequence length is written only when it is not the default (KerasHub
        writes neither, so its presets load with the defaults)."""
        config = self.base_config()
        for key in ("encoder_sequence_length", "decoder_sequence_length"):
            if getattr(self, key) != DEFAULT_SEQUENCE_LENGTH:
                config[key] = getattr(self, key)
        return config

    @property
    def decoder_start_ids(self):
        return [self.tokenizer.end_token_id, self.tokenizer.start_token_id]

    def encoder_ids(self, texts, sequence_length=None):
        """Encoder texts -> lists of ids ``[start] tokens [end]``, truncated to the sequence length."""
        sequence_length = sequence_length or self.encoder_sequence_length
        start, end = [self.tokenizer.start_token_id], [self.tokenizer.end_token_id]
        room = max(sequence_length - 2, 0)
        return [(start + row[:room] + end)[:sequence_length] for row in self.tokenizer.tokenize(texts)]

    def decoder_ids(self, texts, sequence_length, add_end_token):
        """Decoder texts -> lists of ids ``[end, start] tokens [end]?``, truncated to ``sequence_length``."""
        end = [self.tokenizer.end_token_id] if add_end_token else []
        room = max(sequence_length - 2 - len(end), 0)
        rows = self.tokenizer.tokenize(texts)
        return [(self.decoder_start_ids + row[:room] + end)[:sequence_length] for row in rows]

    def pad(self, rows, sequence_length):
        """Lists of ids -> (token_ids, padding_mask) [batch, sequence_length], right-padded."""
        token_ids = np.full((len(rows), sequence_length), self.tokenizer.pad_token_id, "int32")
        padding_mask = np.zeros((len(rows), sequence_length), bool)
        for i, row in enumerate(rows):
            token_ids[i, : len(row)] = row
            padding_mask[i, : len(row)] = True
        return token_ids, padding_mask

    def __call__(self, x, y=None, sample_weight=None, encoder_sequence_length=None, decoder_sequence_length=None):
        if y is not None or sample_weight is not None:
            raise ValueError(
                f"{type(self).__name__} builds labels from decoder_text itself; pass only `x` "
                "(or call fit with preprocessor=None and your own y / sample_weight)."
            )
        encoder_texts, decoder_texts = split_pairs(x)
        if decoder_texts is None:
            raise ValueError('Training needs "decoder_text" next to "encoder_text".')
        encoder_length = encoder_sequence_length or self.encoder_sequence_length
        decoder_length = decoder_sequence_length or self.decoder_sequence_length
        encoder_token_ids, encoder_padding_mask = self.pad(self.encoder_ids(encoder_texts, encoder_length), encoder_length)
        token_ids, padding_mask = self.pad(
            self.decoder_ids(decoder_texts, decoder_length + 1, add_end_token=True), decoder_length + 1
        )
        features = {
            "encoder_token_ids": encoder_token_ids,
            "encoder_padding_mask": encoder_padding_mask,
            "decoder_token_ids": token_ids[:, :-1],
            "decoder_padding_mask": padding_mask[:, :-1],
        }
        return features, token_ids[:, 1:], padding_mask[:, 1:]

    def generate_preprocess(self, x, decoder_sequence_length=None):
        """Encoder texts (a string, a list, or ``{"encoder_text", "decoder_text"}``) -> (encoder id
        lists, decoder prompt id lists ``[end, start] tokens``), neither padded."""
        encoder_texts, decoder_texts = split_pairs(x)
        if decoder_texts is None:
            decoder_texts = [""] * len(encoder_texts)
        decoder_length = decoder_sequence_length or self.decoder_sequence_length
        return self.encoder_ids(encoder_texts), self.decoder_ids(decoder_texts, decoder_length, add_end_token=False)

    def generate_postprocess(self, token_id_rows):
        """Lists of ids -> strings, with special tokens dropped."""
        special = set(self.tokenizer.special_token_ids)
        return [self.tokenizer.detokenize([t for t in row if t not in special]) for row in token_id_rows]


def split_pairs(x):
    """A string, a list of strings, or ``{"encoder_text", "decoder_text"}`` -> (encoder texts, decoder texts or None)."""
    if isinstance(x, dict):
        unknown = sorted(set(x) - {"encoder_text", "decoder_text"})
        if unknown or "encoder_text" not in x:
            raise ValueError(f'Expected {{"encoder_text", "decoder_text"}}, got keys {sorted(x)}.')
        encoder = [x["encoder_text"]] if isinstance(x["encoder_text"], str) else list(x["encoder_text"])
        decoder = x.get("decoder_text")
        if decoder is not None:
            decoder = [decoder] if isinstance(decoder, str) else list(decoder)
            if len(decoder) != len(encoder):
                raise ValueError(f"{len(encoder)} encoder_text values but {len(decoder)} decoder_text values.")
            _check_strings(decoder)
    else:
        encoder, decoder = ([x] if isinstance(x, str) else list(x)), None
    _check_strings(encoder)
    return encoder, decoder
