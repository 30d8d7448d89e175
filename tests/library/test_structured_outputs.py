"""Structured outputs (``generate(response_format=...)``): rows masked to their grammars, with
different formats and none in one call, on a SentencePiece and a byte-level BPE vocabulary of
random tiny models. Random weights wander: each output is what the grammar allowed, and each
row ends because its grammar completed (finish reason "stop"), not at its token limit."""

import json
import re

import jsonschema
import pytest

from lmq.core.grammar import gpt2_byte_alphabet, grammar_tokenizer, token_bytes
from lmq.core.models import CausalLM
from model_support import random_hf_llama, tiny_llama, train_sentencepiece
from tests.plugins.test_llama3_presets import write_llama3_tokenizer_json

# Nested objects, arrays, enums, required fields, numbers with bounds; each one's shortest output is short.
SCHEMAS = {
    "person": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 6},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
        },
        "required": ["name", "age", "tags"],
        "additionalProperties": False,
    },
    "point": {
        "type": "object",
        "properties": {
            "at": {
                "type": "object",
                "properties": {"x": {"type": "number", "minimum": -10, "maximum": 10}, "y": {"type": "integer", "minimum": 0, "maximum": 9}},
                "required": ["x", "y"],
                "additionalProperties": False,
            },
            "label": {"enum": ["start", "end"]},
        },
        "required": ["at", "label"],
        "additionalProperties": False,
    },
    "rows": {
        "type": "object",
        "properties": {
            "rows": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 9}, "ok": {"type": "boolean"}},
                    "required": ["id", "ok"],
                    "additionalProperties": False,
                },
                "maxItems": 3,
            }
        },
        "required": ["rows"],
        "additionalProperties": False,
    },
    "sentiment": {
        "type": "object",
        "properties": {
            "sentiment": {"enum": ["positive", "negative", "neutral"]},
            "confidence": {"type": "number", "minimum": 0, "maximum": 1},
        },
        "required": ["sentiment", "confidence"],
        "additionalProperties": False,
    },
    "book": {
        "type": "object",
        "properties": {
            "title": {"type": "string", "maxLength": 5},
            "year": {"type": "integer", "minimum": 1900, "maximum": 2100},
            "rating": {"type": "integer", "minimum": 1, "maximum": 5},
        },
        "required": ["title", "year"],
        "additionalProperties": False,
    },
}
PROMPTS = ["Return the", "Open a file", "A path", "Raise an error", "The number of"]


def json_schema_format(name):
    return {"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name], "strict": True}}


@pytest.fixture(scope="module")
def sentencepiece_lm(tmp_path_factory):
    return tiny_llama(train_sentencepiece(tmp_path_factory.mktemp("spm")), sequence_length=1024)


@pytest.fixture(scope="module")
def byte_level_lm(tmp_path_factory):
    """A random Llama 3-style checkpoint: byte-level BPE (GPT-2's byte alphabet), added special tokens."""
    directory = tmp_path_factory.mktemp("llama3")
    reference = write_llama3_tokenizer_json(directory)
    random_hf_llama(vocab_size=reference.get_vocab_size(), seed=3).save_pretrained(directory)
    return CausalLM.from_preset(str(directory))


def assert_structured(lm):
    """Every row of one call keeps to its own format (none: free text) and ends with its grammar."""
    formats = [json_schema_format(name) for name in SCHEMAS] + [
        {"type": "json_object"},
        {"type": "regex", "regex": "[a-c]{2}-[0-9]{1,3}"},
        {"type": "choice", "choice": ["yes", "no (really)"]},
        None,
    ]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(formats))]
    outputs = lm.generate(
        prompts, max_new_tokens=600, sampler="random", seed=7, response_format=formats, strip_prompt=True,
        return_details=True,
    )
    for name, output in zip(SCHEMAS, outputs):
        jsonschema.validate(json.loads(output.text), SCHEMAS[name])
        assert output.finish_reason == "stop", (name, output.text)
    json_object, regex, choice, free = outputs[len(SCHEMAS):]
    assert isinstance(json.loads(json_object.text), dict) and json_object.finish_reason == "stop"
    assert re.fullmatch("[a-c]{2}-[0-9]{1,3}", regex.text), regex.text
    assert choice.text in ("yes", "no (really)") and choice.finish_reason == "stop"
    # The unconstrained row ran on beside them, to a stop token or its limit.
    assert free.finish_reason == "length" or free.token_ids[-1] in lm.preprocessor.tokenizer.stop_token_ids
    assert free.completion_tokens > 50


def test_formats_hold_on_a_sentencepiece_vocabulary(sentencepiece_lm):
    assert_structured(sentencepiece_lm)


def test_formats_hold_on_a_byte_level_vocabulary(byte_level_lm):
    assert_structured(byte_level_lm)


def test_token_bytes_read_sentencepiece_spaces_and_byte_fallback(sentencepiece_lm):
    tokenizer = sentencepiece_lm.preprocessor.tokenizer
    tokens, special = token_bytes(tokenizer)
    assert tokens[tokenizer.token_to_id("<0x7B>")] == b"{"
    spaced = next(i for i in range(tokenizer.vocabulary_size()) if tokenizer.id_to_token(i).startswith("\u2581") and len(tokenizer.id_to_token(i)) > 2)
    assert tokens[spaced] == b" " + tokenizer.id_to_token(spaced)[1:].encode()
    assert {tokenizer.start_token_id, tokenizer.end_token_id} <= set(special)
    assert grammar_tokenizer(tokenizer).vocab_size == tokenizer.vocabulary_size()


def test_token_bytes_read_the_gpt2_byte_alphabet(byte_level_lm):
    tokenizer = byte_level_lm.preprocessor.tokenizer
    tokens, special = token_bytes(tokenizer)
    newline = gpt2_byte_alphabet()[ord("\n")]
    assert tokens[tokenizer.token_to_id(newline)] == b"\n"
    for text in ("Return the path", " of a file\n", "é"):
        assert b"".join(tokens[i] for i in tokenizer.tokenize(text)) == text.encode()
    assert tokenizer.token_to_id("<|eot_id|>") in special


def test_rows_end_as_their_grammar_completes_not_at_the_limit(sentencepiece_lm):
    outputs = sentencepiece_lm.generate(
        ["Return the"] * 2, max_new_tokens=50, sampler="greedy", strip_prompt=True, return_details=True,
        response_format={"type": "choice", "choice": ["alpha", "beta"]},
    )
    for output in outputs:
        assert output.text in ("alpha", "beta") and output.finish_reason == "stop"
        assert output.completion_tokens <= len("alpha")  # ended with the grammar, well before its 50


@pytest.mark.parametrize(
    "response_format, named",
    [
        ({"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "array", "uniqueItems": True}}}, "uniqueItems"),
        ({"type": "json_schema", "json_schema": {"name": "s", "schema": {"if": {"type": "string"}, "then": {}}}}, "if"),
        ({"type": "regex", "regex": "(("}, "regex"),
        ({"type": "json_schema", "json_schema": {"name": "s"}}, "schema"),
        ({"type": "xml"}, "type"),
    ],
)
def test_a_format_the_engine_cannot_compile_is_a_value_error_naming_it(sentencepiece_lm, response_format, named):
    with pytest.raises(ValueError, match=named):
        sentencepiece_lm.generate("Return the", max_new_tokens=4, response_format=response_format)
