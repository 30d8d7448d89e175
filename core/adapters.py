"""LoRA adapters: a fine-tune kept as its own small weights over a base preset.

An **adapter preset** is a directory in Hugging Face PEFT's layout, so that adapters trained
with ``peft`` load here and adapters saved here load in ``peft``::

    adapter_config.json          PEFT's LoraConfig: r, lora_alpha, target_modules, ...;
                                 base_model_name_or_path is the base preset's handle
    adapter_model.safetensors    base_model.model.<module>.lora_A.weight [r, in]
                                 base_model.model.<module>.lora_B.weight [out, r]

``<module>`` is the transformers module a projection comes from (``model.layers.0.self_attn.q_proj``).
Which lmq kernel a module fills is not written down a second time: it is read off the
architecture's own checkpoint converter (its ``convert_weights``, run against a recorder), so
every plugin that converts transformers checkpoints (Llama, Mistral, Phi-3, Falcon) maps
adapter modules too, fused ones (Phi-3's ``qkv_proj``) included.

A loaded ``Adapter`` holds, for each adapted kernel, ``down`` [in, rank] and ``up`` [rank, out]
with its scale folded in. ``CausalLM.from_preset(adapter_dir)`` builds the base and applies one
adapter to every token (``attach``); an ``AdapterBank`` keeps many on one base, and a decode
step whose tokens name different adapters adds each token's own update (``STEP_ADAPTERS``:
one pair of low-rank matmuls per adapter present in the step, over its tokens, as
punica/S-LoRA's segmented matmuls do), so the base's weights are held once.
"""

import contextlib
import importlib
import json
import math
import os
import pathlib
import re
import shutil
import tempfile
from dataclasses import dataclass, field

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lmq.core.layers.projection import STEP_ADAPTERS, Projections, tensor_of
from lmq.core.plugins import get_registry
from lmq.core.presets.resolver import PresetNotFound

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # how PEFT names a module of the model it wraps
LORA_KEY = re.compile(r"base_model\.model\.(.+)\.lora_([AB])\.weight")


def is_adapter_preset(files):
    """Whether the preset (``PresetFiles``) is an adapter: PEFT's config and no model of its own."""
    return files.is_file(ADAPTER_CONFIG) and not files.is_file("config.json")


# -- which kernel a transformers module fills ----------------------------------------------


class _Recorder:
    """Stands in for a checkpoint while a converter's ``convert_weights`` runs: records which
    transformers tensor (through which transform) fills each variable, reading nothing."""

    def __init__(self):
        self.assigned = []  # (variable, tensor name, transform)

    def __contains__(self, name):
        return True

    def assign(self, variable, name, transform=None):
        self.assigned.append((variable, name, transform))


@dataclass(frozen=True)
class Piece:
    """One lmq kernel that a transformers module's weight [out, in] fills (a fused module fills several)."""

    layer: Projections
    kernel: str  # the layer's kernel attribute
    transform: object  # the converter's: the module's weight -> the kernel's shape

    def output_rows(self, out, inputs, module):
        """Which of the module's ``out`` output rows give this kernel's outputs, in order: the
        converter's transform run on row numbers. It must keep the input axis whole and in order
        (a kernel's [in, out] view is the weight's rows, picked and transposed), as every
        projection's does. The probes are broadcast views, and only their first and last input
        rows and columns are compared, so a 7B model's adapter maps in moments."""
        width = math.prod(getattr(self.layer, self.kernel).shape[-self.layer.kernels[self.kernel] :])
        probe = torch.arange(max(out, inputs), dtype=torch.int32)
        try:
            rows = self.transform(probe[:out, None].expand(out, inputs)).reshape(-1, width)
            columns = self.transform(probe[None, :inputs].expand(out, inputs)).reshape(-1, width)
        except (RuntimeError, IndexError):
            rows = columns = None
        ends = [0, width - 1]
        if rows is None or len(rows) != inputs or not torch.equal(columns[:, ends], probe[:inputs, None].expand(inputs, 2)):
            raise ValueError(f"adapter module {module!r}: a [{out}, {inputs}] weight does not fit the base's layer")
        if not torch.equal(rows[0], rows[-1]) or len(rows[0].unique()) != width:
            raise ValueError(f"adapter module {module!r}: lmq cannot map its weight's rows onto the base's kernel")
        return rows[0].long()


