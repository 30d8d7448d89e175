"""Backbones: the network without its task head.

``Backbone`` carries what every architecture shares: its config (KerasHub's
``config.json``), the layout of KerasHub's ``model.weights.h5``, LoRA, and the
contract a backbone class must meet, checked when the class is created and when an
instance has been built. ``DecoderOnlyBackbone`` is the decoder stack (token
embedding -> ``DecoderBlock``s -> final norm) with the entry point that generation
uses: ``forward_step``, one flattened step of many requests' tokens (decoding rows and
prompt chunks) writing a ``KVCache`` (a ``RollingKVCache`` when a sliding window is
shorter than the generation); ``prefill`` and ``decode`` are that step for padded
prompts and for one token per row.
"""

import functools
import inspect

import keras
import torch

from lmq.core.generation.input_batch import StepInput
from lmq.core.layers import AttentionContext, CachedAttention, KVCache, ReversibleEmbedding, RollingKVCache
from lmq.core.layers.attention import AttentionPart, decode_kernel
from lmq.core.layers.projection import BUILDING_INT8, Projections
from lmq.core.models.serialization import KerasHubSerializable
from lmq.core.quantization import check_mode, keras_variable_order, parse_dtype, policy_map

# What Backbone.__init__ takes for every backbone; the rest of a constructor is its config.
BASE_ARGUMENTS = ("dtype", "name", "trainable")
# A decode step's rows attend in up to this many runs of neighbouring cache rows, each run of at
# least DECODE_RUN_ROWS rows reading keys up to its own longest row rather than the batch's
# (where lmq's decode kernel reads each row to its own length, they attend in one run).
DECODE_RUNS, DECODE_RUN_ROWS = 4, 8
# Decoding rows whose prompts all begin with at least this many identical tokens read their keys
# once (``CachedAttention._attend_shared_prefix``).
SHARED_PREFIX_KEYS = 64


def keras_weight_paths(layers):
    """Where Keras' ``model.weights.h5`` keeps each layer's variables: ``layers`` maps a layer's
    path (``"llama_transformer_decoder_1/_query_dense"``) to its variables, in creation order;
    an int8 kernel brings its scale, where Keras writes it (``keras_variable_order``)."""
    return {
        f"layers/{path}/vars/{i}": v
        for path, variables in layers.items()
        for i, v in enumerate(keras_variable_order(variables))
    }


def unwrap_quantize(model):
    """Undo Keras' per-instance wrapper of ``quantize``, which checks modes against Keras' own
    list: lmq checks them itself (``check_mode``), naming the ones it supports."""
    vars(model).pop("quantize", None)


def numbered(name, index):
    """Keras' name for the ``index``-th layer called ``name``: name, name_1, name_2, ..."""
    return f"{name}_{index}" if index else name


class BackboneContractError(TypeError):
    """A backbone class or instance lacks something every backbone must have."""


