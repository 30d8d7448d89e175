"""The one dense projection every block uses: ``x @ kernel + bias`` as a single fused call,
the int8 form of its kernels (``lmq.core.quantization``), and the low-rank (LoRA) updates a
kernel may carry: a layer's own (``enable_lora``, for training) and, in a step that serves
several adapters over one base, each token's adapter (``STEP_ADAPTERS``, ``lmq.core.adapters``)."""

import contextvars
import math

import keras
import torch

from lmq.core import kernels
from lmq.core.quantization import Int8Kernel, check_mode, quantize_matrix, scale_of

ONEDNN = torch.backends.mkldnn.is_available()
# Where lmq's GEMM (``lmq.core.kernels.linear``) serves a PackedKernel rather than oneDNN's: with
# AVX2, oneDNN's read a kernel at a third to a half of the memory's speed at a decode step's few
# rows; with AVX-512 it read one at the memory's speed (docs/peer-bench.md).
OWN_GEMM = torch.backends.cpu.get_cpu_capability() == "AVX2"


def cpu_float32_inference(x):
    """Whether ``x`` is float32 on the CPU in a pass without autograd (generation): what the CPU
    kernels without a gradient take (lmq's and oneDNN's packed GEMMs here, ``lmq.core.kernels``)."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_grad_enabled()


def _onednn_serves(x, kernel):
    """Whether oneDNN's GEMM (the one inductor uses) takes a float32 projection on the CPU.

    With the kernel in its own layout (``PackedKernel``) it is 1.3x to 4x torch's default
    (MKL's) at a decode step's row counts on the CPUs measured (docs/peer-bench.md). It has
    no gradient, so only a pass without autograd (generation) takes it.
    """
    return ONEDNN and kernel.dtype == torch.float32 and cpu_float32_inference(x)


def times_transposed(x, matrix):
    """x [m, k] @ matrix [n, k]^T -> [m, n], ``matrix`` any view with unit stride in one dimension
    (a cache's keys, values transposed). On a CPU without autograd oneDNN's GEMM takes it as it
    lies: 1.4x to 1.6x torch's (MKL's) on a shared prefix's attention products here (256 queries,
    400 keys of 64)."""
    if _onednn_serves(x, matrix):
        return torch.ops.mkldnn._linear_pointwise(x, matrix, None, "none", [], "")
    return x @ matrix.transpose(0, 1)


class PackedKernel:
    """Float32 kernels [in, out] side by side, packed once for a GEMM without autograd on a CPU: a
    copy beside the variables, made on a model's first generation and again after their weights
    change. ``widths``: each kernel's part of the output.

    On an AVX2 CPU (``OWN_GEMM``) lmq's own GEMM packs them in panels of columns
    (``lmq.core.kernels.linear``): 0.4x-0.8x oneDNN's time at a decode step's 1..64 rows. Else,
    or without lmq's kernels, oneDNN's GEMM over its own layout (the one inductor uses) serves:
    1.3x to 4x torch's default (MKL's) at those rows (docs/peer-bench.md).
    """

    def __init__(self, *matrices):
        self.widths = [matrix.shape[1] for matrix in matrices]
        joined = matrices[0] if len(matrices) == 1 else torch.cat(matrices, dim=1)
        self.linear = kernels.linear() if OWN_GEMM else None
        if self.linear is not None:
            self.weight = kernels.pack_linear()(joined)  # [panels, in, panel width]
        else:
            self.weight = torch.ops.mkldnn._reorder_linear_weight(joined.t())  # oneDNN's [out, in]

    def project(self, x, bias=None):
        if self.linear is None:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, bias, "none", [], "")
        outputs = sum(self.widths)
        return self.linear(x.reshape(-1, x.shape[-1]), self.weight, outputs, bias).view(*x.shape[:-1], outputs)


def project(x, kernel, bias=None):
    """[..., in] @ kernel [in, out] (+ bias [out]) -> [..., out].

    With a bias this is one ``addmm`` over the flattened rows, as ``torch.nn.Linear`` runs
    it, rather than a matmul and a separate add: one pass over the output instead of two.
    A ``PackedKernel`` projects with lmq's or oneDNN's GEMM (generation on a CPU, see
    ``Projections.serving_kernel``); an ``Int8Kernel`` as Keras' int8 Dense does (inputs
    quantized per token).
    """
    if isinstance(kernel, (Int8Kernel, PackedKernel)):
        return kernel.project(x, bias)
    if bias is None:
        return x @ kernel
    return torch.addmm(bias, x.reshape(-1, x.shape[-1]), kernel).reshape(*x.shape[:-1], kernel.shape[-1])


# Set while a quantized preset's backbone is built (``building_int8``).
BUILDING_INT8 = contextvars.ContextVar("building_int8", default=False)
# Set for one forward pass of a step whose tokens use adapters: ((adapter updates, token indices), ...),
# where an adapter's updates map (layer, kernel name) to (down [in, rank], up [rank, out], scale folded in).
STEP_ADAPTERS = contextvars.ContextVar("step_adapters", default=())


def tensor_of(weight):
    """A Keras variable's tensor, or the tensor itself (a loaded adapter's weights are plain tensors)."""
    return weight.value if isinstance(weight, keras.Variable) else weight


class Projections(keras.layers.Layer):
    """A layer whose kernels (the variables ``kernels`` names: {attribute: number of output
    axes}) go through ``project``; ``quantize("int8")`` turns each into int8 values and scales.

    An int8 kernel keeps its attribute, shape and place in ``model.weights.h5``; its scale
    is ``{attribute}_scale``, shaped as Keras stores it: [out] for a 2-D (Dense) kernel,
    [1, 1, *output axes] for an EinsumDense one. While ``BUILDING_INT8`` is set (a quantized
    preset loading), kernels are created as empty int8 values and scales, never in float.
    """

    kernels = {}

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.lora = {}  # kernel name -> (down [in, rank], up [rank, out]), see enable_lora
        self.lora_scale = 1.0
        # kernel names packed side by side (one or more) -> (their variables' tensors, those tensors' versions, PackedKernel)
        self.packed = {}

    def projected(self, x, name, bias=None):
        """``x`` through kernel ``name`` (``project``), plus its low-rank updates: this layer's
        LoRA, and each token's own adapter while a step serves adapters (``STEP_ADAPTERS``)."""
        return self._updated(x, name, project(x, self.serving_kernel(name, x), bias))

    def projected_together(self, x, names, biases):
        """``x`` through each of kernels ``names`` (``biases``: each one's [out], or None) -> one
        output each, as ``projected`` gives them.

        Where a packed GEMM serves them all, this is one over the kernels side by side
        (``serving_kernels``), as vLLM joins a layer's query, key and value projections and its
        gate and up ones. A decode step's few rows are bound by streaming the kernels from memory,
        and one call streaming them all took about 0.8x the time of one call each (docs/peer-bench.md).
        """
        packed = self.serving_kernels(names, x)
        if packed is None or len({bias is None for bias in biases}) > 1:
            return [self.projected(x, name, bias) for name, bias in zip(names, biases)]
        bias = None if biases[0] is None else torch.cat(biases)
        outputs = packed.project(x, bias).split(packed.widths, dim=-1)
        return [self._updated(x, name, y) for name, y in zip(names, outputs)]

    def _updated(self, x, name, y):
        """``y``, kernel ``name``'s projection of ``x``, plus the kernel's low-rank updates."""
        if name in self.lora:
            down, up = self.lora[name]
            y = y + (x @ tensor_of(down)) @ tensor_of(up) * self.lora_scale
        for updates, tokens in STEP_ADAPTERS.get():
            pair = updates.get((self, name))
            if pair is not None:  # tokens index the step's flattened tokens (batch 1)
                rows = x.reshape(-1, x.shape[-1])[tokens]
                y = y.reshape(-1, y.shape[-1]).index_add(0, tokens, (rows @ pair[0]) @ pair[1]).reshape(y.shape)
        return y

    def enable_lora(self, rank, alpha=None, names=None):
        """Trainable low-rank updates of the kernels ``names`` (2-D views [in, out], see ``kernel``),
        as KerasHub's ``enable_lora`` adds them; ``up`` starts at zero, so the output is unchanged at first."""
        for name in names:
            matrix = self.kernel(name)
            short = name.removesuffix("_kernel")
            down = self.add_weight(shape=(matrix.shape[0], rank), initializer="he_uniform", name=f"{short}_lora_down")
            up = self.add_weight(shape=(rank, matrix.shape[1]), initializer="zeros", name=f"{short}_lora_up")
            self.lora[name] = (down, up)
        self.lora_scale = (alpha or rank) / rank

    def merged_lora_kernels(self):
        """{id(kernel): the kernel with its low-rank update added}: what a saved preset holds."""
        merged = {}
        for name, (down, up) in self.lora.items():
            kernel = getattr(self, name)
            update = (tensor_of(down) @ tensor_of(up) * self.lora_scale).reshape(kernel.shape)
            merged[id(kernel)] = kernel.value + update.to(kernel.value.dtype)
        return merged

    def kernel(self, name):
        """``name``'s kernel as a [in, out] matrix (a view, no copy), or its ``Int8Kernel``."""
        variable = getattr(self, name)
        value = variable.value
        matrix = value.reshape(-1, math.prod(value.shape[-self.kernels[name]:]))
        scale = scale_of(variable)
        return matrix if scale is None else Int8Kernel(matrix, scale.value.reshape(-1))

    def serving_kernel(self, name, x, matrix=None):
        """What ``x`` goes through for kernel ``name`` (``matrix``: its [in, out] view, when not
        ``kernel(name)``): its ``PackedKernel`` where a packed GEMM serves the projection
        (``serving_kernels``), else the kernel."""
        packed = self.serving_kernels((name,), x, None if matrix is None else (matrix,))
        if packed is not None:
            return packed
        return self.kernel(name) if matrix is None else matrix

    def serving_kernels(self, names, x, matrices=None):
        """The ``PackedKernel`` of kernels ``names`` (a tuple) side by side (``matrices``: their
        [in, out] views, when not ``kernel(name)``'s), where a packed GEMM (lmq's or oneDNN's)
        serves ``x``'s projections through every one of them (float32 kernels), packed again
        whenever one of their variables' tensors has changed (trained, assigned, loaded); else None.

        A kernel packed already is checked against the variable's own tensor (``_value``, what
        ``value`` returns outside a stateless or autocast scope, which generation does not
        enter): Keras' ``value`` property costs about 4 us of scope checks a read, and a step
        makes four projections a layer (3% of workload c's time at seven)."""
        if not (ONEDNN and cpu_float32_inference(x)):
            return None
        values = [getattr(self, name)._value for name in names]
        packed = self.packed.get(names)
        if packed is not None and all(
            value is old and value._version == version for value, old, version in zip(values, packed[0], packed[1])
        ):
            return packed[2]
        if any(value.dtype != torch.float32 for value in values):  # int8 kernels project one by one
            return None
        kernel = PackedKernel(*(matrices or [self.kernel(name) for name in names]))
        self.packed[names] = (values, [value._version for value in values], kernel)
        return kernel

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
