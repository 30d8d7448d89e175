"""Phi-3 presets from KerasHub's table, mapped to where their files live."""

from lmq.core.plugins import PresetInfo


def _kaggle(variant):
    return f"kaggle://keras/phi3/keras/{variant}"


backbone_presets = {
    "phi3_mini_4k_instruct_en": PresetInfo(
        _kaggle("phi3_mini_4k_instruct_en"), "3.8 billion parameters, 32 layers, 4k context length, Phi-3 model.", "3.82B"
    ),
    "phi3_mini_128k_instruct_en": PresetInfo(
        _kaggle("phi3_mini_128k_instruct_en"), "3.8 billion parameters, 32 layers, 128k context length, Phi-3 model.", "3.82B"
    ),
}
