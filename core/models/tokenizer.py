"""Tokenizers: strings <-> token ids, special tokens, and the files a preset keeps.

``SentencePieceTokenizer`` wraps the ``sentencepiece`` package (Llama, Mistral, Phi-3),
``BytePairTokenizer`` the ``tokenizers`` package (byte-level BPE: Falcon); both
keep KerasHub's constructor arguments, config and asset file names.
"""

import json
import pathlib
import re

import sentencepiece
import tokenizers

from lmq.core.models.serialization import KerasHubSerializable, layer_config
from lmq.core.presets.files import preset_files

SENTENCEPIECE_ASSET = "vocabulary.spm"
# sentencepiece_model.proto's piece types that transformers' converter makes added tokens
UNKNOWN_PIECE, CONTROL_PIECE, USER_DEFINED_PIECE = 2, 3, 4
SPECIAL_PIECE_TYPES = (UNKNOWN_PIECE, CONTROL_PIECE, USER_DEFINED_PIECE)
VOCABULARY_ASSET, MERGES_ASSET = "vocabulary.json", "merges.txt"


class Tokenizer(KerasHubSerializable):
    """Base class. Subclasses name their special tokens as class attributes; an architecture
    that converts transformers checkpoints has a tokenizer with ``from_transformers_checkpoint``
    (SentencePiece and byte-level BPE have one)."""

    config_file = "tokenizer.json"
    asset_fields = ()  # constructor arguments that can name a file: a preset's config may not
    start_token = None
    end_token = None
    pad_token = None  # None: id 0 pads (KerasHub's choice for SentencePiece models)
    end_of_turn_token = None  # a chat model's second end (Llama 3's <|eot_id|>): it stops generation too
    control_tokens = ()  # other special tokens (chat headers), matched whole and dropped from outputs
    chat_template = None  # the preset's jinja2 chat template (core.chat renders it), set when a preset loads
    chat_template_source = None  # where that template came from, or why there is none (for messages)
    checkpoint_tokenization = {}  # what a checkpoint's tokenizer_config.json says of tokenize_with_special_tokens' settings

    def __init__(self, name=None, **kwargs):
        for key in ("trainable", "dtype", "config_file"):
            kwargs.pop(key, None)
        if kwargs:
            raise ValueError(f"{type(self).__name__} got unknown arguments: {sorted(kwargs)}.")
        self.name = name or self.default_name()

    @classmethod
    def from_preset(cls, preset, resolver=None):
        """The tokenizer a preset holds; ``resolver``: see ``lmq.core.presets``."""
        from lmq.core.presets import load_tokenizer

        return load_tokenizer(preset, cls=cls, resolver=resolver)

    @property
    def special_tokens(self):
        roles = {
            "start_token": self.start_token,
            "end_token": self.end_token,
            "pad_token": self.pad_token,
            "end_of_turn_token": self.end_of_turn_token,
            **{f"control_token_{i}": token for i, token in enumerate(self.control_tokens)},
        }
        return {role: token for role, token in roles.items() if token is not None}

    def _check_special_tokens(self):
        for role, token in self.special_tokens.items():
            if self.token_to_id(token) is None:
                raise ValueError(f"{type(self).__name__}: the vocabulary has no {role} {token!r}.")

    @property
    def start_token_id(self):
        return None if self.start_token is None else self.token_to_id(self.start_token)

    @property
    def end_token_id(self):
        return None if self.end_token is None else self.token_to_id(self.end_token)

    @property
    def pad_token_id(self):
        return 0 if self.pad_token is None else self.token_to_id(self.pad_token)

    @property
    def stop_token_ids(self):
        """The ids that end a generation: the end token, and the end-of-turn token if any."""
        ends = (self.end_token, self.end_of_turn_token)
        return tuple(dict.fromkeys(self.token_to_id(t) for t in ends if t is not None))

    @property
    def special_token_ids(self):
        return sorted({self.token_to_id(t) for t in self.special_tokens.values()})

    def tokenize(self, inputs):
        """A string -> list of ids; a list of strings -> list of lists."""
        if isinstance(inputs, str):
            return self._encode([inputs])[0]
        return self._encode(list(inputs))

    def tokenize_with_special_tokens(self, text, legacy=False, rstrip=()):
        """The ids of ``text`` in which special tokens are written out (a rendered chat), as
        transformers' tokenizer of this vocabulary reads it, adding no start token. Byte-level BPE
        already reads them whole in ``tokenize``; SentencePiece overrides this."""
        return self.tokenize(text)

    def detokenize(self, ids):
        """A list of ids -> string; a list of lists -> list of strings."""
        ids = _to_list(ids)
        if ids and isinstance(ids[0], list):
            return [self._decode(row) for row in ids]
        return self._decode(ids)

    def __call__(self, inputs):
        return self.tokenize(inputs)

    def base_config(self):
        return layer_config(self.name, "int32", self.config_file)


