"""Normalisation layers."""

import keras
import torch

from lmq.core import kernels
from lmq.core.layers.projection import cpu_float32_inference


class RMSNorm(keras.layers.Layer):
    """Root-mean-square norm (Llama, Mistral, Phi-3).

    Computed in float32 and scaled after casting back, as transformers does, so
    bfloat16 results match the reference.
    """

    def __init__(self, dim, epsilon=1e-6, **kwargs):
        super().__init__(**kwargs)
        self.epsilon = epsilon
        self.scale = self.add_weight(shape=(dim,), initializer="ones", name="scale")
        self.built = True

    def call(self, x):
        scale = self.scale.value
        float32 = cpu_float32_inference(x) and scale.dtype == torch.float32
        kernel = kernels.rms_norm() if float32 else None
        if kernel is not None:  # generation on a CPU: one pass (lmq.core.kernels)
            return kernel(x.reshape(-1, x.shape[-1]).contiguous(), scale, self.epsilon).reshape(x.shape)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.epsilon)
        return scale * x32.to(x.dtype)


class LayerNorm(keras.layers.Layer):
    """Standard layer norm with scale and bias (Falcon, Bart)."""

    def __init__(self, dim, epsilon=1e-5, **kwargs):
        super().__init__(**kwargs)
        self.epsilon = epsilon
        self.gamma = self.add_weight(shape=(dim,), initializer="ones", name="gamma")
        self.beta = self.add_weight(shape=(dim,), initializer="zeros", name="beta")
        self.built = True

    def call(self, x):
        return torch.nn.functional.layer_norm(
            x, x.shape[-1:], self.gamma.value, self.beta.value, self.epsilon
        )
