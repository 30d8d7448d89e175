"""lmq.core.names is the one list of sampler names, dtypes and job states: it matches what
core.samplers and keras actually accept, and it loads nothing heavy."""

import inspect
import subprocess
import sys

import pytest

from lmq.core.domain.generation import SamplerConfig
from lmq.core.names import DTYPES, SAMPLER_ARGUMENTS, SAMPLER_NAMES, TERMINAL_STATES, JobState

# A value inside the API's bounds for each argument a sampler may take.
ARGUMENT_VALUES = {"k": 3, "p": 0.5, "num_beams": 2, "alpha": 0.3}


def registered_samplers():
    import lmq.core.samplers

    found, pending = {}, [lmq.core.samplers.Sampler]
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        if cls.name is not None and cls.__module__.startswith("lmq."):  # not the test suites' own subclasses
            found[cls.name] = cls
    return found


def test_the_sampler_names_are_the_registrys():
    assert sorted(SAMPLER_NAMES) == sorted(registered_samplers())


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_each_sampler_takes_the_arguments_the_api_lets_through(name):
    import lmq.core.samplers

    arguments = {argument: ARGUMENT_VALUES[argument] for argument in SAMPLER_ARGUMENTS[name]}
    sampler = lmq.core.samplers.get({"name": name, "temperature": 0.7, "seed": 1, **arguments})
    assert type(sampler) is registered_samplers()[name]
    parameters = {
        parameter
        for cls in type(sampler).__mro__
        if "__init__" in vars(cls)
        for parameter in inspect.signature(cls.__init__).parameters
    }
    assert set(arguments) <= parameters
    for argument, value in arguments.items():
        assert getattr(sampler, argument) == value


def test_the_request_model_has_a_field_for_every_sampler_argument():
    every_argument = {argument for arguments in SAMPLER_ARGUMENTS.values() for argument in arguments}
    assert set(SamplerConfig.model_fields) == {"name", "temperature", "seed"} | every_argument


def test_the_dtypes_are_keras_floating_dtypes():
    import keras

    for dtype in DTYPES:
        assert keras.backend.standardize_dtype(dtype) == dtype and "float" in dtype


def test_terminal_states():
    assert TERMINAL_STATES == ("succeeded", "failed", "cancelled")
    assert [state.value for state in JobState if not state.terminal] == [
        "validating", "queued", "running", "cancelling", "pausing", "paused"
    ]


def test_the_names_module_imports_only_the_standard_library():
    code = (
        "import sys; before = set(sys.modules); import lmq.core.names; "
        "new = {m.partition('.')[0] for m in set(sys.modules) - before}; "
        "assert new <= {'lmq', 'enum', 're'}, sorted(new)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