class SentencePieceTokenizer(Tokenizer):
    """SentencePiece model; ``proto`` is a path to a ``.model`` file or its bytes."""

    asset_fields = ("proto",)

    def __init__(self, proto=None, sequence_length=None, add_bos=False, add_eos=False, **kwargs):
        super().__init__(**kwargs)
        self.sequence_length = sequence_length
        self.add_bos = add_bos
        self.add_eos = add_eos
        self._processor = None
        if proto is not None:
            self.set_proto(proto)

    def set_proto(self, proto):
        if isinstance(proto, (str, pathlib.Path)):
            path = pathlib.Path(proto)
            if not path.is_file():
                raise FileNotFoundError(f"SentencePiece model file not found: {path}")
            proto = path.read_bytes()
        processor = sentencepiece.SentencePieceProcessor()
        try:
            processor.LoadFromSerializedProto(proto)
        except Exception:  # sentencepiece says only that parsing failed
            raise ValueError("Not a valid SentencePiece model.") from None
        self._proto = proto
        self._processor = processor
        self._check_special_tokens()
        self._without_dummy_prefix = None
        self._special_pieces_and_pattern = None

    @property
    def processor(self):
        if self._processor is None:
            raise ValueError(
                f"{type(self).__name__} has no vocabulary yet: pass `proto=` or load it from a preset."
            )
        return self._processor

    def vocabulary_size(self):
        return self.processor.GetPieceSize()

    def token_to_id(self, token):
        token_id = self.processor.PieceToId(token)
        if token_id == self.processor.unk_id() and token != self.processor.IdToPiece(token_id):
            return None
        return token_id

    def id_to_token(self, token_id):
        return self.processor.IdToPiece(int(token_id))

    def _encode(self, texts):
        return self.processor.Encode(texts, add_bos=self.add_bos, add_eos=self.add_eos)

    def _decode(self, ids):
        return self.processor.Decode(ids)

    def tokenize_with_special_tokens(self, text, legacy=False, rstrip=()):
        """``text`` split at the pieces transformers' converter makes added tokens (control,
        unknown and user-defined pieces: ``<s>``, ``</s>``, Phi-3's ``<|user|>``), each its id,
        and each stretch between them encoded alone. A stretch gets SentencePiece's leading ``▁``
        as transformers' Metaspace gives it: at the text's start only, or after every special
        piece with ``legacy`` (the checkpoint's ``legacy: true``), and never before a space. The
        whitespace after a token in ``rstrip`` is dropped, as transformers' ``AddedToken(rstrip=True)``.

        ``tokenize`` reads ``<s>`` written in text as characters, as KerasHub's tokenizer does."""
        special, pattern = self._special_pieces()
        ids, offset, previous = [], 0, None
        for stretch in pattern.split(text):  # text, special piece, text, ...
            if stretch in special:
                ids.append(special[stretch])
            else:
                if previous in rstrip:
                    stripped = stretch.lstrip()
                    offset, stretch = offset + len(stretch) - len(stripped), stripped
                if stretch:
                    prefixed = (legacy or offset == 0) and not stretch.startswith(" ")
                    processor = self.processor if prefixed else self._processor_without_dummy_prefix()
                    ids.extend(processor.Encode(stretch))
            offset, previous = offset + len(stretch), stretch
        return ids

    def _special_pieces(self):
        """({special piece: id}, the pattern that splits text at them, longest first)."""
        if self._special_pieces_and_pattern is None:
            pieces = {self.id_to_token(i): i for i in _piece_ids_of_types(self._proto, SPECIAL_PIECE_TYPES)}
            alternatives = "|".join(re.escape(piece) for piece in sorted(pieces, key=len, reverse=True))
            self._special_pieces_and_pattern = pieces, re.compile(f"({alternatives})")
        return self._special_pieces_and_pattern

    def _processor_without_dummy_prefix(self):
        """The model with ``normalizer_spec.add_dummy_prefix = false``: a second ``normalizer_spec``
        (field 3) holding only ``add_dummy_prefix`` (its field 3, false) is merged into the first,
        as protobuf merges a message field that appears twice."""
        if self._without_dummy_prefix is None:
            processor = sentencepiece.SentencePieceProcessor()
            processor.LoadFromSerializedProto(self._proto + b"\x1a\x02\x18\x00")
            self._without_dummy_prefix = processor
        return self._without_dummy_prefix

    def get_config(self):
        return {
            **self.base_config(),
            "proto": None,
            "sequence_length": self.sequence_length,
            "add_bos": self.add_bos,
            "add_eos": self.add_eos,
        }

    @classmethod
    def from_transformers_checkpoint(cls, directory):
        """The checkpoint's SentencePiece ``tokenizer.model``, or None without one."""
        files = preset_files(directory)
        if not files.is_file("tokenizer.model"):
            return None
        tokenizer = cls()
        tokenizer._load_proto(files, "tokenizer.model")
        return tokenizer

    def save_assets(self, directory):
        path = pathlib.Path(directory) / SENTENCEPIECE_ASSET
        path.write_bytes(self._proto)

    def load_assets(self, directory):
        """Reads ``vocabulary.spm`` from ``directory`` (a path or a preset's ``PresetFiles``)."""
        self._load_proto(preset_files(directory), SENTENCEPIECE_ASSET)

    def _load_proto(self, files, name):
        try:
            self.set_proto(files.read_bytes(name))
        except ValueError as error:  # its messages quote no file content
            raise files.error(name, str(error)) from None


