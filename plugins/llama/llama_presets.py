"""Llama 2 and Vicuna presets from KerasHub's table, mapped to where their files live."""

from lmq.core.plugins import PresetInfo


def kaggle_handle(model, variant):
    return f"kaggle://keras/{model}/keras/{variant}"


backbone_presets = {
    "llama2_7b_en": PresetInfo(kaggle_handle("llama2", "llama2_7b_en"), "7 billion parameter, 32-layer, base LLaMA 2 model.", "6.74B"),
    "llama2_7b_en_int8": PresetInfo(kaggle_handle("llama2", "llama2_7b_en_int8"), "7 billion parameter, 32-layer, base LLaMA 2 model with activations and weights quantized to int8.", "6.74B"),
    "llama2_instruct_7b_en": PresetInfo(kaggle_handle("llama2", "llama2_instruct_7b_en"), "7 billion parameter, 32-layer, instruction tuned LLaMA 2 model.", "6.74B"),
    "llama2_instruct_7b_en_int8": PresetInfo(kaggle_handle("llama2", "llama2_instruct_7b_en_int8"), "7 billion parameter, 32-layer, instruction tuned LLaMA 2 model with activations and weights quantized to int8.", "6.74B"),
    "vicuna_1.5_7b_en": PresetInfo(kaggle_handle("vicuna", "vicuna_1.5_7b_en"), "7 billion parameter, 32-layer, instruction tuned Vicuna v1.5 model.", "6.74B"),
}
