"""Text generation: one decode engine for every sampler (see ``lmq.core.generation.engine``)."""

from lmq.core.generation.batch import Batch
from lmq.core.generation.engine import Engine, EngineClosed, decode
from lmq.core.generation.input_batch import StepInput
from lmq.core.generation.kv_cache_manager import KVCacheManager
from lmq.core.generation.model import DecoderOnlyModel
from lmq.core.generation.prefix_cache import PrefixCache
from lmq.core.generation.request import Request
from lmq.core.generation.results import Completion, DecodeResult, FinishedRow, Generation
from lmq.core.generation.runner import ModelRunner
from lmq.core.generation.scheduler import PREFILL_CHUNK, Scheduler, StepPlan
from lmq.core.generation.stop_strings import StopStrings

__all__ = [
    "PREFILL_CHUNK",
    "Batch",
    "Completion",
    "DecodeResult",
    "DecoderOnlyModel",
    "Engine",
    "EngineClosed",
    "FinishedRow",
    "Generation",
    "KVCacheManager",
    "ModelRunner",
    "PrefixCache",
    "Request",
    "Scheduler",
    "StepInput",
    "StepPlan",
    "StopStrings",
    "decode",
]