class BytePairTokenizer(Tokenizer):
    """GPT-2-style byte-level BPE: ``vocabulary`` {token: id} and ``merges`` ["a b", ...],
    each given as data or as a path to ``vocabulary.json`` / ``merges.txt``.

    ``unsplittable_tokens`` (default: the special tokens) are matched whole in the
    text before pre-tokenization, as KerasHub does; they must be in the vocabulary.
    """

    def __init__(
        self,
        vocabulary=None,
        merges=None,
        sequence_length=None,
        add_prefix_space=False,
        unsplittable_tokens=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.sequence_length = sequence_length
        self.add_prefix_space = add_prefix_space
        if unsplittable_tokens is None:
            unsplittable_tokens = list(dict.fromkeys(self.special_tokens.values()))
        self.unsplittable_tokens = list(unsplittable_tokens)
        self._processor = None
        if vocabulary is not None or merges is not None:
            self.set_vocabulary_and_merges(vocabulary, merges)

    asset_fields = ("vocabulary", "merges")

    def set_vocabulary_and_merges(self, vocabulary, merges):
        """Data or file paths, as KerasHub takes them; each merge must join two tokens into a third."""
        if isinstance(vocabulary, (str, pathlib.Path)):
            vocabulary = json.loads(_read_asset(vocabulary, "vocabulary"))
        if isinstance(merges, (str, pathlib.Path)):
            merges = _read_asset(merges, "merges").splitlines()
        if not isinstance(vocabulary, dict) or merges is None:
            raise ValueError(
                f"{type(self).__name__} needs `vocabulary` (a dict or a JSON file) and `merges` "
                f"(a list or a text file), got {type(vocabulary).__name__} and {type(merges).__name__}."
            )
        merges = [m.rstrip("\r\n") for m in merges]
        pairs = [tuple(m.split(" ")) for m in merges if m and not m.startswith("#version")]
        try:
            model = tokenizers.models.BPE(vocab=dict(vocabulary), merges=pairs)
        except Exception as error:  # the tokenizers package names the token a merge lacks
            raise MergeError(f"Invalid BPE vocabulary/merges: {error}") from None
        processor = tokenizers.Tokenizer(model)
        processor.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=self.add_prefix_space)
        processor.decoder = tokenizers.decoders.ByteLevel()
        missing = [t for t in self.unsplittable_tokens if t not in vocabulary]
        if missing:
            raise ValueError(f"{type(self).__name__}: unsplittable tokens {missing} are not in the vocabulary.")
        processor.add_special_tokens([tokenizers.AddedToken(t, special=True) for t in self.unsplittable_tokens])
        self.vocabulary, self.merges, self._processor = dict(vocabulary), merges, processor
        self._check_special_tokens()

    @property
    def processor(self):
        if self._processor is None:
            raise ValueError(
                f"{type(self).__name__} has no vocabulary yet: pass `vocabulary=` and `merges=` "
                "or load it from a preset."
            )
        return self._processor

    def vocabulary_size(self):
        return self.processor.get_vocab_size()

    def token_to_id(self, token):
        return self.processor.token_to_id(token)

    def id_to_token(self, token_id):
        return self.processor.id_to_token(int(token_id))

    def _encode(self, texts):
        return [encoding.ids for encoding in self.processor.encode_batch(texts, add_special_tokens=False)]

    def _decode(self, ids):
        return self.processor.decode(ids, skip_special_tokens=False)

    def get_config(self):
        return {
            **self.base_config(),
            "sequence_length": self.sequence_length,
            "add_prefix_space": self.add_prefix_space,
            "unsplittable_tokens": self.unsplittable_tokens,
        }

    @classmethod
    def from_transformers_checkpoint(cls, directory):
        """The byte-level BPE vocabulary and merges of the checkpoint's ``tokenizer.json``, or None without one.

        A split regex before the byte-level step (Llama 3's) is not applied: the text is
        split by GPT-2's pattern, as KerasHub's tokenizer splits it.
        """
        files = preset_files(directory)
        if not files.is_file("tokenizer.json"):
            return None
        data = files.read_json("tokenizer.json")
        try:
            model, pre_tokenizer = data.get("model") or {}, data.get("pre_tokenizer") or {}
            byte_level = _byte_level_step(pre_tokenizer)
            if model.get("type") != "BPE" or byte_level is None:
                raise files.error(
                    "tokenizer.json",
                    "only a byte-level BPE tokenizer (model BPE, pre_tokenizer ByteLevel) is supported, "
                    f"got model {model.get('type')!r} with pre_tokenizer {pre_tokenizer.get('type')!r}",
                )
            added_tokens = data.get("added_tokens", [])
            vocabulary = {**model["vocab"], **{t["content"]: t["id"] for t in added_tokens}}
            merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
            add_prefix_space = byte_level.get("add_prefix_space", False)
            unsplittable_tokens = cls.checkpoint_unsplittable_tokens(added_tokens)
        except (LookupError, TypeError, AttributeError):  # a part missing or of the wrong kind
            raise files.error("tokenizer.json", "is not a tokenizers file of the expected layout") from None
        tokenizer = cls(add_prefix_space=add_prefix_space, unsplittable_tokens=unsplittable_tokens)
        tokenizer._set_from_files(files, "tokenizer.json", vocabulary, merges)
        return tokenizer

    @classmethod
    def checkpoint_unsplittable_tokens(cls, added_tokens):
        """Which of a checkpoint's ``added_tokens`` are matched whole; None: this class's special tokens."""
        return None

    def save_assets(self, directory):
        directory = pathlib.Path(directory)
        (directory / VOCABULARY_ASSET).write_text(json.dumps(self.vocabulary), encoding="utf-8")
        (directory / MERGES_ASSET).write_text("".join(f"{merge}\n" for merge in self.merges), encoding="utf-8")

    def load_assets(self, directory):
        """Reads ``vocabulary.json`` and ``merges.txt`` from ``directory`` (a path or a preset's ``PresetFiles``)."""
        files = preset_files(directory)
        vocabulary, merges = files.read_json(VOCABULARY_ASSET), files.read_text(MERGES_ASSET).splitlines()
        self._set_from_files(files, MERGES_ASSET, vocabulary, merges)

    def _set_from_files(self, files, name, vocabulary, merges):
        try:
            self.set_vocabulary_and_merges(vocabulary, merges)
        except MergeError:  # its message quotes the file's tokens
            problem = "merges and vocabulary do not fit (a merge of tokens the vocabulary lacks, or an id not a number)"
            raise files.error(name, problem) from None
        except ValueError:  # its message can list tokens of the file (unsplittable ones)
            problem = f"the vocabulary lacks special or unsplittable tokens {type(self).__name__} needs"
            raise files.error(name, problem) from None


