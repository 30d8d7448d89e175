"""Samplers on a tiny random Llama: each one does what its definition says.

The model has a vocabulary of 8, so beam search can be checked against scoring
every possible completion, and the narrowed samplers against greedy search.
"""

import itertools

import numpy as np
import pytest
import torch

from lmq.core import samplers
from lmq.core.generation import DecoderOnlyModel, decode
from lmq.core.samplers import (
    BeamSampler,
    ContrastiveSampler,
    GreedySampler,
    RandomSampler,
    TopKSampler,
    TopPSampler,
)
from lmq.plugins.llama.llama_backbone import LlamaBackbone
from lmq.plugins.llama.llama_causal_lm import LlamaCausalLM
from lmq.plugins.mistral.mistral_backbone import MistralBackbone
from import_support import ROOT, assert_no_cycle, imports_of, module_graph
from model_support import random_weights, right_padded

VOCAB = 8
STOP = 5  # a stop token that greedy search emits in some rows of PROMPTS and not others
PROMPTS = [[1, 3, 4, 2, 6, 7, 1], [2, 6], [7, 4, 4, 1], [0, 5, 2]]



SIZES = dict(
    vocabulary_size=VOCAB,
    num_layers=2,
    num_query_heads=4,
    hidden_dim=32,
    intermediate_dim=64,
    num_key_value_heads=2,
)


@pytest.fixture(scope="module")
def lm():
    return LlamaCausalLM(random_weights(LlamaBackbone(**SIZES)))


@pytest.fixture(scope="module")
def model(lm):
    """The decode engine's view of the backbone."""
    return DecoderOnlyModel(lm.backbone)


def generate(lm, sampler, prompts=PROMPTS, new_tokens=6, stop_token_ids=(STOP,), **kwargs):
    """Completions (lists of ids) through ``generate``'s token-id path."""
    lm.compile(sampler=sampler)
    ids, mask = right_padded(prompts)
    ids, mask = np.pad(ids, ((0, 0), (0, new_tokens))), np.pad(mask, ((0, 0), (0, new_tokens)))
    inputs = {"token_ids": ids, "padding_mask": mask}
    out = lm.generate(inputs, stop_token_ids=stop_token_ids, max_new_tokens=new_tokens, **kwargs)
    ends = out["padding_mask"].sum(axis=1)
    return [row[len(p) : end].tolist() for row, p, end in zip(out["token_ids"], prompts, ends)]


def next_token_logits(lm, sequences):
    """Logits after each token of each sequence, without the KV cache: [batch, length, vocab]."""
    ids, mask = right_padded(sequences)
    return lm.score(ids, mask).float()


# -- narrowed samplers are greedy search ----------------------------------------------


@pytest.mark.parametrize(
    "sampler",
    [TopKSampler(k=1), TopPSampler(p=1e-6), BeamSampler(num_beams=1), ContrastiveSampler(alpha=0.0)],
    ids=["top_k_1", "top_p_tiny", "beam_1", "contrastive_alpha_0"],
)
def test_narrowed_samplers_equal_greedy_with_per_row_limits_and_stops(model, sampler):
    limits = [6, 0, 4, 8]
    greedy = decode(model, PROMPTS, limits, GreedySampler(), stop_token_ids=[STOP])
    # The batch mixes rows that stop early, an empty row and a row cut at its limit.
    assert greedy.finish_reasons == ["stop", "length", "length", "stop"]
    assert [len(c) for c in greedy.completions] == [1, 0, 4, 7]
    result = decode(model, PROMPTS, limits, sampler, stop_token_ids=[STOP], seeds=[1, 2, 3, 4])
    assert result.completions == greedy.completions
    assert result.finish_reasons == greedy.finish_reasons


# -- rows that leave and join a running batch ------------------------------------------


