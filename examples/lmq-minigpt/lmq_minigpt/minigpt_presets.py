"""MiniGPT's built-in preset names and where their files live."""

from lmq.plugins import PresetInfo

backbone_presets = {
    "minigpt_tiny_en": PresetInfo(
        "hf://lmq-examples/minigpt-tiny-en",
        "2-layer MiniGPT over bytes (an illustration: no such repository is published).",
        "0.1M",
    ),
}
