"""Chat messages -> a prompt, through the chat template of the preset a tokenizer belongs to.

A template is rendered as transformers' ``apply_chat_template(..., tokenize=False)`` renders
it (``transformers.utils.chat_template_utils``): jinja2's ``ImmutableSandboxedEnvironment``
with ``trim_blocks`` and ``lstrip_blocks``, the ``loopcontrols`` extension, a ``{% generation %}``
tag that only renders its body, ``raise_exception``, ``strftime_now``, a ``tojson`` that does
not escape HTML, a ``dict`` and a ``namespace`` that refuse underscore names; the template sees
``messages``, ``add_generation_prompt``, ``tools`` and ``documents`` (None), and the
tokenizer's special tokens as ``bos_token``, ``eos_token`` and ``pad_token``.

Where a tokenizer's template comes from (``tokenizer.chat_template``, set when a preset is
loaded): see ``lmq.core.presets.transformers_import.attach_chat_template`` and docs/chat-templates.md.
"""

import datetime
import functools
import json

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox

from lmq.core.chat_templates import PRESETS_OF_TEMPLATE, builtin_tokenization

# Tokens that end a turn in common templates: one written by a template that the vocabulary
# has also stops generation (the tokenizer's end token always does).
END_OF_TURN_MARKERS = ("<|eot_id|>", "<|end|>", "<|im_end|>", "<end_of_turn>", "<|eom_id|>")


class ChatTemplateError(ValueError):
    """No template, malformed messages, or the template refused them; the message says which."""


def render_chat(tokenizer, messages, add_generation_prompt=True):
    """The prompt text for ``messages`` ([{"role": str, "content": str}, ...]), as transformers'
    ``apply_chat_template(messages, tokenize=False, add_generation_prompt=...)`` writes it."""
    template = _template_of(tokenizer)
    compiled = _compile(template, _owner(tokenizer))
    messages = _checked_messages(messages, template, tokenizer)
    variables = {
        "messages": messages,
        "tools": None,
        "documents": None,
        "add_generation_prompt": bool(add_generation_prompt),
        **_special_tokens(tokenizer),
    }
    try:
        return compiled.render(**variables)
    except jinja2.TemplateError as error:  # raise_exception, or a sandbox refusal
        raise ChatTemplateError(f"The chat template of {_owner(tokenizer)} refused the messages: {error}") from None
    except (TypeError, ValueError, LookupError, AttributeError, ArithmeticError) as error:
        raise ChatTemplateError(
            f"The chat template of {_owner(tokenizer)} failed on the messages ({type(error).__name__}: {error})"
        ) from None


def chat_token_ids(tokenizer, messages, add_generation_prompt=True):
    """The prompt ``CausalLM.generate`` takes for ``messages``: the ids transformers'
    ``apply_chat_template(messages, tokenize=True, add_generation_prompt=True)`` gives. The special
    tokens the template writes (``<s>``, ``</s>``, ``<|eot_id|>``) are their ids, and there is no
    start token but the one the template writes (Phi-3's writes none). Without the generation
    prompt: a whole conversation, as a training example (``lmq.core.models.training_data``)."""
    text = render_chat(tokenizer, messages, add_generation_prompt)
    settings = {**builtin_tokenization(tokenizer.chat_template), **tokenizer.checkpoint_tokenization}
    return tokenizer.tokenize_with_special_tokens(text, **settings)


def end_of_turn_token_ids(tokenizer):
    """The ids generation stops at for the tokenizer's template: the tokenizer's own stop tokens
    (its end token, and its end-of-turn token if it has one) and each turn-ending token the
    template writes that the vocabulary holds (Llama 3's ``<|eot_id|>``, Phi-3's ``<|end|>``)."""
    template = _template_of(tokenizer)
    ids = list(tokenizer.stop_token_ids)
    for marker in END_OF_TURN_MARKERS:
        token_id = tokenizer.token_to_id(marker) if marker in template else None
        if token_id is not None and token_id not in ids:
            ids.append(token_id)
    return ids


def _owner(tokenizer):
    """``LlamaTokenizer (preset 'x': chat_template.jinja)``: whose template a message is about."""
    source = getattr(tokenizer, "chat_template_source", None)
    return type(tokenizer).__name__ + (f" ({source})" if source else "")


