"""Bart: the encoder-decoder of KerasHub's ``BartBackbone`` (summarisation, translation, rewriting).

The task files keep KerasHub's names (``bart_seq_2_seq_lm.py``), so saved presets name
KerasHub's modules.
"""

from lmq.core.names import TaskKind
from lmq.core.plugins import Architecture, plugin_hooks

ARCHITECTURE = Architecture.in_package(
    __name__,
    "Bart",
    task_kind=TaskKind.seq2seq_lm,
    hf_model_types=("bart",),
    preprocessor="lmq.plugins.bart.bart_seq_2_seq_lm_preprocessor:BartSeq2SeqLMPreprocessor",
    task="lmq.plugins.bart.bart_seq_2_seq_lm:BartSeq2SeqLM",
)
register_architectures, __getattr__ = plugin_hooks(__name__, ARCHITECTURE)
