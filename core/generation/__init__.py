"""Text generation: one decode engine for every sampler (see ``lmq.core.generation.engine``)."""

from lmq.core.generation.batch import Batch
from lmq.core.generation.engine import decode
from lmq.core.generation.model import DecoderOnlyModel, length_groups
from lmq.core.generation.results import Completion, DecodeResult, FinishedRow, Generation
from lmq.core.generation.stop_strings import StopStrings

__all__ = [
    "Batch",
    "Completion",
    "DecodeResult",
    "DecoderOnlyModel",
    "FinishedRow",
    "Generation",
    "StopStrings",
    "decode",
    "length_groups",
]