class Backbone(KerasHubSerializable, keras.Model):
    """The base of every backbone. A subclass (say ``LlamaBackbone``) must:

    - take its config as named constructor arguments, pass ``**kwargs`` (``dtype``,
      ``name``, ``trainable``) to ``super().__init__`` first, and keep each argument
      as the attribute of that name;
    - list those arguments in ``keras_hub_config``, in the order KerasHub writes them
      to ``config.json``; arguments KerasHub lacks go in ``extra_config`` and are
      written only when set, so that KerasHub still loads the preset;
    - build ``token_embedding``, a ``ReversibleEmbedding`` (the task head reverses it);
    - define ``keras_hub_weights()``: {path in KerasHub's ``model.weights.h5``: variable}.

    The constructor's arguments, the config lists and ``keras_hub_weights`` are checked
    when the class is created; the attributes and ``token_embedding`` once the outermost
    constructor has returned. A miss is a ``BackboneContractError`` naming it.
    ``get_config`` follows from the config lists. A base class for other backbones
    (``DecoderOnlyBackbone``) says ``abstract=True`` and is not checked.
    """

    config_file = "config.json"
    keras_hub_config = ()
    extra_config = ()

    def __init_subclass__(cls, abstract=False, **kwargs):
        super().__init_subclass__(**kwargs)
        if abstract:
            return
        cls.check_class()
        if "__init__" in cls.__dict__:
            cls.__init__ = _checked_when_built(cls.__init__)

    def __init__(self, dtype=None, name=None, trainable=True, **kwargs):
        """``dtype`` may be a quantized preset's ``DTypePolicyMap``: the backbone's kernels are
        then built as empty int8 values and scales (never in float) for its weights to fill."""
        float_dtype, mode = parse_dtype(dtype)
        super().__init__(dtype=float_dtype, name=name or self.default_name(), trainable=trainable, **kwargs)
        unwrap_quantize(self)
        self.keras_hub_layer_paths = None  # a quantized preset's DTypePolicyMap paths, to save it the same way
        if isinstance(dtype, dict) and mode:
            self.keras_hub_layer_paths = list(dtype["config"]["policy_map"])
        self._building_int8 = BUILDING_INT8.set(True) if mode else None  # until the constructor returns

    # -- the contract -----------------------------------------------------------------

    @classmethod
    def contract_error(cls, what):
        return BackboneContractError(f"{cls.__name__} does not meet the Backbone contract: {what}.")

    @classmethod
    def check_class(cls):
        """What the class itself must define (see the class docstring)."""
        parameters = inspect.signature(cls.__init__).parameters
        if not any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
            raise cls.contract_error("its __init__ takes no **kwargs to pass dtype, name and trainable on")
        arguments = [
            name for name, p in parameters.items()
            if name != "self" and name not in BASE_ARGUMENTS and p.kind is p.POSITIONAL_OR_KEYWORD
        ]
        declared = (*cls.keras_hub_config, *cls.extra_config)
        if missing := [a for a in arguments if a not in declared]:
            raise cls.contract_error(
                f"constructor arguments {missing} are in neither keras_hub_config nor extra_config"
            )
        if unknown := [k for k in declared if k not in arguments]:
            raise cls.contract_error(f"config keys {unknown} are not constructor arguments")
        if not callable(getattr(cls, "keras_hub_weights", None)):
            raise cls.contract_error("it defines no keras_hub_weights() (its layout of KerasHub's model.weights.h5)")

    def check_instance(self):
        """What a built instance must hold (see the class docstring)."""
        if missing := [k for k in (*self.keras_hub_config, *self.extra_config) if not hasattr(self, k)]:
            raise self.contract_error(f"its constructor keeps no attribute for the config keys {missing}")
        if not isinstance(getattr(self, "token_embedding", None), ReversibleEmbedding):
            raise self.contract_error("it builds no token_embedding (a ReversibleEmbedding)")

    # -- config -----------------------------------------------------------------------

    def base_config(self):
        dtype = keras.dtype_policies.serialize(self.dtype_policy)
        if self.quantization_mode is not None:
            dtype = policy_map(self.quantized_layer_paths(), self.dtype_policy.name)
        return {"name": self.name, "trainable": self.trainable, "dtype": dtype}

    def get_config(self):
        config = {**self.base_config(), **{key: getattr(self, key) for key in self.keras_hub_config}}
        config.update({key: getattr(self, key) for key in self.extra_config if getattr(self, key)})
        return config

    @classmethod
    def from_preset(cls, preset, load_weights=True, dtype=None, resolver=None):
        from lmq.core.presets import load_backbone

        return load_backbone(preset, cls=cls, load_weights=load_weights, dtype=dtype, resolver=resolver)

    # -- quantization (core.quantization) --------------------------------------------

    @property
    def quantization_mode(self):
        """``"int8"`` once ``quantize("int8")`` ran (or an int8 preset loaded), else None."""
        return "int8" if any(layer.quantized for layer in self._projection_layers()) else None

    def _projection_layers(self):
        return [layer for layer in self._flatten_layers() if isinstance(layer, Projections)]

    def quantize(self, mode, config=None, filters=None):
        """Keras' ``quantize``: every projection and the token embedding (with its head)
        become int8 kernels with per-output-channel scales (see ``lmq.core.quantization``);
        norms, biases and position tables stay in float. Only ``"int8"`` is supported."""
        check_mode(mode, f"{type(self).__name__}.quantize")
        if self.quantization_mode is not None:
            raise ValueError(f"{type(self).__name__} is already quantized ({self.quantization_mode}).")
        if any(layer.lora for layer in self._projection_layers()):
            raise ValueError("Save a LoRA-tuned model (which merges its updates) and load it before quantizing.")
        for layer in self._projection_layers():
            layer.quantize(mode)

    def quantized_layer_paths(self):
        """The KerasHub layer paths a quantized preset's ``DTypePolicyMap`` names: those it was
        loaded with, else the architecture's ``keras_hub_quantized_layers()``."""
        if self.keras_hub_layer_paths is not None:
            return self.keras_hub_layer_paths
        named = getattr(self, "keras_hub_quantized_layers", None)
        if named is None:
            raise ValueError(
                f"{type(self).__name__} names no KerasHub layer paths (keras_hub_quantized_layers), "
                "so its int8 config cannot be written in KerasHub's format."
            )
        return named()

    def enable_lora(self, rank, alpha=None):
        """Freezes every weight and adds trainable low-rank updates to the attention's query
        and value projections (KerasHub's ``Backbone.enable_lora``). ``save_to_preset``
        writes the updates merged into the kernels, so the preset is a plain model."""
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}.")
        if self.quantization_mode is not None:
            raise ValueError(f"LoRA on a {self.quantization_mode} model is unsupported: its kernels are not trainable.")
        attention_layers = [layer for layer in self._flatten_layers() if isinstance(layer, CachedAttention)]
        if not attention_layers:
            raise ValueError(f"{type(self).__name__} has no layer that supports LoRA.")
        for variable in self.variables:
            variable.trainable = False
        for layer in attention_layers:
            layer.enable_lora(rank, alpha)

    def weights_to_save(self):
        """{path: value} for ``model.weights.h5``, with LoRA updates merged in."""
        merged = {}
        for layer in self._projection_layers():
            merged.update(layer.merged_lora_kernels())
        return {path: merged.get(id(v), v.value) for path, v in self.keras_hub_weights().items()}

    @property
    def device(self):
        return self.token_embedding.embeddings.value.device


