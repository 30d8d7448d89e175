"""Samplers: how generation chooses tokens (KerasHub's names and defaults)."""

from lmq.core.samplers.base import GreedySampler, Sampler
from lmq.core.samplers.beam import BeamSampler
from lmq.core.samplers.contrastive import ContrastiveSampler
from lmq.core.samplers.per_request import PerRequestSampler
from lmq.core.samplers.sampling import RandomSampler, TopKSampler, TopPSampler
from lmq.core.samplers.serialization import get, serialize

__all__ = [
    "BeamSampler",
    "ContrastiveSampler",
    "GreedySampler",
    "PerRequestSampler",
    "RandomSampler",
    "Sampler",
    "TopKSampler",
    "TopPSampler",
    "get",
    "serialize",
]
