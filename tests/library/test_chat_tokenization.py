"""A chat's token ids (``lmq.core.chat.chat_token_ids``) are those of transformers'
``apply_chat_template(messages, tokenize=True, add_generation_prompt=True)`` for every built-in
template, multi-turn included: the ``</s>`` and ``<s>`` between turns are their ids, Phi-3 gets
no start token its template does not write. A generate job's ``messages`` item runs on those
ids, while a plain prompt is tokenized as KerasHub tokenizes it.

The reference is transformers' LlamaTokenizer over the same SentencePiece model, built as
transformers converts a ``tokenizer.model`` (its vocabulary and merges; control and
user-defined pieces as added tokens), with the ``legacy`` flag and the ``rstrip`` tokens of the
model's checkpoint."""

import json
import shutil

import pytest
import transformers
from transformers.convert_slow_tokenizer import generate_merges

from lmq.core.chat import chat_token_ids, end_of_turn_token_ids, render_chat
from lmq.core.chat_templates import read_builtin_template
from lmq.core.models import CausalLM
from lmq.plugins.llama import LlamaTokenizer
from lmq.plugins.mistral import MistralTokenizer
from lmq.plugins.phi3 import Phi3Tokenizer
from model_support import docstring_corpus, random_hf_llama, tiny_llama
from tests.service.test_item_params import run_job

MAX_LENGTH = 200
PHI3_TOKENS = ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
SYSTEM = {"role": "system", "content": "You are a helpful assistant"}
TURNS = [
    {"role": "user", "content": "What is your favourite condiment?"},
    {"role": "assistant", "content": "Well, I'm quite partial to a good squeeze of fresh lemon juice."},
    {"role": "user", "content": "  Un café \"noir\", <b>&</b> ✓\nsecond  line "},
    {"role": "assistant", "content": " Return the value "},
    {"role": "user", "content": "Do you have mayonnaise recipes?"},
]
CONVERSATIONS = {"one turn": TURNS[:1], "three turns": TURNS[:3], "five turns": TURNS}

# built-in template -> (lmq tokenizer class, the checkpoint's `legacy`, its end token, its rstrip
# tokens, takes a system prompt): Phi-3-mini-4k-instruct's tokenizer_config.json marks its chat tokens rstrip
MODELS = {
    "llama2_chat": (LlamaTokenizer, False, "</s>", (), True),  # Llama-2-7b-chat-hf: transformers' default
    "mistral_v0.1_instruct": (MistralTokenizer, True, "</s>", (), False),
    "mistral_v0.2_instruct": (MistralTokenizer, True, "</s>", (), False),
    "phi3_instruct": (Phi3Tokenizer, False, "<|endoftext|>", ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"), True),
}


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    """A SentencePiece model trained as Llama's (identity normalization, spaces kept, byte
    fallback), with Phi-3's chat tokens as user-defined pieces, as in KerasHub's Phi-3 vocabulary."""
    import sentencepiece

    directory = tmp_path_factory.mktemp("chat-spm")
    (directory / "corpus.txt").write_text("\n".join(docstring_corpus()))
    sentencepiece.SentencePieceTrainer.train(
        input=str(directory / "corpus.txt"), model_prefix=str(directory / "spm"), vocab_size=600,
        model_type="bpe", byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, split_digits=True, allow_whitespace_only_pieces=True,
        pad_id=-1, unk_id=0, bos_id=1, eos_id=2, user_defined_symbols=PHI3_TOKENS, minloglevel=2,
    )
    return directory / "spm.model"


def reference_tokenizer(spm_model, template, legacy, end_token, rstrip=()):
    """transformers' tokenizer of ``spm_model`` with ``template``, as a checkpoint whose
    ``tokenizer_config.json`` sets ``legacy`` and marks the added tokens ``rstrip`` loads it."""
    lmq = LlamaTokenizer(proto=spm_model)
    vocabulary = {lmq.id_to_token(i): i for i in range(lmq.vocabulary_size())}
    reference = transformers.LlamaTokenizer(
        vocab=vocabulary, merges=generate_merges(vocabulary), legacy=legacy, eos_token=end_token
    )
    reference.add_tokens(
        [transformers.AddedToken(t, normalized=False, special=False, rstrip=t in rstrip) for t in PHI3_TOKENS]
    )
    reference.chat_template = template
    return reference


def lmq_tokenizer(tokenizer_cls, spm_model, template):
    tokenizer = tokenizer_cls(proto=spm_model)
    tokenizer.chat_template = template
    return tokenizer


def reference_ids(reference, messages):
    return reference.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)


