"""A preset's declared sizes are checked before anything is built (issue 27): CausalLM.from_preset and
the worker's model pool refuse, naming the field and the size, what cannot fit; the estimate never
refuses what fits."""

import json

import pytest
from hostile_presets import BIG_INTEGER, HOSTILE_PRESETS, TINY_LLAMA, make_hostile_preset

from lmq.core.presets.files import PresetFileError, PresetFiles
from lmq.core.presets.sizes import PresetTooLarge, preset_sizes
from lmq.workers.pool import ModelPool

FIXTURES = TINY_LLAMA.parent


@pytest.mark.parametrize("name", sorted(HOSTILE_PRESETS))
def test_from_preset_refuses_a_preset_too_large_for_this_machine(tmp_path, name):
    from lmq.core.models import CausalLM

    directory = make_hostile_preset(tmp_path / name, name)
    with pytest.raises(ValueError, match=HOSTILE_PRESETS[name][2]) as refused:
        CausalLM.from_preset(str(directory))
    assert isinstance(refused.value, PresetTooLarge) and "this machine's memory" in str(refused.value)


def test_from_preset_names_a_config_json_that_does_not_parse(tmp_path):
    from lmq.core.models import CausalLM

    directory = make_hostile_preset(tmp_path / BIG_INTEGER, BIG_INTEGER)
    with pytest.raises(PresetFileError, match="file config.json: is not valid JSON \\(a number too long to read\\)"):
        CausalLM.from_preset(str(directory))


def test_the_pool_refuses_weights_over_its_budget_before_loading(tmp_path):
    pool = ModelPool(budget_bytes=10_000, device="cpu")
    with pytest.raises(PresetTooLarge, match=r"vocabulary_size 1000 x hidden_dim 32 make weights of at least .*LMQ_MODEL_MEMORY_GB"):
        pool.get(str(TINY_LLAMA))
    assert pool.keys() == [] and pool.misses == 1


@pytest.mark.parametrize("name", ["llama", "llama3", "mistral", "mistral_int8", "phi3", "falcon", "bart"])
def test_the_estimate_is_a_lower_bound_of_the_weights(name):
    """Never more than the parameters the preset's metadata counts, at the bytes its dtype gives them."""
    files = PresetFiles(FIXTURES / name, name)
    metadata = json.loads((FIXTURES / name / "metadata.json").read_text())
    assert 0 < preset_sizes(files).weights.bytes <= metadata["parameter_count"] * 4
