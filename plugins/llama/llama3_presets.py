"""Llama 3 presets from KerasHub's table, mapped to where their files live."""

from lmq.core.plugins import PresetInfo
from lmq.plugins.llama.llama_presets import kaggle_handle

backbone_presets = {
    "llama3_8b_en": PresetInfo(kaggle_handle("llama3", "llama3_8b_en"), "8 billion parameter, 32-layer, base LLaMA 3 model.", "8.03B"),
    "llama3_8b_en_int8": PresetInfo(kaggle_handle("llama3", "llama3_8b_en_int8"), "8 billion parameter, 32-layer, base LLaMA 3 model with activations and weights quantized to int8.", "8.03B"),
    "llama3_instruct_8b_en": PresetInfo(kaggle_handle("llama3", "llama3_instruct_8b_en"), "8 billion parameter, 32-layer, instruction tuned LLaMA 3 model.", "8.03B"),
    "llama3_instruct_8b_en_int8": PresetInfo(kaggle_handle("llama3", "llama3_instruct_8b_en_int8"), "8 billion parameter, 32-layer, instruction tuned LLaMA 3 model with activations and weights quantized to int8.", "8.03B"),
}
