"""Samplers: how generation chooses tokens (KerasHub's names and defaults)."""

from core.samplers.base import GreedySampler, Sampler
from core.samplers.beam import BeamSampler
from core.samplers.contrastive import ContrastiveSampler
from core.samplers.per_request import PerRequestSampler
from core.samplers.sampling import RandomSampler, TopKSampler, TopPSampler
from core.samplers.serialization import get, serialize

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
