"""The one dense projection every block uses: ``x @ kernel + bias`` as a single fused call,
and the int8 form of its kernels (``lmq.core.quantization``)."""

import contextvars
import math

import keras
import torch

from lmq.core.quantization import Int8Kernel, check_mode, quantize_matrix, scale_of


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


# Set while a quantized preset's backbone is built (``building_int8``).
BUILDING_INT8 = contextvars.ContextVar("building_int8", default=False)


class Projections(keras.layers.Layer):
    """A layer whose kernels (the variables ``kernels`` names: {attribute: number of output
    axes}) go through ``project``; ``quantize("int8")`` turns each into int8 values and scales.

    An int8 kernel keeps its attribute, shape and place in ``model.weights.h5``; its scale
    is ``{attribute}_scale``, shaped as Keras stores it: [out] for a 2-D (Dense) kernel,
    [1, 1, *output axes] for an EinsumDense one. While ``BUILDING_INT8`` is set (a quantized
    preset loading), kernels are created as empty int8 values and scales, never in float.
    """

    kernels = {}

    def kernel(self, name):
        """``name``'s kernel as a [in, out] matrix (a view, no copy), or its ``Int8Kernel``."""
        variable = getattr(self, name)
        value = variable.value
        matrix = value.reshape(-1, math.prod(value.shape[-self.kernels[name]:]))
        scale = scale_of(variable)
        return matrix if scale is None else Int8Kernel(matrix, scale.value.reshape(-1))

    def kernel_names(self):
        """The kernels this layer has (an embedding with a tied head has no ``reverse_embeddings``)."""
        return [name for name in self.kernels if getattr(self, name, None) is not None]

    @property
    def quantized(self):
        return any(scale_of(getattr(self, name)) is not None for name in self.kernel_names())

    def quantize(self, mode, config=None):  # Keras' quantize wrapper passes config
        """Keras' int8 of every kernel: abs-max over the input axes, one scale per output."""
        check_mode(mode)
        for name in self.kernel_names():
            variable = getattr(self, name)
            values, scale = quantize_matrix(self.kernel(name), axis=0)
            delattr(self, name)
            kernel = self._int8_kernel(name, variable.shape, variable.dtype, values.reshape(variable.shape), scale)
            setattr(self, name, kernel)

    def add_weight(self, shape=None, initializer=None, dtype=None, trainable=True, name=None, **kwargs):
        if BUILDING_INT8.get() and name in self.kernels:
            return self._int8_kernel(name, shape, dtype or self.variable_dtype)
        return super().add_weight(
            shape=shape, initializer=initializer, dtype=dtype, trainable=trainable, name=name, **kwargs
        )

    def scale_shape(self, name, shape):
        output_shape = tuple(shape[-self.kernels[name]:])
        return output_shape if len(shape) == 2 else (1, 1, *output_shape)

    def _int8_kernel(self, name, shape, dtype, values="zeros", scale="ones"):
        """A new int8 kernel variable with its scale (``{name}_scale``, also ``kernel.int8_scale``)."""
        scale_shape = self.scale_shape(name, shape)
        if not isinstance(scale, str):
            scale = scale.reshape(scale_shape)
        add = super().add_weight
        kernel = add(shape=shape, initializer=_initial(values), dtype="int8", trainable=False, name=name)
        kernel.int8_scale = add(
            shape=scale_shape, initializer=_initial(scale), dtype=dtype, trainable=False, name=f"{name}_scale"
        )
        setattr(self, f"{name}_scale", kernel.int8_scale)
        return kernel


def _initial(value):
    """An initializer name, or one that returns ``value`` (a numpy array)."""
    if isinstance(value, str):
        return value
    return lambda shape, dtype=None: keras.ops.convert_to_tensor(value, dtype=dtype)
