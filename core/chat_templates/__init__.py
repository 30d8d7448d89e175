"""lmq's built-in chat templates, for the instruct presets of the seed pages (KerasHub's tables),
whose files carry no template of their own.

Each ``<name>.jinja`` is the ``chat_template`` of the model's Hugging Face ``tokenizer_config.json``
(newlines inside its string literals written as ``\\n``), rendered by ``lmq.core.chat`` as transformers does.
"""

import functools
import importlib.resources

CHAT_TEMPLATE_FILE = "chat_template.jinja"  # a preset's own template (transformers' file name)

# template name -> the built-in presets that use it
PRESETS_OF_TEMPLATE = {
    "llama2_chat": ("llama2_instruct_7b_en", "llama2_instruct_7b_en_int8"),  # meta-llama/Llama-2-7b-chat-hf
    "llama3_instruct": ("llama3_instruct_8b_en", "llama3_instruct_8b_en_int8"),  # Meta-Llama-3-8B-Instruct
    "mistral_v0.1_instruct": ("mistral_instruct_7b_en",),  # Mistral-7B-Instruct-v0.1, as released
    "mistral_v0.2_instruct": ("mistral_0.2_instruct_7b_en",),  # Mistral-7B-Instruct-v0.2, as released
    "phi3_instruct": ("phi3_mini_4k_instruct_en", "phi3_mini_128k_instruct_en"),  # Phi-3-mini-*-instruct
}
# How transformers' tokenizer of each template's model reads the special tokens a rendered chat
# writes, where it is not transformers' default (the arguments of
# Tokenizer.tokenize_with_special_tokens): Mistral's tokenizer_config.json sets `legacy: true` (the
# text after each special token gets SentencePiece's leading "▁"); Phi-3's marks its chat tokens
# `rstrip` (the whitespace after them is dropped), all of its added tokens but <unk>, <s>, <|endoftext|>.
PHI3_RSTRIP = ("</s>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>", *(f"<|placeholder{i}|>" for i in range(1, 7)))
TOKENIZATION_OF_TEMPLATE = {
    "mistral_v0.1_instruct": {"legacy": True},
    "mistral_v0.2_instruct": {"legacy": True},
    "phi3_instruct": {"rstrip": PHI3_RSTRIP},
}
TEMPLATE_OF_PRESET = {preset: name for name, presets in PRESETS_OF_TEMPLATE.items() for preset in presets}


def builtin_template_name(handle):
    """The built-in template for a preset handle: a built-in name (``llama3_instruct_8b_en``) or
    its Kaggle handle (``kaggle://keras/llama3/keras/llama3_instruct_8b_en[/2]``); else None."""
    if not isinstance(handle, str):
        return None
    if handle.startswith("kaggle://"):
        parts = handle.removeprefix("kaggle://").split("/")
        handle = parts[3] if len(parts) in (4, 5) else ""
    return TEMPLATE_OF_PRESET.get(handle)


@functools.cache
def read_builtin_template(name):
    return importlib.resources.files(__name__).joinpath(f"{name}.jinja").read_text(encoding="utf-8")


def builtin_tokenization(template):
    """``TOKENIZATION_OF_TEMPLATE``'s settings for ``template`` when it is that built-in template
    (a copy of a preset keeps its template, so it keeps them); else none."""
    for name, settings in TOKENIZATION_OF_TEMPLATE.items():
        if template == read_builtin_template(name):
            return settings
    return {}