class DecoderOnlyBackbone(Backbone, abstract=True):
    """Token embedding -> ``DecoderBlock`` stack -> final norm.

    Besides ``Backbone``'s contract, a subclass builds ``transformer_layers`` (a list
    of ``DecoderBlock``) and ``layer_norm``, and sets ``num_key_value_heads`` and
    ``head_dim`` (the cache's shape). It may build ``rotary`` (a ``RotaryEmbedding``;
    without one, attention gets no position tables), set ``sliding_window``, and
    override ``biased`` to add a bias by key position (Falcon's ALiBi).
    """

    rotary = None
    sliding_window = None
    key_position_bias = False  # attention adds a bias by key position (see ``biased``)

    def check_instance(self):
        super().check_instance()
        if not isinstance(getattr(self, "transformer_layers", None), list):
            raise self.contract_error("it builds no transformer_layers (a list of DecoderBlock)")
        for piece in ("layer_norm", "num_key_value_heads", "head_dim"):
            if getattr(self, piece, None) is None:
                raise self.contract_error(f"it sets no {piece}")

    def call(self, inputs, training=False):
        token_ids = torch.as_tensor(inputs["token_ids"], device=self.device).long()
        batch, length = token_ids.shape
        padding_mask = inputs.get("padding_mask")
        if padding_mask is None:
            padding_mask = torch.ones_like(token_ids, dtype=torch.bool)
        padding_mask = torch.as_tensor(padding_mask, device=self.device).bool()
        positions = torch.arange(length, device=self.device).expand(batch, length)
        mask = self.attention_mask(positions, positions) & padding_mask[:, None, None, :]
        # A query with no key left (left padding) would give NaNs; it attends to all, like KerasHub.
        mask = mask | ~mask.any(dim=-1, keepdim=True)
        context = self._context(positions, AttentionContext(mask=self.biased(mask, positions)))
        return self.hidden_states(token_ids, context, training=training)

    def attention_mask(self, query_positions, key_positions):
        """Positions [batch, query] and [batch or 1, keys] -> bool [batch, 1, query, keys].

        Causal and windowed: a query at position i sees keys at j with
        i - sliding_window < j <= i, as transformers' Mistral does (and KerasHub's).
        """
        distance = query_positions[:, None, :, None] - key_positions[:, None, None, :]
        allowed = distance >= 0
        if self.sliding_window:
            allowed &= distance < self.sliding_window
        return allowed

    def biased(self, allowed, key_positions):
        """The mask attention gets from ``allowed`` (bool [batch, 1, queries, keys]) over keys at
        ``key_positions`` [batch or 1, keys]: ``allowed`` itself, or, where attention adds a bias
        by key position (``key_position_bias``: Falcon's ALiBi), the additive mask."""
        return allowed

    def _context(self, positions, context):
        """``context`` with this architecture's rotary tables for queries at ``positions``
        [batch, queries], when there is a ``rotary``."""
        if self.rotary is not None:
            context.cos, context.sin = self.rotary.cos_sin(positions, self.token_embedding.output_dtype)
        return context

    def hidden_states(self, token_ids, context, training=False):
        x = self.token_embedding.call(token_ids)  # [batch, seq, hidden]
        for block in self.transformer_layers:
            x = block.call(x, context, training=training)
        return self.layer_norm.call(x)

    # -- generation -----------------------------------------------------------------

    def new_cache(self, batch_size, max_length, prompt_width=None):
        """A cache of ``max_length`` slots, or a rolling one when the window is shorter.

        ``prompt_width`` (the longest prompt) lets a rolling cache stop at window + width - 1 slots.
        """
        embeddings = self.token_embedding.embeddings.value
        shape = (len(self.transformer_layers), batch_size, self.num_key_value_heads, max_length, self.head_dim)
        if self.sliding_window and self.sliding_window < max_length:
            return RollingKVCache(
                *shape,
                self.token_embedding.output_dtype,
                embeddings.device,
                window=self.sliding_window,
                prompt_width=prompt_width or max_length,
            )
        return KVCache(*shape, self.token_embedding.output_dtype, embeddings.device)

    def forward_step(self, step, cache):
        """A flattened step (``StepInput``: decoding rows, then prompt chunks) -> hidden states
        [tokens, hidden]; every token's keys and values go into its cache row.

        Embeddings, projections and MLPs run on the step as one sequence [1, tokens, hidden],
        with no padding; attention runs per part (``AttentionPart``): the decoding rows in a few
        runs (``decode_runs``; one, where lmq's decode kernel reads each row to its own length),
        one query each over their rows' keys up to the run's longest row, masked to each row's
        own position; each prompt chunk over its own row's keys up to its end.
        """
        positions = step.positions  # [tokens]
        end = max([step.decode_width] + [start + length for _, start, length in step.chunks])
        write_slots = cache.place(step.token_rows, positions, end)  # [tokens]: each token's slot in its row
        parts, offset = [], step.decode_rows
        # Decoding rows that read their leading keys from the prefix cache's pool attend together
        # (``pooled_runs``); the others in runs, or together when they all begin with one long prompt
        # prefix, read once from their first row. Rows that see exactly their first slots also
        # carry their lengths (lmq's decode kernel).
        exact = self.sees_its_first_slots(cache)
        one_pass = exact and decode_kernel(cache.keys) is not None  # the kernel needs no runs
        prompt_shared = step.decode_shared_prompt if step.decode_pooled is None else 0
        prompt_shared = prompt_shared if self.reads_shared_keys_once(cache, prompt_shared) else 0
        for first, stop, pooled in pooled_runs(step.decode_pooled, step.decode_rows):
            shared = prompt_shared if pooled is None else pooled.length
            pool_start = None if pooled is None else pooled.start
            most = 1 if shared or one_pass else DECODE_RUNS
            runs = decode_runs(positions[first:stop], step.decode_width, most, first)
            for run_first, run_stop, key_length in runs:
                queries = positions[run_first:run_stop, None]  # [rows, 1]
                lengths = queries[:, 0] + 1 if exact else None
                parts.append(self._part(cache, slice(run_first, run_stop), run_first, run_stop - run_first, queries,
                                        key_length, False, shared, lengths, pool_start))
        for row, start, length in step.chunks:
            queries = positions[None, offset : offset + length]  # [1, length]
            parts.append(self._part(cache, slice(offset, offset + length), row, 1, queries, start + length, start == 0))
            offset += length
        context = AttentionContext(cache=cache, parts=parts, token_rows=step.token_rows, write_positions=write_slots,
                                   pool=step.pool)
        context = self._context(positions[None], context)
        return self.hidden_states(step.token_ids[None], context)[0]

    def _part(self, cache, tokens, first_row, rows, query_positions, key_length, fresh, shared=0, lengths=None,
              pooled=None):
        """The ``AttentionPart`` of ``rows`` cache rows whose queries are at ``query_positions``
        [rows, queries] and see keys up to ``key_length``; ``fresh``: a prompt's first chunk;
        ``shared``: leading keys the rows hold alike, read once (from the prefix cache's pool
        from position ``pooled``, when not None); ``lengths``: each decoding row's slots, when it
        sees exactly its first ones."""
        read, key_positions = cache.key_positions(first_row, rows, key_length)
        mask = self.step_mask(query_positions, key_positions, fresh)
        return AttentionPart(tokens, first_row, rows, read, mask, shared, lengths, pooled)

    def reads_shared_keys_once(self, cache, length):
        """Whether decoding rows that begin with the same ``length`` positions read those keys once
        (``SHARED_PREFIX_KEYS`` or more, rows that see exactly their first slots)."""
        return length >= SHARED_PREFIX_KEYS and self.sees_its_first_slots(cache)

    def sees_its_first_slots(self, cache):
        """Whether a decoding row at position p attends to exactly its cache slots 0..p: no
        window, no bias by key position, and a cache that keeps position p in slot p. Such rows
        may also read the prompt positions they all hold alike once (``SHARED_PREFIX_KEYS``);
        a window, a bias or a rolling cache reads those keys differently per row."""
        return not self.sliding_window and not self.key_position_bias and not isinstance(cache, RollingKVCache)

    def step_mask(self, query_positions, key_positions, fresh):
        """The mask of queries at ``query_positions`` [rows, queries] over keys at ``key_positions``
        [rows or 1, keys]; None (SDPA's causal mask) for a prompt's first chunk, whose keys are
        its own queries, when no window cuts in."""
        windowed = self.sliding_window and key_positions.shape[-1] > self.sliding_window
        if fresh and not windowed and not self.key_position_bias:
            return None
        return self.biased(self.attention_mask(query_positions, key_positions), key_positions)

    def prefill(self, token_ids, cache, rows=None, start=0):
        """Right-padded prompts [batch, seq] -> hidden states [batch, seq, hidden]; fills cache
        positions [start, start + seq) of cache ``rows`` (default: rows [0, batch))."""
        batch, length = token_ids.shape
        rows = torch.arange(batch, device=token_ids.device) if rows is None else rows
        step = StepInput.of_prompts(token_ids, rows, start)
        return self.forward_step(step, cache).view(batch, length, -1)

    def decode(self, token_ids, positions, cache, key_length):
        """One token per row [batch, 1] at ``positions`` [batch] -> hidden [batch, 1, hidden];
        cache rows [0, batch). ``key_length`` (a Python int above every position) bounds the slots read."""
        step = StepInput.of(token_ids[:, 0], positions, key_length, (), token_ids.device)
        return self.forward_step(step, cache)[:, None]


