"""docs/batch-fields.md's table against the line parser: what it says is supported is accepted, what it
says is refused is the line's error with the code it names, and no accepted field is missing from it."""

import json
import re

import pytest
from api_support import REPO

from lmq.api.app.openai.batches.lines import LineError, body_models, parse_line
from lmq.core.config import Limits
from lmq.core.store.batch_files import CHAT, COMPLETIONS

ROW = re.compile(r"^\| `(\w+)` \| (both|completions|chat) \| (supported|differently|refused) \| (.*) \|$")
ENDPOINTS = {"both": (COMPLETIONS, CHAT), "completions": (COMPLETIONS,), "chat": (CHAT,)}
# A value each accepted field takes, to show the parser takes it.
ACCEPTED = {
    "max_tokens": 4, "max_completion_tokens": 4, "temperature": 0.5, "top_p": 0.9, "stop": ["."], "seed": 1, "n": 2,
    "presence_penalty": 0.5, "frequency_penalty": 0.5, "logit_bias": {"3": 1.0}, "min_p": 0.1, "stream": False,
    "user": "u", "top_logprobs": 2, "response_format": {"type": "json_object"}, "guided_json": {"type": "integer"},
    "guided_regex": "[0-9]+", "guided_choice": ["yes", "no"], "structured_outputs": {"choice": ["yes", "no"]},
}


def table():
    rows = [ROW.match(line) for line in (REPO / "docs" / "batch-fields.md").read_text().splitlines()]
    return [(m.group(1), ENDPOINTS[m.group(2)], m.group(3), m.group(4)) for m in rows if m]


def parse(endpoint, **fields):
    body = {"model": "m", **({"prompt": "Hi"} if endpoint == COMPLETIONS else {"messages": [{"role": "user", "content": "Hi"}]})}
    line = {"custom_id": "a", "method": "POST", "url": endpoint, "body": {**body, **fields}}
    return parse_line(json.dumps(line).encode(), 1, endpoint, Limits())


@pytest.mark.parametrize("field, endpoints, status, how", table())
def test_each_field_is_handled_as_the_table_says(field, endpoints, status, how):
    for endpoint in endpoints:
        if status == "refused":
            code = re.match(r"`(\w+)`", how).group(1)
            with pytest.raises(LineError) as refused:
                parse(endpoint, **{field: 1})
            assert (refused.value.code, refused.value.param) == (code, f"body.{field}")
        else:
            assert field in body_models(Limits())[endpoint].model_fields
            if field in ACCEPTED:
                extra = {"logprobs": True} if field == "top_logprobs" else {}
                parse(endpoint, **{field: ACCEPTED[field]}, **extra)


def test_the_table_lists_every_field_the_parser_accepts():
    listed = {(field, endpoint) for field, endpoints, status, _ in table() if status != "refused" for endpoint in endpoints}
    for endpoint, model in body_models(Limits()).items():
        assert {(field, endpoint) for field in model.model_fields} <= listed, endpoint
    assert len(table()) > 40  # the table was read
