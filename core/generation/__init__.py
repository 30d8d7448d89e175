"""Text generation: one decode engine for every sampler (see ``core.generation.engine``)."""

from core.generation.batch import Batch
from core.generation.engine import decode
from core.generation.model import DecoderOnlyModel, length_groups
from core.generation.results import Completion, DecodeResult, FinishedRow, Generation
from core.generation.stop_strings import StopStrings

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
