"""The one dense projection every block uses: ``x @ kernel + bias`` as a single fused call,
and the int8 form of its kernels (``core.quantization``)."""

import math

import keras
import torch

from core.quantization import Int8Kernel, check_mode, quantize_matrix, scale_of


def project(x, kernel, bias=None):
    """[..., in] @ kernel [in, out] (+ bias [out]) -> [..., out].

    With a bias this is one ``addmm`` over the flattened rows, as ``torch.nn.Linear`` runs
    it, rather than a matmul and a separate add: one pass over the output instead of two.
    An ``Int8Kernel`` projects as Keras' int8 Dense does (inputs quantized per token).
    """
    if isinstance(kernel, Int8Kernel):
        return kernel.project(x, bias)
    if bias is None:
        return x @ kernel
    return torch.addmm(bias, x.reshape(-1, x.shape[-1]), kernel).reshape(*x.shape[:-1], kernel.shape[-1])


class Projections(keras.layers.Layer):
    """A layer whose kernels (variables named in ``kernels``: {attribute: input axes}) go
    through ``project``; ``quantize("int8")`` turns each into int8 values and scales.

    An int8 kernel keeps its attribute, shape and place in ``model.weights.h5``; its scale
    is ``{attribute}_scale``, shaped as Keras stores it: [out] for a 2-D (Dense) kernel,
    [1, 1, *output axes] for an EinsumDense one.
    """

    kernels = {}

    def kernel(self, name):
        """``name``'s kernel as a [in, out] matrix (a view, no copy), or its ``Int8Kernel``."""
        variable = getattr(self, name)
        value = variable.value
        matrix = value.reshape(math.prod(value.shape[: self.kernels[name]]), -1)
        scale = scale_of(variable)
        return matrix if scale is None else Int8Kernel(matrix, scale.value.reshape(-1))

    @property
    def quantized(self):
        return any(scale_of(getattr(self, name)) is not None for name in self.kernels)

    def quantize(self, mode, config=None):  # Keras' quantize wrapper passes config
        """Keras' int8 of every kernel: abs-max over the input axes, one scale per output."""
        check_mode(mode)
        for name in self.kernels:
            variable = getattr(self, name)
            matrix = self.kernel(name)
            values, scale = quantize_matrix(matrix, axis=0)
            self._replace_with_int8(name, variable.shape, values.reshape(variable.shape), scale)

    def quantized_build(self, mode, config=None):
        """Empty int8 kernels and scales, for a quantized preset's weights to fill."""
        check_mode(mode)
        for name in self.kernels:
            variable = getattr(self, name)
            self._replace_with_int8(name, variable.shape)

    def scale_shape(self, name, shape):
        output_shape = tuple(shape[self.kernels[name]:])
        return output_shape if len(shape) == 2 else (1, 1, *output_shape)

    def _replace_with_int8(self, name, shape, values="zeros", scale="ones"):
        dtype = getattr(self, name).dtype
        scale_shape = self.scale_shape(name, shape)
        if not isinstance(scale, str):
            scale = scale.reshape(scale_shape)
        delattr(self, name)
        kernel = self.add_weight(shape=shape, initializer=_initial(values), dtype="int8", trainable=False, name=name)
        kernel.int8_scale = self.add_weight(
            shape=scale_shape, initializer=_initial(scale), dtype=dtype, trainable=False, name=f"{name}_scale"
        )
        setattr(self, name, kernel)
        setattr(self, f"{name}_scale", kernel.int8_scale)


def _initial(value):
    """An initializer name, or one that returns ``value`` (a numpy array)."""
    if isinstance(value, str):
        return value
    return lambda shape, dtype=None: keras.ops.convert_to_tensor(value, dtype=dtype)