def _byte_level_step(pre_tokenizer):
    """The ByteLevel step of a ``tokenizer.json`` pre-tokenizer: the whole of it (GPT-2's regex
    inside), or the last of a Sequence whose Split regex comes first (Llama 3); else None."""
    if pre_tokenizer.get("type") == "ByteLevel" and pre_tokenizer.get("use_regex", True):
        return pre_tokenizer
    steps = pre_tokenizer.get("pretokenizers") or []
    if pre_tokenizer.get("type") == "Sequence" and [s.get("type") for s in steps] == ["Split", "ByteLevel"]:
        return steps[1]
    return None


class MergeError(ValueError):
    """A BPE merge of tokens the vocabulary lacks; its message names them."""


def _read_asset(path, what):
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"BPE {what} file not found: {path}")
    return path.read_text(encoding="utf-8")


def _piece_ids_of_types(proto, types):
    """The ids of a serialized SentencePiece ``ModelProto``'s pieces (its field 1, in order) whose
    ``type`` (the piece's field 3) is one of ``types``; the Python API tells control and unknown
    pieces but not user-defined ones, and the protobuf package is no dependency."""
    ids = []
    for index, piece in enumerate(value for field, value in _fields(proto) if field == 1):
        piece_type = next((value for field, value in _fields(piece) if field == 3), 1)  # NORMAL by default
        if piece_type in types:
            ids.append(index)
    return ids


def _fields(message):
    """(field number, value) of a protobuf message: varints as ints, length-delimited fields as bytes."""
    position = 0
    while position < len(message):
        key, position = _varint(message, position)
        field, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, position = _varint(message, position)
        elif wire_type == 2:
            length, position = _varint(message, position)
            value, position = message[position : position + length], position + length
        elif wire_type in (1, 5):  # fixed 64 / 32 bits (a piece's score)
            value, position = None, position + (8 if wire_type == 1 else 4)
        else:
            raise ValueError("Not a valid SentencePiece model.")
        yield field, value


def _varint(data, position):
    value = shift = 0
    while True:
        byte = data[position]
        value |= (byte & 0x7F) << shift
        position, shift = position + 1, shift + 7
        if not byte & 0x80:
            return value, position


def _to_list(ids):
    if hasattr(ids, "tolist"):
        return ids.tolist()
    return [_to_list(x) if not isinstance(x, int) else x for x in ids]