def test_rows_that_join_a_running_batch_give_the_tokens_of_one_at_a_time_generation(lm):
    """At most two requests in flight: the others join as rows finish, each at its own position."""
    prompts, limits = PROMPTS * 2, [6, 0, 4, 8, 3, 5, 7, 2]
    for backbone in (lm.backbone, random_weights(MistralBackbone(**SIZES, sliding_window=3))):
        model = DecoderOnlyModel(backbone)
        events = []
        joined = decode(
            model, prompts, limits, GreedySampler(), stop_token_ids=[STOP], max_rows=2,
            stream=lambda request, token: events.append(request),
        )
        for i, (prompt, limit) in enumerate(zip(prompts, limits)):
            alone = decode(model, [prompt], [limit], GreedySampler(), stop_token_ids=[STOP])
            assert joined.completions[i] == alone.completions[0]
            assert joined.finish_reasons[i] == alone.finish_reasons[0]
        assert {"stop", "length"} <= set(joined.finish_reasons)
        # A request that joined later decoded while an earlier one was still running.
        last = {request: n for n, request in enumerate(events)}
        assert any(events.index(j) < last[i] for i in last for j in last if j > i and j >= 2)


def test_what_between_steps_raises_ends_decoding_after_the_results_so_far(model):
    """A job runner stops a job there: the requests that finished were handed out, no others."""
    prompts, limits = PROMPTS * 2, [1, 1, 2, 2, 8, 8, 8, 8]
    finished, steps = [], []

    class Cancelled(Exception):
        pass

    def between_steps():
        steps.append(len(finished))
        if len(steps) == 4:
            raise Cancelled

    with pytest.raises(Cancelled):
        decode(model, prompts, limits, GreedySampler(), max_rows=2, between_steps=between_steps,
               on_finish=lambda request, completion: finished.append((request, completion.token_ids)))
    assert 0 < len(finished) < len(prompts)
    for request, tokens in finished:  # what came out before the stop is each request's whole result
        assert tokens == decode(model, [prompts[request]], [limits[request]], GreedySampler()).completions[0]
    assert steps == sorted(steps) and steps[0] == 0  # checked before every step, as results came out


@pytest.mark.parametrize(
    "sampler",
    [BeamSampler(num_beams=3, return_all_beams=True), ContrastiveSampler(k=3)],
    ids=["beam", "contrastive"],
)
def test_searches_in_a_running_batch_equal_searches_in_one_batch(model, sampler):
    prompts, limits = PROMPTS * 2, [6, 0, 4, 8, 3, 5, 7, 2]
    together = decode(model, prompts, limits, sampler, stop_token_ids=[STOP])
    joined = decode(model, prompts, limits, sampler, stop_token_ids=[STOP], max_rows=2)
    assert (joined.completions, joined.finish_reasons) == (together.completions, together.finish_reasons)
    if together.beams is not None:
        for ours, theirs in zip(joined.beams, together.beams):
            assert [(ids, reason) for ids, _, reason in ours] == [(ids, reason) for ids, _, reason in theirs]
            scores = [score for _, score, _ in theirs]
            assert [score for _, score, _ in ours] == pytest.approx(scores, rel=1e-5, abs=1e-5)  # other neighbours: other float sums


# -- beam search finds the most likely sequence ---------------------------------------


def exhaustive_scores(lm, prompt, new_tokens):
    """Scores every possible completion by summed log-probability; returns {completion: score}.

    A completion is ``new_tokens`` long, or shorter when it ends in the stop token.
    """
    completions = [
        list(c)
        for n in range(1, new_tokens + 1)
        for c in itertools.product(range(VOCAB), repeat=n)
        if STOP not in c[:-1] and (n == new_tokens or c[-1] == STOP)
    ]
    log_probs = torch.log_softmax(next_token_logits(lm, [prompt + c for c in completions]), dim=-1)
    start = len(prompt) - 1
    scores = {}
    for row, completion in enumerate(completions):
        steps = torch.arange(start, start + len(completion))
        scores[tuple(completion)] = log_probs[row, steps, completion].sum().item()
    return scores


