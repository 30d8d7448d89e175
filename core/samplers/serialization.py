"""Samplers by name: ``compile(sampler=...)``'s names, dicts, KerasHub's serialized form, and
lists of these (one token sampler per prompt)."""

from lmq.core.samplers.base import GreedySampler, Sampler
from lmq.core.samplers.beam import BeamSampler
from lmq.core.samplers.contrastive import ContrastiveSampler
from lmq.core.samplers.per_request import PerRequestSampler
from lmq.core.samplers.sampling import RandomSampler, TopKSampler, TopPSampler

SAMPLERS = {
    cls.name: cls
    for cls in (GreedySampler, RandomSampler, TopKSampler, TopPSampler, BeamSampler, ContrastiveSampler)
}


def get(identifier):
    """A sampler from a name, a ``{"name": ..., **args}`` dict, a KerasHub-serialized dict, or
    itself; a list of these is a ``PerRequestSampler``, the i-th for prompt i."""
    if isinstance(identifier, Sampler):
        return identifier
    if isinstance(identifier, (list, tuple)):
        return PerRequestSampler([get(each) for each in identifier])
    by_class_name = {cls.__name__: cls for cls in SAMPLERS.values()}
    if isinstance(identifier, str):
        if identifier not in SAMPLERS:
            raise ValueError(f"Unknown sampler {identifier!r}; expected one of {sorted(SAMPLERS)}.")
        return SAMPLERS[identifier]()
    if isinstance(identifier, dict):
        if "class_name" in identifier:
            cls = by_class_name.get(identifier["class_name"])
            arguments = identifier.get("config", {})
        else:
            arguments = dict(identifier)
            cls = SAMPLERS.get(arguments.pop("name", None))
        if cls is None:
            raise ValueError(f"Unknown sampler {identifier!r}; expected one of {sorted(SAMPLERS)}.")
        try:
            return cls(**arguments)
        except TypeError as error:
            raise ValueError(f"Bad arguments for sampler {cls.name!r}: {error}") from None
    raise ValueError(
        f"sampler must be a name, a dict, a Sampler or a list of them, got {type(identifier).__name__}: {identifier!r}."
    )


def serialize(sampler):
    cls = type(sampler)
    return {
        "module": "keras_hub.src.samplers",
        "class_name": cls.__name__,
        "config": sampler.get_config(),
        "registered_name": f"keras_hub>{cls.__name__}",
    }
