"""Llama presets from KerasHub's table, mapped to where their files live."""

from core.plugins import PresetInfo


def _kaggle(model, variant):
    return f"kaggle://keras/{model}/keras/{variant}"


backbone_presets = {
    "llama2_7b_en": PresetInfo(_kaggle("llama2", "llama2_7b_en"), "7 billion parameter, 32-layer, base LLaMA 2 model.", "6.74B"),
    "llama2_7b_en_int8": PresetInfo(_kaggle("llama2", "llama2_7b_en_int8"), "7 billion parameter, 32-layer, base LLaMA 2 model with activations and weights quantized to int8.", "6.74B"),
    "llama2_instruct_7b_en": PresetInfo(_kaggle("llama2", "llama2_instruct_7b_en"), "7 billion parameter, 32-layer, instruction tuned LLaMA 2 model.", "6.74B"),
    "llama2_instruct_7b_en_int8": PresetInfo(_kaggle("llama2", "llama2_instruct_7b_en_int8"), "7 billion parameter, 32-layer, instruction tuned LLaMA 2 model with activations and weights quantized to int8.", "6.74B"),
    "vicuna_1.5_7b_en": PresetInfo(_kaggle("vicuna", "vicuna_1.5_7b_en"), "7 billion parameter, 32-layer, instruction tuned Vicuna v1.5 model.", "6.74B"),
    "llama3_8b_en": PresetInfo(_kaggle("llama3", "llama3_8b_en"), "8 billion parameter, 32-layer, base LLaMA 3 model.", "8.03B"),
    "llama3_8b_en_int8": PresetInfo(_kaggle("llama3", "llama3_8b_en_int8"), "8 billion parameter, 32-layer, base LLaMA 3 model with activations and weights quantized to int8.", "8.03B"),
    "llama3_instruct_8b_en": PresetInfo(_kaggle("llama3", "llama3_instruct_8b_en"), "8 billion parameter, 32-layer, instruction tuned LLaMA 3 model.", "8.03B"),
    "llama3_instruct_8b_en_int8": PresetInfo(_kaggle("llama3", "llama3_instruct_8b_en_int8"), "8 billion parameter, 32-layer, instruction tuned LLaMA 3 model with activations and weights quantized to int8.", "8.03B"),
}