def test_beam_search_finds_the_exhaustive_best_sequence(lm, model):
    limits = [3, 2, 3, 3]
    # Enough beams to keep every prefix one token short of the longest limit: search is exact.
    sampler = BeamSampler(num_beams=VOCAB**2, return_all_beams=True)
    result = decode(model, PROMPTS, limits, sampler, stop_token_ids=[STOP])
    greedy = decode(model, PROMPTS, limits, GreedySampler(), stop_token_ids=[STOP])
    assert result.completions != greedy.completions  # the search finds what greedy misses
    for i, (prompt, limit) in enumerate(zip(PROMPTS, limits)):
        scores = exhaustive_scores(lm, prompt, limit)
        best = max(scores, key=scores.get)
        assert result.completions[i] == list(best)
        assert result.finish_reasons[i] == ("stop" if best[-1] == STOP else "length")
        # The beams are the best distinct sequences, scored as the model scores them, best first.
        beams = result.beams[i]
        assert len({tuple(ids) for ids, _, _ in beams}) == len(beams) == min(VOCAB**2, len(scores))
        cutoff = sorted(scores.values(), reverse=True)[len(beams) - 1]
        assert [score for _, score, _ in beams] == sorted((score for _, score, _ in beams), reverse=True)
        for ids, score, reason in beams:
            assert score == pytest.approx(scores[tuple(ids)], abs=1e-4)
            assert score >= cutoff - 1e-4
            assert reason == ("stop" if ids[-1] == STOP else "length")
    assert "stop" in result.finish_reasons  # a finished beam won a row


def test_beam_search_through_generate_returns_the_best_beam(lm, model):
    beam = BeamSampler(num_beams=VOCAB**2)
    direct = decode(model, PROMPTS, [3] * len(PROMPTS), beam, stop_token_ids=[STOP])
    assert direct.beams is None
    assert generate(lm, beam, new_tokens=3) == direct.completions != generate(lm, "greedy", new_tokens=3)


# -- sampling: reproducible, and never outside the kept tokens ------------------------


@pytest.mark.parametrize(
    "sampler", ["random", TopKSampler(k=4), TopPSampler(p=0.8)], ids=["random", "top_k", "top_p"]
)
def test_seeded_sampling_is_reproducible(lm, sampler):
    first = generate(lm, sampler, new_tokens=8, seed=1)
    assert generate(lm, sampler, new_tokens=8, seed=1) == first
    assert generate(lm, sampler, new_tokens=8, seed=2) != first  # the seed is what fixed it


def test_sampler_seed_argument_is_the_default_seed(lm):
    first = generate(lm, TopKSampler(k=4, seed=3), new_tokens=8)
    assert generate(lm, TopKSampler(k=4, seed=3), new_tokens=8) == first
    assert generate(lm, TopKSampler(k=4), new_tokens=8, seed=3) == first


@pytest.mark.parametrize("sampler", [RandomSampler(), TopKSampler(k=4)], ids=["random", "top_k"])
def test_a_seeded_row_samples_the_same_whatever_its_neighbours(model, sampler):
    """A request's draws come from its own seed: alone, among other prompts, or joining a
    running batch of two, its completion is the same."""
    limits = [8] * len(PROMPTS)
    alone = [decode(model, [p], [8], sampler, seeds=[10 + i]).completions[0] for i, p in enumerate(PROMPTS)]
    together = decode(model, PROMPTS, limits, sampler, seeds=[10, 11, 12, 13])
    joined = decode(model, PROMPTS[::-1] * 2, limits * 2, sampler, seeds=[13, 12, 11, 10] * 2, max_rows=2)
    assert together.completions == alone
    assert joined.completions == alone[::-1] * 2
    assert len({tuple(c) for c in alone}) > 1  # the seeds, not the prompts alone, vary the rows
    assert decode(model, PROMPTS, limits, sampler, seeds=[20, 21, 22, 23]).completions != alone


