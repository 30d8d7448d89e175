"""Samplers: how the next token is chosen from the logits (KerasHub's names and defaults)."""

from core.samplers.base import GreedySampler, Sampler, get, serialize
from core.samplers.sampling import RandomSampler, TopKSampler, TopPSampler

__all__ = ["GreedySampler", "RandomSampler", "Sampler", "TopKSampler", "TopPSampler", "get", "serialize"]
