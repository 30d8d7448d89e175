"""Mistral presets from KerasHub's table, mapped to where their files live."""

from lmq.core.plugins import PresetInfo


def _kaggle(variant):
    return f"kaggle://keras/mistral/keras/{variant}"


backbone_presets = {
    "mistral_7b_en": PresetInfo(_kaggle("mistral_7b_en"), "Mistral 7B base model.", "7.24B"),
    "mistral_instruct_7b_en": PresetInfo(_kaggle("mistral_instruct_7b_en"), "Mistral 7B instruct model.", "7.24B"),
    "mistral_0.2_instruct_7b_en": PresetInfo(
        _kaggle("mistral_0.2_instruct_7b_en"), "Mistral 7B instruct version 0.2 model.", "7.24B"
    ),
}
