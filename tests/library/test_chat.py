"""Chat templates: rendering as transformers' ``apply_chat_template`` renders, the templates a
preset carries (``chat_template.jinja``, ``tokenizer_config.json``, lmq's built-in ones for the
seed pages' instruct presets), the ids a chat stops at, and every way a chat is refused."""

import json
import shutil
import sys
import types

import pytest
import transformers

from lmq.core.chat import ChatTemplateError, chat_token_ids, end_of_turn_token_ids, render_chat
from lmq.core.chat_templates import PRESETS_OF_TEMPLATE, read_builtin_template
from lmq.core.models import CausalLM
from lmq.core.presets.files import PresetFiles
from lmq.core.presets.keras_hub_format import load_tokenizer
from lmq.plugins.llama import Llama3Tokenizer
from model_support import FIXTURES, random_hf_llama
from tests.plugins.test_llama3_presets import write_llama3_tokenizer_json

# A template that uses what transformers' environment adds (namespace, loop controls, the
# {% generation %} tag, tojson without HTML escaping, dict, tools/documents) over indented
# lines, which trim_blocks and lstrip_blocks shape.
RICH_TEMPLATE = """{%- set ns = namespace(system='') -%}
{% for message in messages %}
    {% if message['role'] == 'system' %}
        {% set ns.system = message['content'] %}
        {% continue %}
    {% endif %}
    {% if loop.index0 > 6 %}{% break %}{% endif %}
<|start_header_id|>{{ message['role'] }}<|end_header_id|>
{{ message['content'] | trim }}
    {% generation %}{{ {'n': loop.index, 'text': message['content'], 'tag': '<b>&</b>'} | tojson }}{% endgeneration %}
<|eot_id|>
{% endfor %}
{% if ns.system %}[system: {{ ns.system | tojson(indent=2) }}]{% endif %}
{{ dict(a=1, count=messages | length) | tojson(sort_keys=True) }} {{ tools is none }} {{ documents is none }}
{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>
{% else %}{{ eos_token }}{% endif %}
"""

