"""The plugin kit, for third-party architectures: ``from lmq.testing import CausalLMConformance``."""

from lmq.core.testing import CausalLMConformance

__all__ = ["CausalLMConformance"]
