"""Bart presets from KerasHub's table, mapped to where their files live."""

from lmq.core.plugins import PresetInfo

backbone_presets = {
    "bart_base_en": PresetInfo(
        "kaggle://keras/bart/keras/bart_base_en",
        "6-layer BART model where case is maintained. Trained on BookCorpus, English Wikipedia and CommonCrawl.",
        "139.42M",
    ),
    "bart_large_en": PresetInfo(
        "kaggle://keras/bart/keras/bart_large_en",
        "12-layer BART model where case is maintained. Trained on BookCorpus, English Wikipedia and CommonCrawl.",
        "406.29M",
    ),
    "bart_large_en_cnn": PresetInfo(
        "kaggle://keras/bart/keras/bart_large_en_cnn",
        "The bart_large_en backbone model fine-tuned on the CNN+DM summarization dataset.",
        "406.29M",
    ),
}
# KerasHub names the summariser bart_large_en_cnn; lmq also answers to bart_large_cnn_en
# (the order of bart_base_en and bart_large_en): the same preset under both names.
backbone_presets["bart_large_cnn_en"] = backbone_presets["bart_large_en_cnn"]
