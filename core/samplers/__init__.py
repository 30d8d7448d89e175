"""Samplers: how generation chooses tokens (KerasHub's names and defaults)."""

from core.samplers.base import GreedySampler, Sampler, get, serialize
from core.samplers.beam import BeamSampler
from core.samplers.contrastive import ContrastiveSampler
from core.samplers.sampling import RandomSampler, TopKSampler, TopPSampler

__all__ = [
    "BeamSampler",
    "ContrastiveSampler",
    "GreedySampler",
    "RandomSampler",
    "Sampler",
    "TopKSampler",
    "TopPSampler",
    "get",
    "serialize",
]
