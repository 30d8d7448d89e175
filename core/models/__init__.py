"""The KerasHub task API on Keras 3 + PyTorch."""

import keras

if keras.backend.backend() != "torch":
    raise ImportError(
        f"lmq needs Keras' torch backend, but keras was loaded with {keras.backend.backend()!r}; "
        "set KERAS_BACKEND=torch (or import lmq.core before keras)."
    )

from lmq.core.generation import Generation  # noqa: E402
from lmq.core.models.backbone import Backbone, BackboneContractError, DecoderOnlyBackbone  # noqa: E402
from lmq.core.models.causal_lm import CausalLM  # noqa: E402
from lmq.core.models.generative_task import GenerativeTask  # noqa: E402
from lmq.core.models.preprocessor import CausalLMPreprocessor, Preprocessor  # noqa: E402
from lmq.core.models.seq2seq_lm import Seq2SeqLM  # noqa: E402
from lmq.core.models.seq2seq_lm_preprocessor import Seq2SeqLMPreprocessor  # noqa: E402
from lmq.core.models.task import Task  # noqa: E402
from lmq.core.models.tokenizer import BytePairTokenizer, SentencePieceTokenizer, Tokenizer  # noqa: E402

__all__ = [
    "Backbone",
    "BackboneContractError",
    "BytePairTokenizer",
    "CausalLM",
    "CausalLMPreprocessor",
    "DecoderOnlyBackbone",
    "Generation",
    "GenerativeTask",
    "Preprocessor",
    "SentencePieceTokenizer",
    "Seq2SeqLM",
    "Seq2SeqLMPreprocessor",
    "Task",
    "Tokenizer",
]
