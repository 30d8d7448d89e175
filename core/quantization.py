"""int8 weights the way Keras 3 and KerasHub quantize them.

Keras' int8 recipe (``quantize("int8")`` of ``Dense``, ``EinsumDense``, ``Embedding`` and
``ReversibleEmbedding``): each kernel becomes int8 values with one float scale per output
channel, ``scale = 127 / (max |kernel| + epsilon)`` over the input axes
(``keras.quantizers.abs_max_quantize``), so ``kernel ~= values / scale``. At call time the
inputs are quantized the same way per token (over their last axis), multiplied in integers,
and the int32 product is divided by ``input_scale * kernel_scale``. An embedding keeps one
scale per token row; the reversed (head) matrix one per vocabulary column.

lmq stores exactly Keras' values and scales, so a preset quantized by KerasHub loads here
and one quantized here loads in KerasHub. On the CPU the integer product is
``torch._int_mm``: it reads a quarter of float32's bytes, which is what makes decoding faster;
nothing is dequantized per step.
"""

from dataclasses import dataclass

import keras
import numpy as np
import torch

SUPPORTED_MODES = ("int8",)
EPSILON = 1e-7  # keras.backend.epsilon(), the abs-max quantizer's default
INT8_MAX = 127


def check_mode(mode, what="quantize"):
    """``mode`` if lmq supports it, else a ValueError naming it and the modes it does support."""
    if mode not in SUPPORTED_MODES:
        raise ValueError(
            f"{what}: unsupported quantization mode {mode!r}; lmq supports {list(SUPPORTED_MODES)} "
            "(Keras' int8: per-channel int8 weights, activations quantized per token)."
        )
    return mode


def quantize_matrix(matrix, axis):
    """A float matrix -> (int8 values, float scales) reduced over ``axis``, as Keras'
    ``abs_max_quantize(..., to_numpy=True)`` computes them (in numpy, in the matrix's dtype)."""
    values = keras.ops.convert_to_numpy(matrix)
    scale = np.divide(INT8_MAX, np.add(np.max(np.abs(values), axis=axis, keepdims=True), EPSILON))
    quantized = np.clip(np.round(np.multiply(values, scale)), -INT8_MAX, INT8_MAX).astype("int8")
    return quantized, np.squeeze(scale, axis=axis).astype(values.dtype)


def quantize_rows(x):
    """Activations [..., features] -> (int8 [..., features], scale [..., 1]): Keras' on-the-fly
    ``AbsMaxQuantizer`` over the last axis, one scale per token."""
    scale = INT8_MAX / (x.abs().amax(dim=-1, keepdim=True) + EPSILON)
    return (x * scale).round_().clamp_(-INT8_MAX, INT8_MAX).to(torch.int8), scale


def int8_matmul(rows, values):
    """int8 [m, k] @ int8 [k, n] -> the exact integer products: ``torch._int_mm`` (int32) on the
    CPU, where it takes any shape, and on CUDA for the shapes its kernels take (m > 16, k and n
    multiples of 8, as Keras checks); else a float32 matmul of the same integers."""
    m, k = rows.shape
    if rows.device.type == "cpu" or (m > 16 and k % 8 == 0 and values.shape[1] % 8 == 0):
        return torch._int_mm(rows, values)
    return rows.float() @ values.float()


@dataclass(frozen=True)
class Int8Kernel:
    """A [in, out] kernel held as int8 ``values`` and per-output ``scale`` [out]: kernel ~= values / scale."""

    values: torch.Tensor
    scale: torch.Tensor

    @property
    def shape(self):
        return self.values.shape

    def project(self, x, bias=None):
        """``x @ kernel (+ bias)`` as Keras' int8 Dense computes it."""
        rows, x_scale = quantize_rows(x.reshape(-1, x.shape[-1]))
        y = int8_matmul(rows, self.values).to(x.dtype) / (x_scale * self.scale)
        if bias is not None:
            y += bias
        return y.reshape(*x.shape[:-1], y.shape[-1])