def test_generate_seeds_row_i_with_seed_plus_i(lm):
    batch = generate(lm, TopKSampler(k=4), new_tokens=8, stop_token_ids=None, seed=5)
    second = generate(lm, TopKSampler(k=4), prompts=PROMPTS[1:2], new_tokens=8, stop_token_ids=None, seed=6)
    listed = generate(lm, TopKSampler(k=4), new_tokens=8, stop_token_ids=None, seed=[5, 6, 7, 8])
    assert second == batch[1:2] and listed == batch


def allowed_top_p(probabilities, p):
    """[rows, vocab] -> bool: the smallest set of most likely tokens whose mass reaches p."""
    ordered, order = probabilities.sort(dim=-1, descending=True)
    keep = (ordered.cumsum(-1) - ordered) < p
    return torch.zeros_like(keep).scatter(-1, order, keep)


@pytest.mark.parametrize(
    "sampler",
    [
        TopKSampler(k=3),
        TopKSampler(k=3, temperature=0.5),
        TopPSampler(p=0.6),
        TopPSampler(p=0.9, k=2, temperature=2.0),
    ],
    ids=["top_k", "top_k_temperature", "top_p", "top_p_k_temperature"],
)
def test_samples_never_leave_top_k_or_top_p(sampler):
    logits = torch.randn(4000, 50, generator=torch.Generator().manual_seed(0)) * 3
    probabilities = torch.softmax(logits / sampler.temperature, dim=-1)
    allowed = torch.zeros_like(logits, dtype=torch.bool)
    if getattr(sampler, "k", None):
        allowed.scatter_(-1, probabilities.topk(sampler.k, dim=-1).indices, True)
    else:
        allowed[:] = True
    if isinstance(sampler, TopPSampler):
        allowed &= allowed_top_p(torch.where(allowed, probabilities, 0.0), sampler.p)
    tokens = sampler.next_token(logits, torch.Generator().manual_seed(1))
    assert allowed[torch.arange(len(tokens)), tokens].all()
    # Not a disguised argmax: lower-ranked allowed tokens are drawn too.
    assert (tokens != logits.argmax(-1)).float().mean() > 0.1


def test_model_samples_stay_in_top_k(lm):
    k = 2
    completions = generate(lm, TopKSampler(k=k), new_tokens=8, stop_token_ids=None, seed=4)
    for prompt, completion in zip(PROMPTS, completions):
        logits = next_token_logits(lm, [prompt + completion])[0]
        top = logits.topk(k, dim=-1).indices
        for j, token in enumerate(completion):
            assert token in top[len(prompt) - 1 + j]


# -- contrastive search follows its definition ----------------------------------------


def contrastive_by_hand(lm, prompt, new_tokens, k, alpha):
    """Contrastive search without a cache: every score from full forward passes."""
    backbone = lm.backbone
    sequence = list(prompt)
    with torch.no_grad():
        for _ in range(new_tokens):
            hidden = backbone.call({"token_ids": torch.tensor([sequence])})[0].float()  # [length, hidden]
            probabilities = torch.softmax(backbone.token_embedding.reverse(hidden[-1]), dim=-1)
            top_probabilities, candidates = probabilities.topk(k)
            scores = []
            for probability, candidate in zip(top_probabilities.tolist(), candidates.tolist()):
                after = backbone.call({"token_ids": torch.tensor([sequence + [candidate]])})[0, -1].float()
                penalty = torch.cosine_similarity(after[None], hidden, dim=-1).max().item()
                scores.append((1 - alpha) * probability - alpha * penalty)
            sequence.append(candidates[int(np.argmax(scores))].item())
    return sequence[len(prompt) :]


def test_contrastive_search_follows_its_definition(lm):
    # No stop token, so that the penalty also compares with the tokens generated so far.
    new_tokens, k, alpha = 8, 4, 0.6
    sampler = ContrastiveSampler(k=k, alpha=alpha)
    completions = generate(lm, sampler, new_tokens=new_tokens, stop_token_ids=None)
    expected = [contrastive_by_hand(lm, p, new_tokens, k, alpha) for p in PROMPTS]
    assert completions == expected
    assert completions != generate(lm, "greedy", new_tokens=new_tokens, stop_token_ids=None)