@pytest.mark.parametrize("template_name", list(MODELS))
def test_chat_token_ids_are_transformers_apply_chat_template_ids(spm_model, template_name):
    tokenizer_cls, legacy, end_token, rstrip, takes_system = MODELS[template_name]
    template = read_builtin_template(template_name)
    reference = reference_tokenizer(spm_model, template, legacy, end_token, rstrip)
    tokenizer = lmq_tokenizer(tokenizer_cls, spm_model, template)
    conversations = [*CONVERSATIONS.values(), *([[SYSTEM, *TURNS]] if takes_system else [])]
    for messages in conversations:
        text = render_chat(tokenizer, messages)
        assert text == reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        expected = reference_ids(reference, messages)
        assert chat_token_ids(tokenizer, messages) == expected, (template_name, len(messages))
        if len(messages) > 1 and template_name != "phi3_instruct":  # earlier turns end with </s> as an id
            assert expected.count(tokenizer.end_token_id) == sum(m["role"] == "assistant" for m in messages)
        assert expected.count(tokenizer.start_token_id) == text.count("<s>")


CHECKPOINTS = {  # a template of its own (no built-in one), the tokenizer_config.json flags that read it
    "legacy": ("mistral_v0.2_instruct", True, ()),
    "rstrip": ("phi3_instruct", False, ("<|user|>", "<|end|>")),
    "default": ("llama2_chat", False, ()),
}


@pytest.mark.parametrize("checkpoint", list(CHECKPOINTS))
def test_a_checkpoints_tokenizer_config_says_how_its_chats_are_read(spm_model, tmp_path, checkpoint):
    """A transformers checkpoint says in tokenizer_config.json how its tokenizer reads special
    tokens in text (``legacy``, each added token's ``rstrip``); its own template is read so."""
    builtin, legacy, rstrip = CHECKPOINTS[checkpoint]
    template = read_builtin_template(builtin).replace("' + message['content']", "' + message['content'] | trim")
    reference = reference_tokenizer(spm_model, template, legacy, "</s>", rstrip)
    vocabulary_size = LlamaTokenizer(proto=spm_model).vocabulary_size()
    random_hf_llama(vocab_size=vocabulary_size).save_pretrained(tmp_path)
    reference.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())  # transformers 5 writes neither;
    added = {str(reference.convert_tokens_to_ids(t)): {"content": t, "rstrip": t in rstrip} for t in PHI3_TOKENS}
    config.update(legacy=legacy, added_tokens_decoder=added)  # the hub's checkpoints have both
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    shutil.copy(spm_model, tmp_path / "tokenizer.model")
    loaded = transformers.AutoTokenizer.from_pretrained(tmp_path)
    tokenizer = CausalLM.from_preset(str(tmp_path), load_weights=False).preprocessor.tokenizer
    assert tokenizer.chat_template == template != read_builtin_template(builtin)
    assert tokenizer.checkpoint_tokenization == {"legacy": legacy, "rstrip": rstrip}
    conversations = [*CONVERSATIONS.values(), *([[SYSTEM, *TURNS]] if builtin != "mistral_v0.2_instruct" else [])]
    for messages in conversations:
        assert chat_token_ids(tokenizer, messages) == reference_ids(loaded, messages) == reference_ids(reference, messages)
    CausalLM.from_preset(str(tmp_path)).save_to_preset(tmp_path / "saved")  # a KerasHub preset keeps the flags
    saved = CausalLM.from_preset(str(tmp_path / "saved"), load_weights=False).preprocessor.tokenizer
    assert saved.checkpoint_tokenization == tokenizer.checkpoint_tokenization
    assert [chat_token_ids(saved, m) for m in conversations] == [chat_token_ids(tokenizer, m) for m in conversations]


def test_phi3_chat_gets_no_start_token_its_template_does_not_write(spm_model):
    tokenizer = lmq_tokenizer(Phi3Tokenizer, spm_model, read_builtin_template("phi3_instruct"))
    ids = chat_token_ids(tokenizer, TURNS[:1])
    assert ids[0] == tokenizer.token_to_id("<|user|>") and tokenizer.start_token_id not in ids