SYSTEM = {"role": "system", "content": "You are a helpful assistant"}
CONVERSATIONS = {
    "one turn": [{"role": "user", "content": "Hello"}],
    "with a system prompt": [
        SYSTEM,
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi there"},
        {"role": "user", "content": "Who are you?"},
    ],
    "spaces, quotes, non-ASCII": [
        {"role": "user", "content": "  Un café \"noir\" <b>&</b> ✓\nsecond line "},
        {"role": "assistant", "content": "   I am an assistant   "},
        {"role": "user", "content": "Another question"},
    ],
}
# Mistral's templates take no system prompt.
USES_SYSTEM = {"rich": True, "llama2_chat": True, "llama3_instruct": True, "phi3_instruct": True}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A random transformers Llama 3-style checkpoint (tokenizer.json, model) without a chat template."""
    directory = tmp_path_factory.mktemp("llama3_chat")
    vocabulary = write_llama3_tokenizer_json(directory)
    random_hf_llama(vocab_size=vocabulary.get_vocab_size()).save_pretrained(directory)
    return directory


def with_template(checkpoint, directory, template, where="jinja"):
    """A copy of ``checkpoint`` whose tokenizer transformers saved with ``template``: in
    ``chat_template.jinja`` (transformers 5's file), ``tokenizer_config.json`` (older
    transformers) or, ``template`` being {name: template}, named templates in that config."""
    shutil.copytree(checkpoint, directory)
    single = template if isinstance(template, str) else None
    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(checkpoint / "tokenizer.json"),
        bos_token="<|begin_of_text|>",
        eos_token="<|end_of_text|>",
        chat_template=single,
    )
    hf.save_pretrained(directory)
    if where != "jinja":
        (directory / "chat_template.jinja").unlink(missing_ok=True)
        config = json.loads((directory / "tokenizer_config.json").read_text())
        config["chat_template"] = single or [{"name": k, "template": v} for k, v in template.items()]
        (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


def templates():
    return {"rich": RICH_TEMPLATE, **{name: read_builtin_template(name) for name in PRESETS_OF_TEMPLATE}}


@pytest.mark.parametrize("where", ["jinja", "config"])
@pytest.mark.parametrize("template_name", list(templates()))
def test_rendering_matches_transformers_apply_chat_template(checkpoint, tmp_path, template_name, where):
    directory = with_template(checkpoint, tmp_path / "ckpt", templates()[template_name], where)
    reference = transformers.AutoTokenizer.from_pretrained(directory)
    tokenizer = Llama3Tokenizer.from_preset(str(directory))
    conversations = [
        c for c in CONVERSATIONS.values() if USES_SYSTEM.get(template_name, False) or c[0]["role"] != "system"
    ]
    for messages in conversations:
        for add_generation_prompt in (True, False):
            expected = reference.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
            assert render_chat(tokenizer, messages, add_generation_prompt) == expected


def test_named_templates_in_tokenizer_config_use_the_default_one(checkpoint, tmp_path):
    named = {"default": RICH_TEMPLATE, "tool_use": "{{ 'tools: ' + tools | tojson }}"}
    directory = with_template(checkpoint, tmp_path / "ckpt", named, where="config")
    reference = transformers.AutoTokenizer.from_pretrained(directory)
    tokenizer = Llama3Tokenizer.from_preset(str(directory))
    messages = CONVERSATIONS["with a system prompt"]
    assert render_chat(tokenizer, messages) == reference.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    assert "tokenizer_config.json 'chat_template' 'default'" in tokenizer.chat_template_source


def test_chat_token_ids_are_the_ids_transformers_tokenizes(checkpoint, tmp_path):
    """``chat_token_ids`` (what ``generate`` takes for a chat) are ``apply_chat_template(tokenize=True)``'s,
    with the one start token the template writes; the preprocessor keeps them as they are."""
    directory = with_template(checkpoint, tmp_path / "ckpt", read_builtin_template("llama3_instruct"))
    reference = transformers.AutoTokenizer.from_pretrained(directory)
    lm = CausalLM.from_preset(str(directory))
    for messages in CONVERSATIONS.values():
        expected = reference.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
        ids = chat_token_ids(lm.preprocessor.tokenizer, messages)
        assert ids == expected and expected.count(reference.bos_token_id) == 1
        assert lm.preprocessor.generate_preprocess([ids]) == [expected]


def test_a_converted_checkpoint_keeps_its_template_in_the_keras_hub_preset(checkpoint, tmp_path):
    directory = with_template(checkpoint, tmp_path / "ckpt", RICH_TEMPLATE)
    lm = CausalLM.from_preset(str(directory))
    lm.save_to_preset(tmp_path / "saved")
    saved = tmp_path / "saved"
    assert (saved / "chat_template.jinja").read_text() == RICH_TEMPLATE
    assert "chat_template" not in (saved / "tokenizer.json").read_text()  # KerasHub's tokenizer config as it is
    again = Llama3Tokenizer.from_preset(str(saved))
    messages = CONVERSATIONS["spaces, quotes, non-ASCII"]
    assert render_chat(again, messages) == render_chat(lm.preprocessor.tokenizer, messages)
    assert again.chat_template_source == f"preset {str(saved)!r}: chat_template.jinja"


def test_a_preset_without_a_template_saves_no_template_file(tmp_path):
    lm = CausalLM.from_preset(str(FIXTURES / "llama3"))
    lm.save_to_preset(tmp_path / "saved")
    assert not (tmp_path / "saved" / "chat_template.jinja").exists()


# -- built-in templates: the prompt formats the models' cards document ----------------------


def builtin_tokenizer(fixture, preset_name):
    """The fixture's tokenizer (the preset's classes and special tokens) as if loaded as ``preset_name``."""
    return load_tokenizer(PresetFiles(FIXTURES / fixture, name=preset_name))


CONDIMENT = [
    {"role": "user", "content": "What is your favourite condiment?"},
    {"role": "assistant", "content": "Well, I'm quite partial to a good squeeze of fresh lemon juice."},
    {"role": "user", "content": "Do you have mayonnaise recipes?"},
]


def test_llama2_chat_format():
    """Meta's Llama 2 chat format: ``<s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {answer} </s>``."""
    for preset in ("llama2_instruct_7b_en", "llama2_instruct_7b_en_int8"):
        tokenizer = builtin_tokenizer("llama", preset)
        messages = [SYSTEM, *CONDIMENT]
        assert render_chat(tokenizer, messages) == (
            "<s>[INST] <<SYS>>\nYou are a helpful assistant\n<</SYS>>\n\nWhat is your favourite condiment? [/INST] "
            "Well, I'm quite partial to a good squeeze of fresh lemon juice. </s>"
            "<s>[INST] Do you have mayonnaise recipes? [/INST]"
        )
        assert render_chat(tokenizer, CONDIMENT[:1]) == "<s>[INST] What is your favourite condiment? [/INST]"
        assert end_of_turn_token_ids(tokenizer) == [tokenizer.token_to_id("</s>")]
        ids = chat_token_ids(tokenizer, CONDIMENT[:1])
        assert ids[0] == tokenizer.start_token_id and tokenizer.detokenize(ids[1:]) == "[INST] What is your favourite condiment? [/INST]"


