"""BartSeq2SeqLMPreprocessor."""

from lmq.core.models.seq2seq_lm_preprocessor import Seq2SeqLMPreprocessor
from lmq.plugins.bart.bart_tokenizer import BartTokenizer


class BartSeq2SeqLMPreprocessor(Seq2SeqLMPreprocessor):
    tokenizer_cls = BartTokenizer