# -- compile(sampler=...) -------------------------------------------------------------


@pytest.mark.parametrize(
    "name, cls",
    [
        ("greedy", GreedySampler),
        ("top_k", TopKSampler),
        ("top_p", TopPSampler),
        ("random", RandomSampler),
        ("beam", BeamSampler),
        ("contrastive", ContrastiveSampler),
    ],
)
def test_compile_takes_a_name_with_keras_hub_defaults(lm, name, cls):
    lm.compile(sampler=name)
    assert type(lm.sampler) is cls
    defaults = {
        "greedy": {"temperature": 1.0},
        "top_k": {"temperature": 1.0, "k": 5, "seed": None},
        "top_p": {"temperature": 1.0, "p": 0.1, "k": None, "seed": None},
        "random": {"temperature": 1.0},
        "beam": {"temperature": 1.0, "num_beams": 5, "return_all_beams": False},
        "contrastive": {"temperature": 1.0, "k": 5, "alpha": 0.6},
    }
    assert lm.sampler.get_config() == defaults[name]


def test_compile_takes_an_instance_and_dicts(lm):
    sampler = BeamSampler(num_beams=3)
    lm.compile(sampler=sampler)
    assert lm.sampler is sampler

    lm.compile(sampler={"name": "top_p", "p": 0.9, "temperature": 0.7, "seed": 1})
    assert type(lm.sampler) is TopPSampler
    assert (lm.sampler.p, lm.sampler.temperature, lm.sampler.seed) == (0.9, 0.7, 1)

    keras_hub = {
        "module": "keras_hub.src.samplers",
        "class_name": "ContrastiveSampler",
        "config": {"temperature": 0.5, "k": 3, "alpha": 0.2},
        "registered_name": "keras_hub>ContrastiveSampler",
    }
    lm.compile(sampler=keras_hub)
    assert type(lm.sampler) is ContrastiveSampler
    assert (lm.sampler.k, lm.sampler.alpha, lm.sampler.temperature) == (3, 0.2, 0.5)


@pytest.mark.parametrize(
    "sampler",
    [
        GreedySampler(),
        RandomSampler(temperature=0.5, seed=2),
        TopKSampler(k=7, seed=3),
        TopPSampler(p=0.3, k=10),
        BeamSampler(num_beams=2, return_all_beams=True),
        ContrastiveSampler(k=3, alpha=0.4, temperature=2.0),
    ],
    ids=lambda s: type(s).__name__,
)
def test_serialized_sampler_round_trips(sampler):
    restored = samplers.get(samplers.serialize(sampler))
    assert type(restored) is type(sampler)
    assert restored.get_config() == sampler.get_config()


@pytest.mark.parametrize(
    "bad, named",
    [
        ("nucleus", "nucleus"),
        (5, "int"),
        (["top_k", "beam"], "beam"),  # a list gives each prompt a token sampler of its own, not a search
        ({"name": "nucleus", "p": 0.9}, "nucleus"),
        ({"class_name": "NucleusSampler", "config": {}}, "NucleusSampler"),
        ({"name": "top_k", "q": 3}, "q"),
        ({"name": "beam", "num_beams": 0}, "num_beams"),
        ({"name": "contrastive", "alpha": 1.5}, "alpha"),
    ],
    ids=str,
)
def test_compile_rejects_anything_else_by_name(lm, bad, named):
    with pytest.raises(ValueError, match=named):
        lm.compile(sampler=bad)


# -- imports flow one way ----------------------------------------------------------------


def test_models_samplers_and_the_decode_engine_import_without_a_cycle():
    """lmq.core.models uses the engine and the samplers; the samplers use the engine; the engine neither."""
    paths = [p for package in ("core/models", "core/samplers", "core/generation") for p in (ROOT / package).rglob("*.py")]
    assert_no_cycle(module_graph(paths))
    for path in (ROOT / "core" / "generation").rglob("*.py"):
        assert not [m for m in imports_of(path) if m.startswith(("lmq.core.models", "lmq.core.samplers", "lmq.core.store"))], path