def test_llama3_instruct_format():
    """Meta's Llama 3 Instruct format: a header per turn, ``<|eot_id|>`` after each, an open assistant header."""
    tokenizer = builtin_tokenizer("llama3", "llama3_instruct_8b_en")
    assert render_chat(tokenizer, [SYSTEM, CONDIMENT[0]]) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are a helpful assistant<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is your favourite condiment?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert sorted(end_of_turn_token_ids(tokenizer)) == sorted(
        tokenizer.token_to_id(t) for t in ("<|eot_id|>", "<|end_of_text|>")
    )
    assert builtin_tokenizer("llama3", "llama3_instruct_8b_en_int8").chat_template == tokenizer.chat_template


def test_mistral_instruct_formats():
    """Mistral 7B Instruct's card: ``<s>[INST] {user} [/INST]{answer}</s> [INST] ...`` (v0.1);
    v0.2 writes no space after ``</s>``."""
    v1 = builtin_tokenizer("mistral", "mistral_instruct_7b_en")
    assert render_chat(v1, CONDIMENT) == (
        "<s>[INST] What is your favourite condiment? [/INST]"
        "Well, I'm quite partial to a good squeeze of fresh lemon juice.</s> "
        "[INST] Do you have mayonnaise recipes? [/INST]"
    )
    v2 = builtin_tokenizer("mistral", "mistral_0.2_instruct_7b_en")
    assert render_chat(v2, CONDIMENT) == (
        "<s>[INST] What is your favourite condiment? [/INST]"
        "Well, I'm quite partial to a good squeeze of fresh lemon juice.</s>"
        "[INST] Do you have mayonnaise recipes? [/INST]"
    )
    assert end_of_turn_token_ids(v2) == [v2.token_to_id("</s>")]


PHI3_QUESTION = "<|user|>\nWhat is your favourite condiment?<|end|>\n<|assistant|>\n"


def test_phi3_instruct_format():
    """Phi-3 mini instruct's card: ``<|user|>\\n{user}<|end|>\\n<|assistant|>\\n``; it stops at ``<|end|>``."""
    for preset in ("phi3_mini_4k_instruct_en", "phi3_mini_128k_instruct_en"):
        tokenizer = builtin_tokenizer("phi3", preset)
        assert render_chat(tokenizer, [SYSTEM, *CONDIMENT[:2]], add_generation_prompt=False) == (
            "<|system|>\nYou are a helpful assistant<|end|>\n<|user|>\nWhat is your favourite condiment?<|end|>\n"
            "<|assistant|>\nWell, I'm quite partial to a good squeeze of fresh lemon juice.<|end|>\n<|endoftext|>"
        )
        assert render_chat(tokenizer, CONDIMENT[:1]) == PHI3_QUESTION
        assert tokenizer.start_token_id not in chat_token_ids(tokenizer, CONDIMENT[:1])  # the template writes none
        assert end_of_turn_token_ids(tokenizer) == [tokenizer.token_to_id(t) for t in ("<|endoftext|>", "<|end|>")]


def test_only_turn_ends_the_template_writes_and_the_vocabulary_holds_stop_a_chat(tmp_path):
    preset = shutil.copytree(FIXTURES / "phi3", tmp_path / "phi3")
    (preset / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }}<|im_end|>{% endfor %}")
    tokenizer = load_tokenizer(PresetFiles(preset))
    assert tokenizer.token_to_id("<|end|>") is not None and tokenizer.token_to_id("<|im_end|>") is None
    assert end_of_turn_token_ids(tokenizer) == [tokenizer.token_to_id("<|endoftext|>")]


def test_a_kaggle_handle_of_an_instruct_preset_gets_its_builtin_template():
    tokenizer = builtin_tokenizer("llama3", "kaggle://keras/llama3/keras/llama3_instruct_8b_en/2")
    assert tokenizer.chat_template == read_builtin_template("llama3_instruct")
    assert tokenizer.chat_template_source.endswith("lmq's built-in template llama3_instruct")


def test_a_preset_made_from_an_instruct_preset_carries_the_builtin_template(tmp_path):
    lm = CausalLM.from_preset(str(FIXTURES / "phi3"))
    lm.preprocessor.tokenizer = builtin_tokenizer("phi3", "phi3_mini_4k_instruct_en")
    lm.save_to_preset(tmp_path / "tuned")
    tuned = CausalLM.from_preset(str(tmp_path / "tuned")).preprocessor.tokenizer
    assert tuned.chat_template == read_builtin_template("phi3_instruct")
    assert render_chat(tuned, CONDIMENT[:1]) == PHI3_QUESTION


