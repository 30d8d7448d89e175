"""Preprocessors: raw strings in, packed token ids out (and back), as in KerasHub."""

import itertools
import numbers

import numpy as np

from lmq.core.models.serialization import KerasHubSerializable, deserialize, layer_config


class Preprocessor(KerasHubSerializable):
    """Base class: owns a tokenizer; serialized with the tokenizer nested inside."""

    config_file = "preprocessor.json"
    tokenizer_cls = None

    def __init__(self, tokenizer, name=None, **kwargs):
        for key in ("trainable", "dtype", "config_file"):
            kwargs.pop(key, None)
        if kwargs:
            raise ValueError(f"{type(self).__name__} got unknown arguments: {sorted(kwargs)}.")
        self.tokenizer = tokenizer
        self.name = name or self.default_name()

    def base_config(self):
        return {
            **layer_config(self.name, "float32", self.config_file),
            "tokenizer": self.tokenizer.serialize(),
        }

    @classmethod
    def from_preset(cls, preset, resolver=None, **kwargs):
        """The preprocessor a preset holds; ``kwargs`` override its config (e.g. ``sequence_length``)."""
        from lmq.core.presets import load_preprocessor

        return load_preprocessor(preset, cls=cls, resolver=resolver, **kwargs)

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        tokenizer = config.pop("tokenizer")
        if isinstance(tokenizer, dict):
            tokenizer = deserialize(tokenizer, source=cls.config_file)
        return cls(tokenizer=tokenizer, **config)


class CausalLMPreprocessor(Preprocessor):
    """Packs ``[start] tokens [end] [pad...]`` to ``sequence_length``.

    For training, ``__call__`` returns ``(x, y, sample_weight)``: ``x`` holds
    ``token_ids``/``padding_mask``, ``y`` the same ids shifted left by one (the
    next token to predict), ``sample_weight`` which of those count.
    """

    def __init__(
        self,
        tokenizer,
        sequence_length=1024,
        add_start_token=True,
        add_end_token=True,
        **kwargs,
    ):
        super().__init__(tokenizer, **kwargs)
        self.sequence_length = sequence_length
        self.add_start_token = add_start_token
        self.add_end_token = add_end_token

    def get_config(self):
        return {
            **self.base_config(),
            "sequence_length": self.sequence_length,
            "add_start_token": self.add_start_token,
            "add_end_token": self.add_end_token,
        }

    def pack(self, rows, sequence_length, add_start_token, add_end_token):
        """Lists of ids -> (token_ids, padding_mask) numpy arrays [batch, sequence_length]."""
        start = [self.tokenizer.start_token_id] if add_start_token else []
        end = [self.tokenizer.end_token_id] if add_end_token else []
        room = sequence_length - len(start) - len(end)
        token_ids = np.full((len(rows), sequence_length), self.tokenizer.pad_token_id, "int32")
        padding_mask = np.zeros((len(rows), sequence_length), bool)
        for i, row in enumerate(rows):
            packed = start + list(row)[: max(room, 0)] + end
            packed = packed[:sequence_length]
            token_ids[i, : len(packed)] = packed
            padding_mask[i, : len(packed)] = True
        return token_ids, padding_mask

    def __call__(self, x, y=None, sample_weight=None, sequence_length=None):
        """Strings are packed with the start and end tokens and every next token counts. Rows of
        token ids (a chat's, ``lmq.core.models.training_data``) are packed as they are, and
        ``sample_weight``, one weight per token of each row, says how much predicting that token
        counts (0 on a prompt's tokens: the loss falls on the completion alone)."""
        if y is not None:
            raise ValueError(
                f"{type(self).__name__} builds labels from the text itself; pass only `x` "
                "(or call fit with preprocessor=None and your own y / sample_weight)."
            )
        sequence_length = sequence_length or self.sequence_length
        if is_token_rows(x):
            rows = [list(row) for row in x]
            weights = _row_weights(rows, sample_weight)
            token_ids, padding_mask = self.pack(rows, sequence_length + 1, False, False)
            packed_weights = np.zeros(token_ids.shape, "float32")
            for i, row_weights in enumerate(weights):
                kept = row_weights[: sequence_length + 1]
                packed_weights[i, : len(kept)] = kept
            features = {"token_ids": token_ids[:, :-1], "padding_mask": padding_mask[:, :-1]}
            return features, token_ids[:, 1:], padding_mask[:, 1:] * packed_weights[:, 1:]
        if sample_weight is not None:
            raise ValueError(
                f"{type(self).__name__} takes a sample_weight per token only with rows of token ids, not with strings."
            )
        texts = [x] if isinstance(x, str) else list(x)
        _check_strings(texts)
        token_ids, padding_mask = self.pack(
            self.tokenizer.tokenize(texts),
            sequence_length + 1,
            self.add_start_token,
            self.add_end_token,
        )
        features = {"token_ids": token_ids[:, :-1], "padding_mask": padding_mask[:, :-1]}
        return features, token_ids[:, 1:], padding_mask[:, 1:]

    def generate_preprocess(self, x, sequence_length=None):
        """Prompts -> lists of ids (not padded): a string tokenized after the start token, with no
        end token; a list of ids (a chat's, ``lmq.core.chat.chat_token_ids``) as it is."""
        prompts = [x] if isinstance(x, str) else list(x)
        texts = {i: prompt for i, prompt in enumerate(prompts) if not _is_token_ids(prompt)}
        _check_strings(texts.values(), indices=texts)
        tokenized = dict(zip(texts, self.tokenizer.tokenize(list(texts.values())))) if texts else {}
        start = [self.tokenizer.start_token_id] if self.add_start_token else []
        return [start + tokenized[i] if i in tokenized else [int(t) for t in prompt] for i, prompt in enumerate(prompts)]

    def generate_postprocess(self, token_id_rows):
        """Lists of ids -> strings, with special tokens dropped."""
        special = set(self.tokenizer.special_token_ids)
        return [
            self.tokenizer.detokenize([t for t in row if t not in special]) for row in token_id_rows
        ]


def _check_strings(texts, indices=None):
    for i, text in zip(indices or itertools.count(), texts):
        if not isinstance(text, str):
            raise TypeError(f"Input {i} must be a string, got {type(text).__name__}: {text!r:.80}")


def is_token_rows(x):
    """A list of token-id rows (not strings): what ``CausalLM.fit`` takes with per-token weights."""
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(_is_token_ids(row) for row in x)


def _row_weights(rows, sample_weight):
    """One weight per token of each row (all 1 when none are given), or a ValueError naming the row."""
    if sample_weight is None:
        return [[1.0] * len(row) for row in rows]
    weights = [list(map(float, row_weights)) for row_weights in sample_weight]
    if len(weights) != len(rows):
        raise ValueError(f"sample_weight has {len(weights)} rows for {len(rows)} rows of token ids.")
    for i, (row, row_weights) in enumerate(zip(rows, weights)):
        if len(row_weights) != len(row):
            raise ValueError(f"sample_weight[{i}] has {len(row_weights)} weights for {len(row)} token ids.")
    return weights


def _is_token_ids(prompt):
    return isinstance(prompt, (list, tuple)) and len(prompt) > 0 and all(isinstance(t, numbers.Integral) for t in prompt)
