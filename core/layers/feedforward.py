"""Feed-forward blocks."""

import keras
import torch

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


class GatedFeedForward(keras.layers.Layer):
    """SwiGLU-style: ``output(act(gate(x)) * intermediate(x))`` (Llama, Mistral, Phi-3)."""

    def __init__(self, hidden_dim, intermediate_dim, activation_name="silu", **kwargs):
        super().__init__(**kwargs)
        init = keras.initializers.RandomNormal(stddev=0.02)
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
        gate = self.activation(x @ self.gate_kernel.value)
        return (gate * (x @ self.intermediate_kernel.value)) @ self.output_kernel.value


class FeedForward(keras.layers.Layer):
    """``output(act(intermediate(x)))`` with biases (Falcon's dense_h_to_4h / dense_4h_to_h)."""

    def __init__(self, hidden_dim, intermediate_dim, activation_name="gelu", **kwargs):
        super().__init__(**kwargs)
        init = keras.initializers.RandomNormal(stddev=0.02)
        self.activation = activation(activation_name)
        self.intermediate_kernel = self.add_weight(
            shape=(hidden_dim, intermediate_dim), initializer=init, name="intermediate_kernel"
        )
        self.intermediate_bias = self.add_weight(shape=(intermediate_dim,), initializer="zeros", name="intermediate_bias")
        self.output_kernel = self.add_weight(
            shape=(intermediate_dim, hidden_dim), initializer=init, name="output_kernel"
        )
        self.output_bias = self.add_weight(shape=(hidden_dim,), initializer="zeros", name="output_bias")
        self.built = True

    def call(self, x):
        hidden = self.activation(x @ self.intermediate_kernel.value + self.intermediate_bias.value)
        return hidden @ self.output_kernel.value + self.output_bias.value