def lora_targets(backbone):
    """{transformers module name: its ``Piece``s} for every projection of ``backbone`` (the token
    embedding and head excepted), from its architecture's checkpoint converter."""
    architecture = get_registry().architecture_of_class(type(backbone).__name__)
    if architecture is None or architecture.hf_converter is None:
        raise ValueError(f"{type(backbone).__name__} converts no transformers checkpoints, so it maps no adapter modules.")
    recorder = _Recorder()
    importlib.import_module(architecture.hf_converter).convert_weights(backbone, recorder)
    kernels = {
        id(getattr(layer, name)): (layer, name)
        for layer in backbone._projection_layers()
        if layer is not backbone.token_embedding
        for name in layer.kernel_names()
    }
    targets = {}
    for variable, name, transform in recorder.assigned:
        if id(variable) in kernels and name.endswith(".weight") and transform is not None:
            targets.setdefault(name.removesuffix(".weight"), []).append(Piece(*kernels[id(variable)], transform))
    return targets


# -- an adapter in memory --------------------------------------------------------------------


@dataclass(eq=False)
class Adapter:
    """One fine-tune's low-rank updates, mapped onto one loaded base's layers."""

    name: str
    base: str | None  # the base preset's handle, as adapter_config.json names it
    updates: dict = field(repr=False)  # (layer, kernel name) -> (down [in, rank], up [rank, out], scale folded in)

    @property
    def nbytes(self):
        """The bytes its tensors hold (a fused module's shared ``down`` counted once)."""
        unique = {id(t): t for pair in self.updates.values() for t in pair}
        return sum(t.numel() * t.element_size() for t in unique.values())


def _scale(config, module, rank):
    """PEFT's scale of ``module``: its ``lora_alpha`` (or the ``alpha_pattern`` entry that matches
    its name, as PEFT matches them) over its rank, or over the rank's square root with ``use_rslora``."""
    alpha = config.get("lora_alpha", 8)
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.fullmatch(rf"(.*\.)?(?:{pattern})", module):
            alpha = value
            break
    return alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)


def read_config(files):
    """adapter_config.json, checked to describe a plain LoRA that lmq applies as PEFT does."""
    config = files.read_json(ADAPTER_CONFIG)
    if config.get("peft_type", "LORA") != "LORA":
        raise files.error(ADAPTER_CONFIG, f"peft_type {config.get('peft_type')!r} is not supported; only LORA adapters are")
    for key, plain in (("use_dora", False), ("bias", "none"), ("fan_in_fan_out", False), ("modules_to_save", None)):
        if config.get(key, plain) not in (plain, [], False):
            raise files.error(ADAPTER_CONFIG, f"{key}={json.dumps(config[key])} is not supported (lmq applies plain LoRA)")
    alphas = [config.get("lora_alpha", 8), *(config.get("alpha_pattern") or {}).values()]
    if not isinstance(config.get("alpha_pattern") or {}, dict) or not all(_is_number(a) for a in alphas):
        raise files.error(ADAPTER_CONFIG, "lora_alpha and alpha_pattern's values must be numbers")
    return config


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def named_base(files):
    """The base preset an adapter preset's config names (``base_model_name_or_path``)."""
    base = read_config(files).get("base_model_name_or_path")
    if not isinstance(base, str) or not base:
        raise files.error(ADAPTER_CONFIG, "names no base preset (base_model_name_or_path); pass base=")
    return base


