"""Feed-forward blocks."""

import keras
import torch

from lmq.core import kernels
from lmq.core.layers.projection import Projections, cpu_float32_inference

ACTIVATIONS = {
    "silu": torch.nn.functional.silu,
    "gelu": lambda x: torch.nn.functional.gelu(x, approximate="none"),
    "gelu_approximate": lambda x: torch.nn.functional.gelu(x, approximate="tanh"),
    "relu": torch.nn.functional.relu,
}


def activation(name):
    if name not in ACTIVATIONS:
        raise ValueError(f"Unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}.")
    return ACTIVATIONS[name]


class GatedFeedForward(Projections):
    """SwiGLU-style: ``output(act(gate(x)) * intermediate(x))`` (Llama, Mistral, Phi-3)."""

    kernels = {"gate_kernel": 1, "intermediate_kernel": 1, "output_kernel": 1}

    def __init__(self, hidden_dim, intermediate_dim, activation_name="silu", **kwargs):
        super().__init__(**kwargs)
        init = keras.initializers.RandomNormal(stddev=0.02)
        self.activation_name = activation_name
        self.activation = activation(activation_name)
        self.gate_kernel = self.add_weight(
            shape=(hidden_dim, intermediate_dim), initializer=init, name="gate_kernel"
        )
        self.intermediate_kernel = self.add_weight(
            shape=(hidden_dim, intermediate_dim), initializer=init, name="intermediate_kernel"
        )
        self.output_kernel = self.add_weight(
            shape=(intermediate_dim, hidden_dim), initializer=init, name="output_kernel"
        )
        self.built = True

    def call(self, x):
        gate, up = self.projected_together(x, ("gate_kernel", "intermediate_kernel"), (None, None))
        return self.projected(self._gated(gate, up), "output_kernel")

    def _gated(self, gate, up):
        """``act(gate) * up``: for SiLU on a CPU, lmq's C++ ``silu_mul`` in one pass over both,
        the same to the bit as torch's two (``lmq.core.kernels``)."""
        kernel = kernels.silu_mul() if self.activation_name == "silu" and cpu_float32_inference(gate) else None
        if kernel is None:
            return self.activation(gate) * up
        return kernel(gate.flatten(0, -2), up.flatten(0, -2)).view(gate.shape)


class FeedForward(Projections):
    """``output(act(intermediate(x)))``, with biases unless ``use_bias=False`` (Falcon's dense_h_to_4h / dense_4h_to_h)."""

    kernels = {"intermediate_kernel": 1, "output_kernel": 1}

    def __init__(self, hidden_dim, intermediate_dim, activation_name="gelu", use_bias=True, **kwargs):
        super().__init__(**kwargs)
        init = keras.initializers.RandomNormal(stddev=0.02)
        self.activation = activation(activation_name)

        def bias(name, size):
            return self.add_weight(shape=(size,), initializer="zeros", name=name) if use_bias else None

        self.intermediate_kernel = self.add_weight(
            shape=(hidden_dim, intermediate_dim), initializer=init, name="intermediate_kernel"
        )
        self.intermediate_bias = bias("intermediate_bias", intermediate_dim)
        self.output_kernel = self.add_weight(
            shape=(intermediate_dim, hidden_dim), initializer=init, name="output_kernel"
        )
        self.output_bias = bias("output_bias", hidden_dim)
        self.built = True

    def call(self, x):
        hidden = self.projected(x, "intermediate_kernel", value_of(self.intermediate_bias))
        return self.projected(self.activation(hidden), "output_kernel", value_of(self.output_bias))


def value_of(bias):
    """A bias variable's tensor, or None for a layer without biases."""
    return None if bias is None else bias.value