def test_special_tokens_in_text_are_ids_only_on_the_chat_path(spm_model):
    """A plain prompt is tokenized as KerasHub tokenizes it: ``</s>`` written in it is characters."""
    tokenizer = LlamaTokenizer(proto=spm_model)
    text = "Return it</s><s>[INST] Next"
    chat = tokenizer.tokenize_with_special_tokens(text)
    assert tokenizer.end_token_id in chat and tokenizer.start_token_id in chat
    plain = tokenizer.tokenize(text)
    assert tokenizer.end_token_id not in plain and tokenizer.start_token_id not in plain
    assert tokenizer.detokenize(plain) == text


def test_generate_takes_token_ids_as_the_prompt(spm_model):
    """A list of ids is the prompt as it is (no start token added); a string gets the start token."""
    keras_lm = tiny_llama(spm_model, sequence_length=32)
    keras_lm.compile(sampler="greedy")
    tokenizer = keras_lm.preprocessor.tokenizer
    ids = tokenizer.tokenize("Return the value")
    from_text, from_ids = keras_lm.generate(
        ["Return the value", [tokenizer.start_token_id, *ids]], max_new_tokens=5, return_details=True
    )
    assert from_ids.token_ids == from_text.token_ids and from_ids.prompt_tokens == from_text.prompt_tokens
    unstarted = keras_lm.generate([ids], max_new_tokens=5, return_details=True)[0]
    assert unstarted.prompt_tokens == len(ids)
    with pytest.raises(TypeError, match="Input 1 must be a string"):
        keras_lm.generate(["Return", ["not", "ids"]], max_new_tokens=2)


E2E_TEMPLATES = ["llama2_chat", "mistral_v0.1_instruct", "phi3_instruct"]


@pytest.fixture(scope="module")
def chat_presets(spm_model, tmp_path_factory):
    """Tiny Llama presets on the SentencePiece model, each with one of ``E2E_TEMPLATES``."""
    import keras

    root = tmp_path_factory.mktemp("chat-presets")
    keras.utils.set_random_seed(11)
    tiny_llama(spm_model, sequence_length=MAX_LENGTH).save_to_preset(str(root / "base"))
    presets = {}
    for name in E2E_TEMPLATES:
        presets[name] = shutil.copytree(root / "base", root / name)
        (presets[name] / "chat_template.jinja").write_text(read_builtin_template(name))
    return presets


@pytest.mark.parametrize("template_name", E2E_TEMPLATES)
def test_a_chat_item_runs_on_the_ids_transformers_gives(lmq_home, spm_model, chat_presets, template_name):
    """Through `lmq`'s job machinery (the embedded default), a multi-turn chat item's completion is
    greedy ``generate`` on ``apply_chat_template``'s ids, stopping at the template's turn end."""
    preset = chat_presets[template_name]
    _, legacy, end_token, rstrip, _ = MODELS[template_name]
    messages = TURNS[:3]
    inputs = [
        {"custom_id": "chat", "messages": messages, "params": {"max_new_tokens": 8}},
        {"custom_id": "plain", "prompt": "Return the value"},
    ]
    lines, summary = run_job(preset, inputs, max_length=MAX_LENGTH)
    assert summary["counts"] == {"total": 2, "completed": 2, "failed": 0}, lines[0]["error"]
    lm = CausalLM.from_preset(str(preset))
    lm.compile(sampler="greedy")
    tokenizer = lm.preprocessor.tokenizer
    reference = reference_tokenizer(spm_model, tokenizer.chat_template, legacy, end_token, rstrip)
    expected_ids = reference_ids(reference, messages)
    chat = lm.generate(
        [expected_ids], max_length=MAX_LENGTH, max_new_tokens=8, stop_token_ids=end_of_turn_token_ids(tokenizer),
        return_details=True,
    )[0]
    assert chat.prompt_tokens == len(expected_ids) and chat.completion_tokens > 0
    assert (lines[0]["output"], lines[0]["prompt_tokens"], lines[0]["completion_tokens"]) == (
        chat.text, chat.prompt_tokens, chat.completion_tokens
    )
    assert lines[1]["output"] == lm.generate("Return the value", max_length=MAX_LENGTH)