def read_adapter(files, backbone, name=None):
    """The adapter preset ``files`` (``PresetFiles``) as an ``Adapter`` over ``backbone``: each
    module's weights mapped onto the kernels it adapts, in the base's dtype, on its device."""
    config = read_config(files)
    try:
        tensors = load_file(files.file(ADAPTER_WEIGHTS))
    except (SafetensorError, OSError):  # its messages can quote the file's header
        raise files.error(ADAPTER_WEIGHTS, "is not a readable safetensors file") from None
    modules = {}
    for key, tensor in tensors.items():
        found = LORA_KEY.fullmatch(key)
        if found is None:
            raise files.error(ADAPTER_WEIGHTS, f"tensor {key!r} is not a LoRA weight (lora_A or lora_B) lmq applies")
        modules.setdefault(found.group(1), {})[found.group(2)] = tensor
    targets = lora_targets(backbone)
    dtype, device = backbone.token_embedding.output_dtype, backbone.device
    updates = {}
    for module, pair in sorted(modules.items()):
        if set(pair) != {"A", "B"}:
            raise files.error(ADAPTER_WEIGHTS, f"module {module!r} lacks its lora_{'B' if 'A' in pair else 'A'} weight")
        if module not in targets:
            raise files.error(ADAPTER_WEIGHTS, f"module {module!r} is no projection of the base ({type(backbone).__name__})")
        a, b = pair["A"].double(), pair["B"].double()
        if a.ndim != 2 or b.ndim != 2 or b.shape[1] != a.shape[0]:
            raise files.error(ADAPTER_WEIGHTS, f"module {module!r}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not pair")
        scale = _scale(config, module, a.shape[0])
        down = a.T.to(device=device, dtype=dtype).contiguous()
        for piece in targets[module]:
            try:
                rows = piece.output_rows(b.shape[0], a.shape[1], module)
            except ValueError as error:
                raise files.error(ADAPTER_WEIGHTS, str(error)) from None
            up = (b[rows].T * scale).to(device=device, dtype=dtype).contiguous()
            updates[(piece.layer, piece.kernel)] = (down, up)
    return Adapter(name or files.name, config.get("base_model_name_or_path"), updates)


def attach(task, adapter):
    """Applies ``adapter`` to every token of ``task`` (``fit``, ``score`` and ``generate`` alike), as
    PEFT's unmerged LoRA does; ``save_to_preset`` then writes it merged into a plain preset."""
    layers = {layer for layer, _ in adapter.updates}
    if any(layer.lora for layer in layers):
        raise ValueError("This model already has LoRA updates; load the adapter onto a plain base.")
    for (layer, kernel), pair in adapter.updates.items():
        layer.lora[kernel] = pair
        layer.lora_scale = 1.0  # folded into ``up``


def base_of(files, resolver, base=None):
    """The handle of the base an adapter preset (``files``) goes over: ``base`` when given, else the
    one its config names, as an lmq handle, or a Hugging Face repository id (``org/name``, as ``peft``
    writes it) as ``hf://org/name``."""
    if base is None:
        base = named_base(files)
        try:
            resolver.locate(base)
        except PresetNotFound:
            if not re.fullmatch(r"[\w.-]+/[\w.-]+", base) or os.path.isabs(base):
                raise
            base = f"hf://{base}"
    if is_adapter_preset(resolver.files(base)):
        raise files.error(ADAPTER_CONFIG, f"its base {base!r} is itself an adapter; name a model preset")
    return base


# -- writing an adapter preset ----------------------------------------------------------------