@pytest.fixture
def kaggle_downloads(tmp_path, monkeypatch):
    """A kagglehub that "downloads" a handle's variant from the preset ``{variant: fixture name or directory}`` gives."""
    variants = {}

    def model_download(path):
        variant = path.split("/")[3]
        return str(shutil.copytree(FIXTURES / variants[variant], tmp_path / "kaggle" / variant, dirs_exist_ok=True))

    monkeypatch.setitem(sys.modules, "kagglehub", types.SimpleNamespace(model_download=model_download))
    return variants


def test_a_stored_copy_of_an_instruct_preset_keeps_its_builtin_template(capsys, lmq_home, kaggle_downloads):
    from tests.cli.test_cli import run_cli

    kaggle_downloads.update(llama3_instruct_8b_en="llama3", llama3_8b_en="llama3", phi3_mini_4k_instruct_en="phi3")
    imports = {
        "chat": "kaggle://keras/llama3/keras/llama3_instruct_8b_en/2",
        "base": "kaggle://keras/llama3/keras/llama3_8b_en/2",
        "by-name": "phi3_mini_4k_instruct_en",
    }
    for name, handle in imports.items():
        code, _, err = run_cli(capsys, "presets", "import", handle, "--name", name)
        assert code == 0, err
    store = lmq_home / "presets"
    assert (store / "chat" / "chat_template.jinja").read_text() == read_builtin_template("llama3_instruct")
    assert (store / "by-name" / "chat_template.jinja").read_text() == read_builtin_template("phi3_instruct")
    assert not (store / "base" / "chat_template.jinja").exists()
    shown = {}
    for name in imports:
        code, out, _ = run_cli(capsys, "presets", "show", name)
        shown[name] = json.loads(out)["chat_template"]
    assert shown["chat"] == f"preset {str(store / 'chat')!r}: chat_template.jinja"
    assert "no chat_template.jinja" in shown["base"]
    tokenizer = Llama3Tokenizer.from_preset(str(store / "chat"))
    assert render_chat(tokenizer, CONDIMENT[:1]) == render_chat(builtin_tokenizer("llama3", "llama3_instruct_8b_en"), CONDIMENT[:1])


def test_a_stored_copy_keeps_the_template_its_download_has(capsys, lmq_home, kaggle_downloads, tmp_path):
    from tests.cli.test_cli import run_cli

    own = "{% for m in messages %}{{ m.content }}{% endfor %}"
    with_template = shutil.copytree(FIXTURES / "llama3", tmp_path / "with-template")
    (with_template / "chat_template.jinja").write_text(own)
    kaggle_downloads.update(llama3_instruct_8b_en=with_template)
    code, _, err = run_cli(capsys, "presets", "import", "llama3_instruct_8b_en", "--name", "mine")
    assert code == 0, err
    assert (lmq_home / "presets" / "mine" / "chat_template.jinja").read_text() == own


def test_the_tokenizers_own_template_wins_over_the_builtin_one(tmp_path):
    preset = shutil.copytree(FIXTURES / "llama", tmp_path / "llama")
    (preset / "chat_template.jinja").write_text("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}")
    tokenizer = load_tokenizer(PresetFiles(preset, name="llama2_instruct_7b_en"))
    assert render_chat(tokenizer, CONDIMENT[:1]) == "<user>What is your favourite condiment?"


# -- refusals -----------------------------------------------------------------------------


def tokenizer_with_template(tmp_path, template):
    """The Llama 3 fixture's tokenizer with ``template`` as its preset's chat_template.jinja."""
    preset = shutil.copytree(FIXTURES / "llama3", tmp_path / "llama3")
    (preset / "chat_template.jinja").write_text(template)
    return load_tokenizer(PresetFiles(preset))


def test_no_template_names_the_tokenizer_the_preset_and_the_builtin_ones():
    tokenizer = builtin_tokenizer("llama", "llama2_7b_en")  # a base model: no template
    with pytest.raises(ChatTemplateError) as caught:
        render_chat(tokenizer, CONDIMENT)
    message = str(caught.value)
    assert "LlamaTokenizer has no chat template" in message
    assert "preset 'llama2_7b_en'" in message and "llama2_instruct_7b_en" in message
    with pytest.raises(ChatTemplateError, match="no chat template"):
        end_of_turn_token_ids(tokenizer)
    assert isinstance(caught.value, ValueError)


