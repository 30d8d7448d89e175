"""``Task``: a backbone plus a head and a preprocessor, loadable from and savable to presets."""

import keras

from lmq.core.models.backbone import unwrap_quantize
from lmq.core.models.serialization import KerasHubSerializable, deserialize


class classproperty:
    def __init__(self, getter):
        self.getter = getter

    def __get__(self, instance, owner):
        return self.getter(owner)


class Task(KerasHubSerializable, keras.Model):
    config_file = "task.json"
    backbone_cls = None
    preprocessor_cls = None
    task_kind = None  # a TaskKind: what ``from_preset`` on a base class may return

    def __init__(self, backbone, preprocessor=None, name=None, **kwargs):
        kwargs.pop("trainable", None)
        kwargs.pop("dtype", None)
        super().__init__(name=name or self.default_name(), **kwargs)
        unwrap_quantize(self)
        self.backbone = backbone
        self.preprocessor = preprocessor
        self.built = True

    def get_config(self):
        return {
            "backbone": self.backbone.serialize(),
            "preprocessor": self.preprocessor.serialize() if self.preprocessor else None,
            "name": self.name,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        backbone = config.pop("backbone")
        if isinstance(backbone, dict):
            backbone = deserialize(backbone, source=cls.config_file)
        preprocessor = config.pop("preprocessor", None)
        if isinstance(preprocessor, dict):
            preprocessor = deserialize(preprocessor, source=cls.config_file)
        return cls(backbone=backbone, preprocessor=preprocessor, **config)

    @classmethod
    def from_preset(cls, preset, load_weights=True, resolver=None, device=None, **kwargs):
        """Builds the task a preset describes (see ``lmq.core.presets.load_task``); ``resolver``
        (a ``PresetResolver``) knows names beyond the built-in ones, e.g. the store's.

        ``device`` ("auto", "cpu", "cuda" or "cuda:N", as ``LMQ_DEVICE``) places the weights
        (by default where Keras puts them: the GPU when there is one); on a GPU they load
        in bfloat16 unless ``dtype`` says otherwise, on a CPU in the preset's dtype.
        Called on a base class (``CausalLM``) it returns the subclass the preset names.
        """
        from lmq.core.presets import load_task

        if device is None:
            return load_task(preset, cls=cls, load_weights=load_weights, resolver=resolver, **kwargs)
        device = resolve_device(device)
        if device.startswith("cuda") and kwargs.get("dtype") is None:
            kwargs["dtype"] = "bfloat16"
        with keras.device(device):
            return load_task(preset, cls=cls, load_weights=load_weights, resolver=resolver, **kwargs)

    def quantize(self, mode, **kwargs):
        """The backbone's ``quantize`` (``"int8"``, as KerasHub's: see ``lmq.core.quantization``)."""
        self.backbone.quantize(mode, **kwargs)

    def fit(self, *args, **kwargs):
        """Keras' ``fit``, refused on an int8 model: its kernels are frozen integers."""
        if self.backbone.quantization_mode is not None:
            raise ValueError(
                f"{type(self).__name__} is {self.backbone.quantization_mode}: fine-tune the float model, "
                "then quantize it."
            )
        return super().fit(*args, **kwargs)

    def save_to_preset(self, preset_dir):
        from lmq.core.presets import save_task

        save_task(self, preset_dir)

    @classproperty
    def presets(cls):
        """Built-in preset names this class can load (KerasHub's ``cls.presets``)."""
        from lmq.core.plugins import get_registry

        registry = get_registry()
        found = {}
        for architecture in registry.architectures():
            task_cls_name = architecture.task.rsplit(":", 1)[1]
            matches = cls.__name__ in (task_cls_name, "Task") or (
                cls.task_kind is not None
                and cls.task_kind == architecture.task_kind
                and cls.backbone_cls is None
            )
            if matches:
                found.update(architecture.presets)
        return found


def resolve_device(device="auto"):
    """A device setting ("auto", "cpu", "cuda", "cuda:N") as torch names it: auto is cuda when
    torch sees a GPU, else cpu; a GPU asked for on a machine without one is a ValueError."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device!r}, but torch sees no GPU on this machine")
    return device