def _template_of(tokenizer):
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        return template
    builtins = ", ".join(p for presets in PRESETS_OF_TEMPLATE.values() for p in presets)
    source = getattr(tokenizer, "chat_template_source", None) or "not loaded from a preset"
    raise ChatTemplateError(
        f"{type(tokenizer).__name__} has no chat template ({source}). A transformers checkpoint brings its own "
        f"(chat_template.jinja or tokenizer_config.json); lmq has built-in templates for {builtins}."
    )


def _checked_messages(messages, template, tokenizer):
    """Plain copies of ``messages``, or a ChatTemplateError naming the bad message and field.
    Keys whose value is None are dropped, as transformers drops them (OpenAI clients send some)."""
    if not isinstance(messages, (list, tuple)) or not messages:
        got = f"an empty {type(messages).__name__}" if isinstance(messages, (list, tuple)) else type(messages).__name__
        raise ChatTemplateError(f"'messages' must be a non-empty list of {{role, content}} objects, got {got}.")
    roles = _roles_of(template)
    checked = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            kind = type(message).__name__
            raise ChatTemplateError(f"{where} must be an object with 'role' and 'content', got {kind}.")
        message = {key: value for key, value in message.items() if value is not None}
        for field in ("role", "content"):
            if field not in message:
                raise ChatTemplateError(f"{where} has no {field!r}.")
        for key, value in message.items():
            if not isinstance(value, str):
                raise ChatTemplateError(f"{where}: {key!r} must be a string, got {type(value).__name__}.")
        if roles and message["role"] not in roles:
            raise ChatTemplateError(
                f"{where}: role {message['role']!r} is not one the chat template of {_owner(tokenizer)} "
                f"knows ({', '.join(sorted(roles))})."
            )
        checked.append({str(key): str.__str__(value) for key, value in message.items()})
    return checked


@functools.lru_cache(maxsize=64)
def _roles_of(template):
    """The roles a template tells apart: the strings it compares a ``...['role']`` with. Only a
    template that names both 'user' and 'assistant' counts as listing its roles (empty set: any
    role); one like Llama 3's writes whatever role it is given."""
    try:
        tree = _environment().parse(template)
    except jinja2.TemplateSyntaxError:
        return frozenset()  # _compile names the error
    roles = set()
    for compare in tree.find_all(jinja2.nodes.Compare):
        operands = [compare.expr, *(operand.expr for operand in compare.ops)]
        if any(_is_role(node) for node in operands):
            for node in operands:  # 'user', or ['user', 'assistant'] after ``in``
                items = node.items if isinstance(node, (jinja2.nodes.List, jinja2.nodes.Tuple)) else [node]
                roles |= {i.value for i in items if isinstance(i, jinja2.nodes.Const) and isinstance(i.value, str)}
    return frozenset(roles) if {"user", "assistant"} <= roles else frozenset()


def _is_role(node):
    if isinstance(node, jinja2.nodes.Getitem):
        return isinstance(node.arg, jinja2.nodes.Const) and node.arg.value == "role"
    return isinstance(node, jinja2.nodes.Getattr) and node.attr == "role"


def _special_tokens(tokenizer):
    tokens = {"bos_token": tokenizer.start_token, "eos_token": tokenizer.end_token, "pad_token": tokenizer.pad_token}
    return {name: token for name, token in tokens.items() if token is not None}


@functools.lru_cache(maxsize=64)
def _compile_cached(template):
    return _environment().from_string(template)


def _compile(template, owner):
    try:
        return _compile_cached(template)
    except jinja2.TemplateSyntaxError as error:  # its message can quote the template, which is the preset's
        raise ChatTemplateError(f"The chat template of {owner} is not valid jinja2 (line {error.lineno}).") from None


class _GenerationTag(jinja2.ext.Extension):
    """transformers' ``{% generation %}...{% endgeneration %}`` (it marks assistant tokens for
    training masks); rendering a prompt needs only its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


class _TemplateDict:
    """``dict(...)`` and ``dict.fromkeys(...)`` without the type itself (no attribute tricks)."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """jinja2's ``namespace`` refusing underscore-prefixed attributes, as transformers' does."""

    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attributes = dict(*args, **kwargs)
        for name in attributes:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attributes)

    def __setitem__(self, name, value):
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"Chat templates cannot store underscore-prefixed attributes on a namespace, but got {name!r}."
            )


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format):
    return datetime.datetime.now().strftime(format)


@functools.cache
def _environment():
    environment = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    environment.filters["tojson"] = _tojson
    environment.globals.update(
        raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_TemplateDict(), namespace=_TemplateNamespace
    )
    return environment
