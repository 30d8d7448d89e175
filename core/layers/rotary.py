"""Rotary position embeddings (RoPE) with the scalings that released checkpoints use.

- plain: Llama 2, Mistral;
- linear: positions divided by ``position_scaling_factor``;
- llama3: Llama 3.1's per-frequency adjustment (``frequency_adjustment_factor`` with
  ``low_freq_factor``/``high_freq_factor`` around ``pretraining_sequence_length``);
- longrope ("su"): Phi-3's per-dimension ``short_factor``/``long_factor`` with an
  attention scaling of the cos/sin tables.

Argument names follow KerasHub's ``RotaryEmbedding``; the maths follows transformers'
``modeling_rope_utils``.
"""

import math

import torch

from lmq.core import kernels
from lmq.core.layers.projection import cpu_float32_inference


class RotaryEmbedding:
    """Computes cos/sin tables once per forward pass; every layer reuses them."""

    def __init__(
        self,
        head_dim,
        max_wavelength=10000,
        position_scaling_factor=1.0,
        frequency_adjustment_factor=None,
        low_freq_factor=None,
        high_freq_factor=None,
        pretraining_sequence_length=None,
        short_factor=None,
        long_factor=None,
        max_sequence_length=None,
    ):
        if head_dim % 2:
            raise ValueError(f"Rotary embeddings need an even head_dim, got {head_dim}.")
        self.head_dim = head_dim
        self.max_wavelength = max_wavelength
        self.position_scaling_factor = position_scaling_factor
        self.frequency_adjustment_factor = frequency_adjustment_factor
        self.low_freq_factor = low_freq_factor
        self.high_freq_factor = high_freq_factor
        self.pretraining_sequence_length = pretraining_sequence_length
        self.short_factor = short_factor
        self.long_factor = long_factor
        self.max_sequence_length = max_sequence_length
        self._inverse_frequencies = {}  # (device, long) -> tensor

    def inverse_frequencies(self, device, long_context=False):
        key = (str(device), long_context)
        if key not in self._inverse_frequencies:
            exponents = torch.arange(0, self.head_dim, 2, dtype=torch.int64).float() / self.head_dim
            inverse = 1.0 / (self.max_wavelength**exponents)
            if self.frequency_adjustment_factor is not None:
                inverse = self._llama3_adjust(inverse)
            factors = self.long_factor if long_context else self.short_factor
            if factors is not None:
                inverse = inverse / torch.tensor(factors, dtype=torch.float32)
            self._inverse_frequencies[key] = inverse.to(device)
        return self._inverse_frequencies[key]

    def _llama3_adjust(self, inverse):
        factor = self.frequency_adjustment_factor
        context = self.pretraining_sequence_length
        low_freq_wavelength = context / self.low_freq_factor
        high_freq_wavelength = context / self.high_freq_factor
        wavelength = 2 * math.pi / inverse
        adjusted = torch.where(wavelength > low_freq_wavelength, inverse / factor, inverse)
        smooth = (context / wavelength - self.low_freq_factor) / (
            self.high_freq_factor - self.low_freq_factor
        )
        smoothed = (1 - smooth) * adjusted / factor + smooth * adjusted
        is_medium = (wavelength >= high_freq_wavelength) & (wavelength <= low_freq_wavelength)
        return torch.where(is_medium, smoothed, adjusted)

    def _attention_scaling(self):
        """longrope scales cos/sin when the model is extended past its pretraining length."""
        if self.short_factor is None or not self.max_sequence_length:
            return 1.0
        ratio = self.max_sequence_length / self.pretraining_sequence_length
        if ratio <= 1.0:
            return 1.0
        return math.sqrt(1 + math.log(ratio) / math.log(self.pretraining_sequence_length))

    def cos_sin(self, positions, dtype, long_context=False):
        """positions: [batch, seq] integer tensor -> cos, sin: [batch, 1, seq, head_dim]."""
        inverse = self.inverse_frequencies(positions.device, long_context)
        scaled = positions.float() / self.position_scaling_factor
        angles = scaled[..., None] * inverse  # [batch, seq, head_dim / 2]
        angles = torch.cat((angles, angles), dim=-1)
        scaling = self._attention_scaling()
        cos, sin = angles.cos() * scaling, angles.sin() * scaling
        return cos[:, None].to(dtype), sin[:, None].to(dtype)


def apply_rotary(query, key, cos, sin):
    """query, key: [batch, heads, seq, head_dim] -> both with the two halves of head_dim rotated.

    One sequence on a CPU (a flattened generation step) goes through lmq's C++ kernel, both in
    one call and each in one pass instead of torch's five and a concatenation, with the same
    rounding (``lmq.core.kernels``).
    """
    one_sequence = (query.shape[0] == cos.shape[0] == 1 and query.stride(-1) == key.stride(-1) == 1
                    and cos.dtype == torch.float32)
    kernel = kernels.rotary() if one_sequence and cpu_float32_inference(query) else None
    if kernel is not None:
        query, key = kernel(query[0], key[0], cos[0, 0].contiguous(), sin[0, 0].contiguous())
        return query[None], key[None]
    return _rotate(query, cos, sin), _rotate(key, cos, sin)


def _rotate(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
