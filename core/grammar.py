"""Structured outputs: a response format as an llguidance grammar, and an lmq tokenizer as llguidance's.

A row that asks for a format (a JSON schema, any JSON object, a regex, one of some strings)
is constrained by a token mask that the row's grammar matcher computes each step
(``lmq.core.samplers.processing``); the grammar state advances with each accepted token
and the row ends when the grammar is complete. llguidance was chosen over xgrammar
(docs/openai-batch.md, "Structured outputs"): it needs no torch, compiles a schema in about
a millisecond, and refuses a schema keyword it cannot enforce, naming it, where xgrammar
compiles such a schema without it.

JSON is generated compact (no whitespace between tokens), as ``json.dumps(...,
separators=(",", ":"))`` writes it: flexible whitespace would let a row spend its tokens on
spaces. Nothing here imports torch: the API checks formats with ``format_grammar`` alone.
"""

from __future__ import annotations

import json
import re
import weakref

import llguidance

JSON_OPTIONS = {"whitespace_flexible": False}
# Characters that mean something in llguidance's (Rust) regex syntax, escaped in a choice.
REGEX_SPECIAL = re.compile(r"([\\.+*?()|\[\]{}^$#&\-~])")


def format_grammar(response_format: dict) -> str | None:
    """llguidance's grammar for ``response_format`` (lmq's form, ``lmq.core.domain.formats.ResponseFormat``),
    None for plain text; a ValueError naming what the grammar engine cannot compile."""
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        grammar = llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
    elif kind == "json_schema":
        schema = response_format["json_schema"]["schema"]
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=JSON_OPTIONS)
        except ValueError as error:
            raise ValueError(f"the JSON schema cannot be compiled: {error}") from None
    elif kind == "regex":
        grammar = llguidance.LLMatcher.grammar_from_regex(response_format["regex"])
    elif kind == "choice":
        choices = "|".join(REGEX_SPECIAL.sub(r"\\\1", choice) for choice in response_format["choice"])
        grammar = llguidance.LLMatcher.grammar_from_regex(f"({choices})")
    else:
        raise ValueError(f"unknown response format type {kind!r}")
    failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    if failed:
        what = "the JSON schema" if kind == "json_schema" else f"the {kind}"
        raise ValueError(f"{what} cannot be compiled by the grammar engine: {' '.join(messages[0].split())}")
    return grammar


_TOKENIZERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def grammar_tokenizer(tokenizer) -> llguidance.LLTokenizer:
    """llguidance's view of an lmq tokenizer (made once per tokenizer: about 50 ms for 32k tokens)."""
    if tokenizer not in _TOKENIZERS:
        _TOKENIZERS[tokenizer] = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Vocabulary(tokenizer)))
    return _TOKENIZERS[tokenizer]


class _Vocabulary:
    """What ``llguidance.TokenizerWrapper`` reads: each token's bytes, the special tokens, and encoding."""

    def __init__(self, tokenizer):
        self.tokens, self.special_token_ids = token_bytes(tokenizer)
        self.eos_token_id = tokenizer.end_token_id if tokenizer.end_token_id is not None else self.special_token_ids[0]
        self.bos_token_id = tokenizer.start_token_id
        self._tokenizer = tokenizer

    def __call__(self, text: bytes) -> list[int]:
        """The ids of ``text`` in the middle of an output (llguidance tokenizes the bytes a grammar forces):
        without SentencePiece's leading ``▁``, which marks the start of a text."""
        from lmq.core.models.tokenizer import SentencePieceTokenizer

        text = text.decode("utf-8", errors="replace")
        if isinstance(self._tokenizer, SentencePieceTokenizer):
            return self._tokenizer._processor_without_dummy_prefix().Encode(text)
        return self._tokenizer.tokenize(text)


def token_bytes(tokenizer) -> tuple[list[bytes], list[int]]:
    """(the bytes each token id stands for, the ids of special tokens, which stand for no text).

    SentencePiece: ``▁`` is a space and ``<0xNN>`` the byte NN; control, unknown and unused
    pieces are special. Byte-level BPE: each character of a token is a byte of GPT-2's byte
    alphabet; tokens matched whole (special, unsplittable) and ids without a token are special.
    """
    from lmq.core.models.tokenizer import BytePairTokenizer, SentencePieceTokenizer

    size = tokenizer.vocabulary_size()
    special = set(tokenizer.special_token_ids)
    tokens = []
    if isinstance(tokenizer, SentencePieceTokenizer):
        processor = tokenizer.processor
        for token_id in range(size):
            piece = processor.IdToPiece(token_id)
            if processor.IsByte(token_id):
                tokens.append(bytes([int(piece[3:5], 16)]))
            elif processor.IsControl(token_id) or processor.IsUnknown(token_id) or processor.IsUnused(token_id):
                special.add(token_id)
                tokens.append(piece.encode())
            else:
                tokens.append(piece.replace("\u2581", " ").encode())
    elif isinstance(tokenizer, BytePairTokenizer):
        alphabet = {character: byte for byte, character in gpt2_byte_alphabet().items()}
        whole = set(tokenizer.unsplittable_tokens)
        for token_id in range(size):
            token = tokenizer.id_to_token(token_id)
            if token is None or token in whole or any(character not in alphabet for character in token):
                special.add(token_id)
                tokens.append(b"" if token is None else token.encode())
            else:
                tokens.append(bytes(alphabet[character] for character in token))
    else:
        raise ValueError(f"structured outputs need a SentencePiece or byte-level BPE tokenizer, not {type(tokenizer).__name__}")
    return tokens, sorted(special)


def gpt2_byte_alphabet() -> dict[int, str]:
    """GPT-2's byte-level alphabet: each byte as the printable character that stands for it."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    characters, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            characters[byte] = chr(byte)
        else:
            characters[byte] = chr(256 + extra)
            extra += 1
    return characters
