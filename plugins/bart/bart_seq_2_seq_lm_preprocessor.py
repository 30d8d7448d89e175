"""BartSeq2SeqLMPreprocessor."""

from core.models.seq2seq_lm_preprocessor import Seq2SeqLMPreprocessor
from plugins.bart.bart_tokenizer import BartTokenizer


class BartSeq2SeqLMPreprocessor(Seq2SeqLMPreprocessor):
    tokenizer_cls = BartTokenizer
