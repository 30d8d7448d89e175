"""`generate(sampler=...)`, lmq's sampler for one call: exactly what `compile(sampler=...)`
then `generate()` gives (a per-request list included), and the compiled default stays."""

import numpy as np
import pytest

from lmq.core.models import CausalLM, Seq2SeqLM
from lmq.core.samplers import BeamSampler, ContrastiveSampler, TopKSampler, TopPSampler
from lmq.plugins.llama.llama_backbone import LlamaBackbone
from lmq.plugins.llama.llama_causal_lm import LlamaCausalLM
from model_support import FIXTURES, fixture_expected, right_padded
from tests.library.test_samplers import PROMPTS, SIZES, STOP, random_weights

SAMPLERS = {
    "greedy": "greedy",
    "top_k": TopKSampler(k=4, seed=3),
    "top_p": {"name": "top_p", "p": 0.9, "temperature": 1.3, "seed": 5},
    "random": {"name": "random", "temperature": 0.8, "seed": 2},
    "beam": BeamSampler(num_beams=2),
    "contrastive": ContrastiveSampler(k=3, alpha=0.4),
    "per_request": ["greedy", {"name": "top_k", "k": 4, "seed": 1}, {"name": "random", "seed": 7},
                    TopPSampler(p=0.8, seed=9)],
}


@pytest.fixture(scope="module")
def backbone():
    return random_weights(LlamaBackbone(**SIZES))


@pytest.fixture
def lm(backbone):
    lm = LlamaCausalLM(backbone)
    lm.compile(sampler="greedy")
    return lm


def complete(lm, **kwargs):
    """The completions (lists of ids) of PROMPTS through ``generate``'s token-id path."""
    ids, mask = right_padded(PROMPTS)
    ids, mask = np.pad(ids, ((0, 0), (0, 6))), np.pad(mask, ((0, 0), (0, 6)))
    out = lm.generate({"token_ids": ids, "padding_mask": mask}, stop_token_ids=(STOP,), max_new_tokens=6, **kwargs)
    ends = out["padding_mask"].sum(axis=1)
    return [row[len(p) : end].tolist() for row, p, end in zip(out["token_ids"], PROMPTS, ends)]


@pytest.mark.parametrize("sampler", SAMPLERS.values(), ids=SAMPLERS)
def test_a_calls_sampler_gives_what_compiling_it_gives(lm, sampler):
    default, optimizer = lm.sampler, lm.optimizer
    given = complete(lm, sampler=sampler)
    assert lm.sampler is default and lm.optimizer is optimizer  # the call changed nothing on the model
    lm.compile(sampler=sampler)
    assert complete(lm) == given


def test_the_samplers_given_to_calls_take_effect(lm):
    outputs = {tuple(map(tuple, complete(lm, sampler=sampler))) for sampler in SAMPLERS.values()}
    assert len(outputs) >= 4


def test_text_prompts_take_a_calls_sampler_with_stops_and_details(tiny_llama_preset):
    lm = CausalLM.from_preset(str(tiny_llama_preset))
    prompts = ["Return the absolute value", "The", "Open file and return a stream", "Raise"]
    options = dict(max_length=30, stop=["e"], return_details=True)
    default = lm.sampler
    given = lm.generate(prompts, sampler=SAMPLERS["per_request"], **options)
    assert lm.sampler is default
    lm.compile(sampler=SAMPLERS["per_request"])
    assert lm.generate(prompts, **options) == given


def test_a_seq2seq_model_takes_a_calls_sampler():
    bart = Seq2SeqLM.from_preset(str(FIXTURES / "bart"))
    first, second = fixture_expected("bart")["inputs"]
    texts = [first, second, first]
    options = dict(max_length=12, stop_token_ids=None, seed=[3, 4, 5], return_details=True)
    own = [{"name": "random", "temperature": 0.7}, "greedy", {"name": "top_p", "p": 0.95, "temperature": 1.4}]
    for sampler in (own, BeamSampler(num_beams=3)):
        default = bart.sampler
        given = bart.generate(texts, sampler=sampler, **options)
        assert bart.sampler is default
        bart.compile(sampler=sampler)
        assert bart.generate(texts, **options) == given
