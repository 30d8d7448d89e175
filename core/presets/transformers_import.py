"""Converting a transformers checkpoint (config.json with ``model_type``, safetensors) on load.

The architecture registered for the ``model_type`` supplies a converter module with
``backbone_config(hf_config) -> dict`` (KerasHub backbone arguments),
``convert_weights(backbone, checkpoint)`` and ``tokenizer(directory) -> Tokenizer | None``.
Only safetensors are read; pickle files (``*.bin``) are refused.
"""

import importlib
import json

from safetensors import safe_open

from core.plugins import get_registry
from core.presets.keras_hub_format import read_json

SAFETENSORS_INDEX = "model.safetensors.index.json"


def is_transformers_checkpoint(directory):
    path = directory / "config.json"
    if not path.is_file():
        return False
    try:
        return "model_type" in json.loads(path.read_text())
    except json.JSONDecodeError:
        return False


class Checkpoint:
    """Tensors of a (possibly sharded) safetensors checkpoint, read one at a time."""

    def __init__(self, directory):
        self.directory = directory
        index = directory / SAFETENSORS_INDEX
        if index.is_file():
            weight_map = read_json(index)["weight_map"]
            self.files = {name: directory / file for name, file in weight_map.items()}
        else:
            single = directory / "model.safetensors"
            if not single.is_file():
                pickles = sorted(p.name for p in directory.glob("*.bin"))
                hint = f" (found {pickles}: pickle files are never loaded)" if pickles else ""
                raise FileNotFoundError(f"No safetensors weights in {directory}{hint}.")
            with safe_open(single, framework="pt") as handle:
                self.files = {name: single for name in handle.keys()}
        self._handles = {}

    def __contains__(self, name):
        return name in self.files

    def read(self, name):
        if name not in self.files:
            raise ValueError(f"Checkpoint {self.directory} has no tensor {name!r}.")
        path = self.files[name]
        if path not in self._handles:
            self._handles[path] = safe_open(path, framework="pt")
        return self._handles[path].get_tensor(name)

    def assign(self, variable, name, transform=None):
        """Copies tensor ``name`` (after ``transform``) into ``variable``, checking its shape."""
        tensor = self.read(name)
        if transform is not None:
            tensor = transform(tensor)
        if tuple(tensor.shape) != tuple(variable.shape):
            raise ValueError(
                f"Checkpoint {self.directory}: tensor {name!r} has shape {tuple(tensor.shape)} "
                f"(after conversion), but the config needs {tuple(variable.shape)}."
            )
        variable.assign(tensor.to(variable.value.dtype))


def _architecture(directory):
    hf_config = read_json(directory / "config.json")
    model_type = hf_config["model_type"]
    architecture = get_registry().for_hf_model_type(model_type)
    if architecture is None or architecture.hf_converter is None:
        raise ValueError(
            f"{directory / 'config.json'}: no registered lmq plugin converts transformers "
            f"model_type {model_type!r}."
        )
    return hf_config, architecture, importlib.import_module(architecture.hf_converter)


def checkpoint_dtype(hf_config):
    dtype = hf_config.get("torch_dtype") or hf_config.get("dtype")
    return dtype if dtype in ("float32", "float16", "bfloat16") else None


def load_backbone(directory, load_weights=True, dtype=None):
    hf_config, architecture, converter = _architecture(directory)
    config = converter.backbone_config(hf_config)
    config["dtype"] = dtype or checkpoint_dtype(hf_config)
    backbone = architecture.load("backbone")(**config)
    if load_weights:
        converter.convert_weights(backbone, Checkpoint(directory))
    return backbone


def load_task(directory, cls, load_weights=True, dtype=None, preprocessor="auto", **kwargs):
    backbone = load_backbone(directory, load_weights, dtype)
    architecture = get_registry().architecture_of_class(type(backbone).__name__)
    task_cls = architecture.load("task")
    if not issubclass(task_cls, cls):
        raise ValueError(f"Checkpoint {directory} holds a {task_cls.__name__}, not a {cls.__name__}.")
    if isinstance(preprocessor, str) and preprocessor == "auto":
        preprocessor = load_preprocessor(directory)
    return task_cls(backbone=backbone, preprocessor=preprocessor, **kwargs)


def load_preprocessor(directory, **overrides):
    """The architecture's preprocessor around the checkpoint's tokenizer files; None without them."""
    _, architecture, converter = _architecture(directory)
    tokenizer = converter.tokenizer(directory)
    if tokenizer is None:
        return None
    return architecture.load("preprocessor")(tokenizer=tokenizer, **overrides)


def decoder_config(hf_config):
    """The settings Llama-layout checkpoints (Llama, Mistral) share -> KerasHub's backbone arguments."""
    heads = hf_config["num_attention_heads"]
    return {
        "vocabulary_size": hf_config["vocab_size"],
        "num_layers": hf_config["num_hidden_layers"],
        "num_query_heads": heads,
        "hidden_dim": hf_config["hidden_size"],
        "intermediate_dim": hf_config["intermediate_size"],
        "num_key_value_heads": hf_config.get("num_key_value_heads") or heads,
        "layer_norm_epsilon": hf_config.get("rms_norm_eps", 1e-6),
    }


def rope_settings(hf_config):
    """(theta, rope type, all rope settings) from ``rope_scaling`` or transformers 5's ``rope_parameters``."""
    rope = dict(hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {})
    theta = hf_config.get("rope_theta", rope.get("rope_theta", 10000.0))
    return theta, rope.get("rope_type", rope.get("type", "default")), rope


def convert_decoder_weights(backbone, checkpoint):
    """Llama-layout checkpoints (Llama, Mistral): q/k/v/o, gate/up/down, two norms per layer."""
    hidden = backbone.hidden_dim

    def heads(num_heads):  # [heads * head_dim, hidden] -> [hidden, heads, head_dim]
        return lambda w: w.T.reshape(hidden, num_heads, -1)

    def transpose(w):
        return w.T

    checkpoint.assign(backbone.token_embedding.embeddings, "model.embed_tokens.weight")
    for i, block in enumerate(backbone.transformer_layers):
        prefix = f"model.layers.{i}"
        attention, feedforward = block.attention, block.feedforward
        query_heads, kv_heads = attention.num_query_heads, attention.num_key_value_heads
        checkpoint.assign(attention.query_kernel, f"{prefix}.self_attn.q_proj.weight", heads(query_heads))
        checkpoint.assign(attention.key_kernel, f"{prefix}.self_attn.k_proj.weight", heads(kv_heads))
        checkpoint.assign(attention.value_kernel, f"{prefix}.self_attn.v_proj.weight", heads(kv_heads))
        checkpoint.assign(
            attention.output_kernel,
            f"{prefix}.self_attn.o_proj.weight",
            lambda w: w.T.reshape(query_heads, -1, hidden),
        )
        checkpoint.assign(feedforward.gate_kernel, f"{prefix}.mlp.gate_proj.weight", transpose)
        checkpoint.assign(feedforward.intermediate_kernel, f"{prefix}.mlp.up_proj.weight", transpose)
        checkpoint.assign(feedforward.output_kernel, f"{prefix}.mlp.down_proj.weight", transpose)
        checkpoint.assign(block.attention_norm.scale, f"{prefix}.input_layernorm.weight")
        checkpoint.assign(block.feedforward_norm.scale, f"{prefix}.post_attention_layernorm.weight")
    checkpoint.assign(backbone.layer_norm.scale, "model.norm.weight")
    if backbone.token_embedding.reverse_embeddings is not None:
        checkpoint.assign(backbone.token_embedding.reverse_embeddings, "lm_head.weight", transpose)