def save_adapter_preset(task, directory, base_preset):
    """Writes ``task``'s LoRA updates (``backbone.enable_lora`` then ``fit``, or an attached adapter)
    as an adapter preset in ``directory`` over ``base_preset`` (the handle adapter_config.json names),
    in PEFT's layout. Written into a temporary directory first, then moved in place.

    A transformers module whose output several kernels share (Phi-3's ``qkv_proj``) gets the
    kernels' updates side by side: its rank is theirs added up, and its ``rank_pattern`` and
    ``alpha_pattern`` say so when that differs from the others'.
    """
    tensors, ranks, scales = {}, {}, set()
    for module, pieces in lora_targets(task.backbone).items():
        adapted = [(piece, *map(tensor_of, piece.layer.lora[piece.kernel])) for piece in pieces if piece.kernel in piece.layer.lora]
        if not adapted:
            continue
        inputs = adapted[0][1].shape[0]
        out = sum(math.prod(getattr(p.layer, p.kernel).shape[-p.layer.kernels[p.kernel] :]) for p in pieces)
        downs, ups = [], []  # each kernel's down.T [rank, in] and its up.T in the module's rows [out, rank]
        for piece, down, up in adapted:
            rows = piece.output_rows(out, inputs, module)
            ups.append(torch.zeros(out, down.shape[1]).index_copy(0, rows, up.detach().float().cpu().T))
            downs.append(down.detach().float().cpu().T)
            scales.add(piece.layer.lora_scale)
        tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = torch.cat(downs).contiguous()
        tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = torch.cat(ups, dim=1).contiguous()
        ranks[module] = sum(d.shape[0] for d in downs)
    if not tensors:
        raise ValueError("This model has no LoRA updates to save: call backbone.enable_lora(rank) before fit.")
    if len(scales) != 1:
        raise ValueError(f"Its layers' LoRA scales differ ({sorted(scales)}); an adapter preset keeps one.")
    scale = scales.pop()
    rank = max(set(ranks.values()), key=list(ranks.values()).count)
    odd = {module: r for module, r in ranks.items() if r != rank}
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base_preset),
        "r": rank,
        "lora_alpha": scale * rank,
        "target_modules": sorted({module.rsplit(".", 1)[-1] for module in ranks}),
        "rank_pattern": odd,
        "alpha_pattern": {module: scale * r for module, r in odd.items()},
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
    }
    directory = pathlib.Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        (staging / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
        save_file(tensors, staging / ADAPTER_WEIGHTS, metadata={"format": "pt"})
        directory.mkdir(exist_ok=True)
        for item in staging.iterdir():
            os.replace(item, directory / item.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# -- many adapters over one base ---------------------------------------------------------------


class AdapterBank:
    """The adapters loaded over one base, each with a slot: the index a step gives its tokens."""

    def __init__(self):
        self._adapters = []  # slot -> Adapter, or None once removed
        self._slots = {}  # name -> slot

    def add(self, adapter):
        """Keeps ``adapter`` (replacing one of its name); returns its slot."""
        if adapter.name in self._slots:
            self.remove(adapter.name)
        slot = self._adapters.index(None) if None in self._adapters else len(self._adapters)
        self._adapters[slot : slot + 1] = [adapter]
        self._slots[adapter.name] = slot
        return slot

    def remove(self, name):
        self._adapters[self._slots.pop(name)] = None

    def __contains__(self, name):
        return name in self._slots

    def names(self):
        return list(self._slots)

    def slot(self, name):
        if name not in self._slots:
            raise ValueError(f"adapter {name!r} is not loaded on this model (loaded: {sorted(self._slots)})")
        return self._slots[name]

    @property
    def nbytes(self):
        return sum(adapter.nbytes for adapter in self._adapters if adapter is not None)

    @contextlib.contextmanager
    def serving(self, slots):
        """For one forward pass: token i adds the update of the adapter in ``slots[i]`` (-1: none)."""
        present = [slot for slot in slots.unique().tolist() if slot >= 0]
        groups = tuple((self._adapters[slot].updates, (slots == slot).nonzero()[:, 0]) for slot in present)
        token = STEP_ADAPTERS.set(groups)
        try:
            yield
        finally:
            STEP_ADAPTERS.reset(token)
