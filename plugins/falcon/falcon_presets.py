"""Falcon presets from KerasHub's table, mapped to where their files live."""

from lmq.core.plugins import PresetInfo

backbone_presets = {
    "falcon_refinedweb_1b_en": PresetInfo(
        "kaggle://keras/falcon/keras/falcon_refinedweb_1b_en",
        "24-layer Falcon model (Falcon with 1B parameters), trained on 350B tokens of RefinedWeb dataset.",
        "1.31B",
    ),
}
