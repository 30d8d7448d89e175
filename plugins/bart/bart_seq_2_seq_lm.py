"""BartSeq2SeqLM (default sampler: top_k, as in KerasHub)."""

from lmq.core.models.seq2seq_lm import Seq2SeqLM
from lmq.plugins.bart.bart_backbone import BartBackbone
from lmq.plugins.bart.bart_seq_2_seq_lm_preprocessor import BartSeq2SeqLMPreprocessor


class BartSeq2SeqLM(Seq2SeqLM):
    backbone_cls = BartBackbone
    preprocessor_cls = BartSeq2SeqLMPreprocessor