def decode_runs(positions, most_width, most=DECODE_RUNS, offset=0):
    """The decoding rows (their ``positions`` [rows]) cut into at most ``most`` runs of
    neighbouring rows: (first row, stop row, key length) each, the key length one past the run's
    furthest position (at most ``most_width``, the slots a rolling cache holds); rows are numbered
    from ``offset``.

    Long-tailed prompts leave most rows far shorter than the longest, and attention over a
    decode step is a pass over every key it is given: each run reads to its own longest row.
    The rows mostly keep their admission order, which the scheduler makes short-first, so
    neighbours are of like length (on bench/peer.py's workload b, the keys read fall from 2.3x
    the rows' own lengths to 1.25x).
    """
    ends = (positions + 1).tolist()
    runs = max(1, min(most, len(ends) // DECODE_RUN_ROWS))
    size = max(1, -(-len(ends) // runs))  # rows per run (no rows: no runs)
    return [(offset + first, offset + min(first + size, len(ends)), min(max(ends[first : first + size]), most_width))
            for first in range(0, len(ends), size)]


def pooled_runs(pooled, rows):
    """The decoding rows cut into runs of neighbours that read the same leading keys from the
    prefix cache's pool (``pooled``: each row's ``Pooled``, or None; all None when ``pooled`` is
    None): (first row, stop row, their ``Pooled`` or None) each."""
    if pooled is None:
        return [(0, rows, None)] if rows else []
    runs, first = [], 0
    for row in range(1, rows + 1):
        if row == rows or pooled[row] != pooled[first]:
            runs.append((first, row, pooled[first]))
            first = row
    return runs


def _checked_when_built(constructor):
    """``constructor``, followed by ``check_instance`` once the outermost constructor returns
    (which also ends an int8 build, see ``Backbone.__init__``)."""

    @functools.wraps(constructor)
    def __init__(self, *args, **kwargs):
        try:
            constructor(self, *args, **kwargs)
        finally:
            if type(self).__init__ is __init__ and getattr(self, "_building_int8", None) is not None:
                BUILDING_INT8.reset(self._building_int8)
                self._building_int8 = None
        if type(self).__init__ is __init__:  # no subclass constructor is still running
            self.check_instance()

    return __init__