def scale_of(variable):
    """The scale variable of an int8 kernel variable, or None for a float one."""
    return getattr(variable, "int8_scale", None)


def keras_variable_order(variables):
    """A layer's variables in the order Keras writes them to ``model.weights.h5``: each int8
    matrix's scale after the matrix's own bias, that is before the next matrix (a Dense:
    kernel, bias, kernel_scale; a ReversibleEmbedding: embeddings, embeddings_scale,
    reverse_embeddings, reverse_embeddings_scale). Float layers are unchanged."""
    scales = {id(scale_of(v)) for v in variables if scale_of(v) is not None}
    ordered, pending = [], None
    for variable in variables:
        if id(variable) in scales:
            continue
        if scale_of(variable) is not None:
            if pending is not None:
                ordered.append(pending)
            pending = scale_of(variable)
        ordered.append(variable)
    if pending is not None:
        ordered.append(pending)
    return ordered


# -- the dtype of a quantized preset's config.json -------------------------------------------------


def policy_map(paths, source_dtype):
    """Keras' serialized ``DTypePolicyMap``: a ``QuantizedDTypePolicy`` int8 for each layer path."""
    source = None if source_dtype == "float32" else source_dtype
    entry = {
        "module": "keras.dtype_policies",
        "class_name": "QuantizedDTypePolicy",
        "config": {"mode": "int8", "source_name": source},
        "registered_name": None,
    }
    return {
        "module": "keras.dtype_policies",
        "class_name": "DTypePolicyMap",
        "config": {"default_policy": source, "policy_map": {path: entry for path in paths}},
        "registered_name": None,
    }


def parse_dtype(dtype):
    """A backbone's ``dtype`` argument -> (float dtype name or None, quantization mode or None).

    Takes a name (``"bfloat16"``), a policy, or KerasHub's serialized policies: a
    ``DTypePolicy``, or a quantized preset's ``DTypePolicyMap`` of ``QuantizedDTypePolicy``
    entries (Keras' names for those: ``"int8_from_float32"``).
    """
    if isinstance(dtype, keras.dtype_policies.DTypePolicyMap):
        dtype = keras.dtype_policies.serialize(dtype)
    if isinstance(dtype, dict) and dtype.get("class_name") == "DTypePolicyMap":
        config = dtype.get("config") or {}
        entries = list((config.get("policy_map") or {}).values())
        policies = [_policy(entry) for entry in entries]
        modes = {p.quantization_mode for p in policies} - {None}
        if len(modes) > 1:
            raise ValueError(
                f"A dtype policy map mixes quantization modes {sorted(modes)}; lmq quantizes a whole model."
            )
        mode = check_mode(modes.pop(), "dtype") if modes else None
        default = config.get("default_policy")
        sources = {p.variable_dtype for p in policies}
        if default is not None:
            sources.add(_policy(default).variable_dtype)
        if len(sources) > 1:
            raise ValueError(f"A dtype policy map mixes float dtypes {sorted(sources)}; lmq uses one per model.")
        return (sources.pop() if sources else None), mode
    if isinstance(dtype, (dict, keras.DTypePolicy)) or isinstance(dtype, str) and "_from_" in dtype:
        policy = _policy(dtype)
        mode = policy.quantization_mode
        return policy.variable_dtype, None if mode is None else check_mode(mode, "dtype")
    if isinstance(dtype, str) and dtype in ("int8", "int4", "float8", "gptq", "awq"):
        raise ValueError(
            f"dtype {dtype!r} is a quantization mode, not a dtype: load the model in float, "
            f"then call quantize({dtype!r}) (lmq supports {list(SUPPORTED_MODES)})."
        )
    return dtype, None


def _policy(serialized):
    try:
        return keras.dtype_policies.get(serialized)
    except (TypeError, ValueError) as error:
        raise ValueError(f"Unknown dtype policy {serialized!r}: {error}") from None