@pytest.mark.parametrize(
    "messages, problem",
    [
        ("Hello", "non-empty list of {role, content} objects, got str"),
        ([], "got an empty list"),
        ([["user", "Hello"]], r"messages\[0\] must be an object"),
        ([{"role": "user"}], r"messages\[0\] has no 'content'"),
        ([{"content": "Hello"}], r"messages\[0\] has no 'role'"),
        ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": [{"type": "text", "text": "x"}]}],
         r"messages\[1\]: 'content' must be a string, got list"),
        ([{"role": 3, "content": "Hello"}], r"messages\[0\]: 'role' must be a string, got int"),
        ([{"role": "user", "content": "Hello", "name": 7}], r"messages\[0\]: 'name' must be a string"),
    ],
)
def test_malformed_messages_name_the_message_and_field(messages, problem):
    with pytest.raises(ChatTemplateError, match=problem):
        render_chat(builtin_tokenizer("llama3", "llama3_instruct_8b_en"), messages)


def test_keys_without_a_value_are_dropped_as_transformers_drops_them():
    tokenizer = builtin_tokenizer("llama3", "llama3_instruct_8b_en")
    with_nones = [{"role": "user", "content": "Hello", "name": None, "tool_calls": None}]
    assert render_chat(tokenizer, with_nones) == render_chat(tokenizer, [{"role": "user", "content": "Hello"}])


def test_a_role_the_template_does_not_know_is_named(tmp_path):
    tool = {"role": "tool", "content": "42"}
    unknown_system = r"messages\[0\]: role 'system' is not one .* knows \(assistant, user\)"
    with pytest.raises(ChatTemplateError, match=unknown_system):
        render_chat(builtin_tokenizer("mistral", "mistral_instruct_7b_en"), [SYSTEM, *CONDIMENT])
    with pytest.raises(ChatTemplateError, match=r"messages\[1\]: role 'tool' .*phi3_mini_4k_instruct_en"):
        render_chat(builtin_tokenizer("phi3", "phi3_mini_4k_instruct_en"), [CONDIMENT[0], tool])
    listed = "{% for m in messages %}{% if m.role in ['user', 'assistant'] %}{{ m.content }}{% endif %}{% endfor %}"
    with pytest.raises(ChatTemplateError, match=r"messages\[1\]: role 'tool' .* knows \(assistant, user\)"):
        render_chat(tokenizer_with_template(tmp_path, listed), [CONDIMENT[0], tool])
    # Llama 3's template writes any role into its header
    ipython = [{"role": "ipython", "content": "42"}]
    assert "<|start_header_id|>ipython" in render_chat(builtin_tokenizer("llama3", "llama3_instruct_8b_en"), ipython)


def test_the_templates_own_exception_is_a_chat_template_error():
    not_alternating = [CONDIMENT[0], CONDIMENT[0]]
    with pytest.raises(ChatTemplateError, match="refused the messages: Conversation roles must alternate"):
        render_chat(builtin_tokenizer("llama", "llama2_instruct_7b_en"), not_alternating)


@pytest.mark.parametrize(
    "template, problem",
    [
        ("{% for m in messages %}\n{{ m['content'] }}", r"not valid jinja2 \(line 2\)"),
        ("{{ messages[3]['content'] }}", "refused the messages"),  # undefined
        ("{{ ''.__class__.__mro__ }}", "refused the messages"),  # the sandbox
        ("{% set ns = namespace(_private=1) %}", "underscore-prefixed"),
        ("{{ messages | length / 0 }}", "failed on the messages .ZeroDivisionError"),
    ],
)
def test_a_broken_template_is_a_chat_template_error(tmp_path, template, problem):
    with pytest.raises(ChatTemplateError, match=problem):
        render_chat(tokenizer_with_template(tmp_path, template), CONDIMENT[:1])


@pytest.mark.parametrize(
    "value, reason",
    [
        (12, "'chat_template' is a int, not a string"),
        ([{"name": "tool_use", "template": "x"}], "names \\['tool_use'\\], none of them 'default'"),
    ],
)
def test_an_unusable_template_in_tokenizer_config_still_loads_and_says_why(checkpoint, tmp_path, value, reason):
    directory = shutil.copytree(checkpoint, tmp_path / "ckpt")
    (directory / "tokenizer_config.json").write_text(json.dumps({"chat_template": value}))
    lm = CausalLM.from_preset(str(directory))
    assert lm.generate("Return a new", max_length=8).startswith("Return a new")  # plain prompts still work
    with pytest.raises(ChatTemplateError, match=reason):
        render_chat(lm.preprocessor.tokenizer, CONDIMENT[:1])
