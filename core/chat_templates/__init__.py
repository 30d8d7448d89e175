"""lmq's built-in chat templates, for the instruct presets of the seed pages (KerasHub's tables),
whose files carry no template of their own.

Each ``<name>.jinja`` is the ``chat_template`` of the model's Hugging Face ``tokenizer_config.json``
(newlines inside its string literals written as ``\\n``), rendered by ``core.chat`` as transformers does.
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
# The templates of models whose transformers tokenizer_config.json sets ``legacy: true``: their
# tokenizer gives the text after each special token SentencePiece's leading "▁" (see
# SentencePieceTokenizer.tokenize_with_special_tokens); the others', transformers' default, do not.
LEGACY_TOKENIZATION = ("mistral_v0.1_instruct", "mistral_v0.2_instruct")
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


def is_legacy_tokenization(template):
    """Whether a chat rendered with ``template`` is tokenized as transformers' ``legacy: true``
    tokenizers do: the template is one of ``LEGACY_TOKENIZATION``'s (a copy of a preset keeps it)."""
    return any(template == read_builtin_template(name) for name in LEGACY_TOKENIZATION)
