"""Prefix caching in the decode engine: prompt blocks computed once, reused by the requests
that share them, with the tokens (and logits, to float rounding) of computing them again.

Tiny random decoders (Llama, Mistral whose window is shorter than the prompts, Falcon with
ALiBi); prompts share a leading instruction, then tokens of their own. Each test counts the
prompt tokens the engine ran through the model, with and without the cache.
"""

import ctypes
import mmap

import pytest
import torch

from lmq.core.config import SettingsError, load_settings
from lmq.core.generation import DecoderOnlyModel, Engine, PrefixCache, Request, decode
from lmq.core.layers import KVCache, RollingKVCache
from lmq.core.models import CausalLM, Seq2SeqLM
from lmq.plugins.llama import LlamaCausalLM
from lmq.core.models.seq2seq_lm import EncoderDecoderModel
from lmq.core.samplers import BeamSampler, ContrastiveSampler, GreedySampler
from model_support import (
    ENGINE_VOCAB, FIXTURES, assert_greedy_rows_equal, engine_backbones, random_adapter, random_weights,
)
from tests.library.test_adapters import completions as adapter_completions

BACKBONES = engine_backbones()
BLOCK = 16  # PrefixCache's default block size


@pytest.fixture(scope="module", params=list(BACKBONES))
def model(request):
    return DecoderOnlyModel(random_weights(BACKBONES[request.param]()))


@pytest.fixture(scope="module")
def llama():
    return DecoderOnlyModel(random_weights(BACKBONES["llama"]()))


def shared_prefix_job(count, prefix_length, seed=0, own=(3, 10)):
    """``count`` prompts: one random prefix of ``prefix_length`` tokens, then ``own`` tokens of their own."""
    generator = torch.Generator().manual_seed(seed)
    prefix = torch.randint(0, ENGINE_VOCAB, (prefix_length,), generator=generator).tolist()
    lengths = torch.randint(own[0], own[1] + 1, (count,), generator=generator).tolist()
    return [prefix + torch.randint(0, ENGINE_VOCAB, (n,), generator=generator).tolist() for n in lengths]


def run(model, prompts, limits, sampler=None, **options):
    """(the engine after decoding, its result)."""
    requests = [Request(i, prompt, limit) for i, (prompt, limit) in enumerate(zip(prompts, limits))]
    sampler = sampler or GreedySampler()
    engine = Engine.for_requests(model, sampler, requests, **options)
    with torch.inference_mode():
        return engine, engine.run(engine.submit(requests, sampler))


class RecordingGreedy(GreedySampler):
    """Greedy search that keeps every row's logits, by (request, tokens so far)."""

    def __init__(self):
        super().__init__()
        self.seen = {}

    def choose(self, batch, logits):
        for request, length, row in zip(batch.rows["request"].tolist(), batch.rows["length"].tolist(), logits):
            self.seen[request, length] = row.clone()
        return super().choose(batch, logits)


def test_shared_blocks_are_computed_once_with_the_tokens_and_logits_of_computing_them(model):
    """Two requests in flight, prompts in chunks of 16: the first request's two full prefix
    blocks (32 of its 40 shared tokens) go into the cache as it computes them, and each later
    request starts its prefill after them. Greedy tokens are those without the cache, logits
    equal to float rounding, and the prompt tokens computed fall by 32 per later request."""
    prompts = shared_prefix_job(8, prefix_length=40)
    limits = [6] * len(prompts)
    options = dict(max_rows=2, prefill_chunk=BLOCK)
    with_cache, without = RecordingGreedy(), RecordingGreedy()
    cached_engine, cached = run(model, prompts, limits, with_cache, **options)
    plain_engine, plain = run(model, prompts, limits, without, prefix_cache=False, **options)

    assert cached.completions == plain.completions
    for i, prompt in enumerate(prompts):
        assert cached.completions[i] == decode(model, [prompt], [6], GreedySampler()).completions[0]
    assert with_cache.seen.keys() == without.seen.keys()
    for key, logits in without.seen.items():
        torch.testing.assert_close(with_cache.seen[key], logits, rtol=1e-5, atol=1e-5)

    total = sum(len(p) for p in prompts)
    assert plain_engine.prefix_cache is None and plain_engine.scheduler.prompt_tokens_computed == total
    assert cached_engine.prefix_cache.hit_tokens == (len(prompts) - 1) * 2 * BLOCK
    assert cached_engine.scheduler.prompt_tokens_computed == total - (len(prompts) - 1) * 2 * BLOCK
    assert cached_engine.prefix_cache.hit_rate == pytest.approx((len(prompts) - 1) * 2 * BLOCK / total)


def test_the_bench_workload_computes_the_instruction_once_or_nearly(llama):
    """bench/peer.py's prefix workload (64 prompts: a 400-token instruction, 8..64 tokens of
    their own), 8 rows in flight, chunks of 256: the first request computes the instruction
    (over two steps); the second takes its first 256 tokens from the cache at the second
    step, sits out the rest of that step (the first request computes the blocks it needs
    next) and takes them at the third; every later one takes all 25 blocks at once. The
    cache is the engine's own, a quarter of its KV budget."""
    prompts = shared_prefix_job(64, prefix_length=400, seed=1, own=(8, 64))
    limits = [4] * len(prompts)
    options = dict(max_rows=8, max_cache_tokens=8 * 1024)
    cached_engine, cached = run(llama, prompts, limits, **options)
    plain_engine, plain = run(llama, prompts, limits, prefix_cache=False, **options)

    assert cached.completions == plain.completions
    total = sum(len(p) for p in prompts)
    assert plain_engine.scheduler.prompt_tokens_computed == total
    assert cached_engine.prefix_cache.max_tokens == 2 * 1024
    assert cached_engine.prefix_cache.hit_tokens == 63 * 400
    assert cached_engine.scheduler.prompt_tokens_computed == total - 63 * 400  # about a tenth of them
    assert len(cached_engine.prefix_cache.blocks) <= cached_engine.prefix_cache.capacity


def test_prompts_that_fit_one_step_wait_a_step_for_the_blocks_the_first_one_computes(llama):
    """Every prompt fits the first step's 256 tokens: the first computes the shared blocks,
    the others sit that step out and take them at the next, instead of computing them too."""
    prompts = shared_prefix_job(6, prefix_length=40, seed=8)
    engine, cached = run(llama, prompts, [4] * 6)
    _, plain = run(llama, prompts, [4] * 6, prefix_cache=False)
    assert cached.completions == plain.completions
    assert engine.prefix_cache.hit_tokens == 5 * 2 * BLOCK
    assert engine.scheduler.prompt_tokens_computed == sum(len(p) for p in prompts) - 5 * 2 * BLOCK


@pytest.mark.parametrize("num_beams", [1, 3])
def test_beam_search_reuses_the_prefix_in_each_beam(model, num_beams):
    prompts = shared_prefix_job(6, prefix_length=36, seed=2)
    sampler = BeamSampler(num_beams=num_beams, return_all_beams=True)
    options = dict(max_rows=2, prefill_chunk=12)
    cached_engine, cached = run(model, prompts, [5] * len(prompts), sampler, **options)
    _, plain = run(model, prompts, [5] * len(prompts), sampler, prefix_cache=False, **options)
    assert (cached.completions, cached.finish_reasons) == (plain.completions, plain.finish_reasons)
    assert cached_engine.prefix_cache.hit_tokens >= (len(prompts) - 2) * 2 * BLOCK


def test_a_small_cache_evicts_the_least_recently_used_blocks_and_keeps_the_tokens(llama):
    """A cache of three blocks, two 40-token instructions taking turns, one request at a
    time (prompts 43..48 tokens long, so they run in this order): each request finds its
    instruction's first block (used by the request before last), while the second was
    evicted to make room for the other instruction's; tokens stay those without the cache."""
    first, second = shared_prefix_job(1, 40, seed=3)[0][:40], shared_prefix_job(1, 40, seed=4)[0][:40]
    prompts = [(first, second)[i % 2] + list(range(3 + i)) for i in range(6)]
    limits = [4] * len(prompts)
    prefix_cache = PrefixCache(3 * BLOCK)
    engine, cached = run(llama, prompts, limits, prefix_cache=prefix_cache, max_rows=1)
    _, plain = run(llama, prompts, limits, prefix_cache=False, max_rows=1)
    assert cached.completions == plain.completions
    assert len(prefix_cache.blocks) == prefix_cache.capacity == 3
    assert prefix_cache.hit_tokens == 4 * BLOCK
    # A prefix cache kept across engines: a later call finds what an earlier one computed
    # (the last request's 48 tokens: three blocks, two of them taken).
    again, rerun = run(llama, prompts[-1:], [4], prefix_cache=prefix_cache)
    assert rerun.completions == cached.completions[-1:]
    assert again.scheduler.prompt_tokens_computed == len(prompts[-1]) - 2 * BLOCK == BLOCK


def test_rows_of_different_adapters_share_no_blocks_and_keep_their_adapters_tokens(tmp_path):
    """Six prompts sharing a 40-token instruction, two each for the base and two adapters, all
    admitted at once: in each pair the second row takes the first's two blocks (a row of
    another adapter never does: its keys differ), and every row's tokens are those without
    the cache."""
    base = tmp_path / "base"
    LlamaCausalLM(random_weights(BACKBONES["llama"]())).save_to_preset(str(base))
    served = CausalLM.from_preset(str(base))
    for name in ("a", "b"):
        served.load_adapter(str(random_adapter(base, tmp_path / name, seed=len(name) + ord(name))), name=name)
    prompts = shared_prefix_job(6, 40, seed=5)
    names = [None, "a", "b"] * 2
    kept = PrefixCache(1024)
    options = dict(sampler="greedy", adapter=names)
    cached = adapter_completions(served, prompts, prefix_cache=kept, **options)
    assert cached == adapter_completions(served, prompts, prefix_cache=False, **options)
    assert len({tuple(row) for row in cached}) == len(prompts)  # the adapters (and the prompts) change the tokens
    assert kept.hit_tokens == 3 * 2 * BLOCK


def test_the_last_prompt_token_is_always_computed(llama):
    """A prompt that is all cached blocks still runs its last token (whose logits it samples
    from): it takes one block less from the cache."""
    prompt = shared_prefix_job(1, 2 * BLOCK, seed=6)[0][: 2 * BLOCK]
    engine, result = run(llama, [prompt, prompt], [4, 4], max_rows=1)
    assert result.completions[0] == result.completions[1]
    assert engine.prefix_cache.hit_tokens == BLOCK
    assert engine.scheduler.prompt_tokens_computed == 3 * BLOCK


def test_where_caching_does_not_apply_the_engine_runs_without_it(llama):
    """Contrastive search reads the prompts' hidden states, which cached blocks do not have;
    Bart's decoder keys depend on its encoder's input, and its model cannot continue a
    prompt: both run without a prefix cache, and with the same tokens."""
    prompts = shared_prefix_job(4, 40, seed=7)
    sampler = ContrastiveSampler(k=3)
    engine, result = run(llama, prompts, [4] * 4, sampler, max_rows=2)
    assert engine.prefix_cache is None
    assert engine.scheduler.prompt_tokens_computed == sum(len(p) for p in prompts)
    assert result.completions == run(llama, prompts, [4] * 4, sampler, prefix_cache=False)[1].completions

    bart = Seq2SeqLM.from_preset(str(FIXTURES / "bart"))
    decoder_prompts = [[2, 0] + list(range(3, 40))] * 2
    model = EncoderDecoderModel(bart.backbone, [[0, 17, 42, 2], [0, 5, 6, 2]], 1, GreedySampler())
    requests = [Request(i, p, 3) for i, p in enumerate(decoder_prompts)]
    engine = Engine.for_requests(model, GreedySampler(), requests)
    assert engine.prefix_cache is None
    with torch.inference_mode():
        engine.run(engine.submit(requests, GreedySampler()))
    assert engine.scheduler.prompt_tokens_computed == 2 * len(decoder_prompts[0])


def test_phi3_longrope_keys_of_the_short_factors_are_not_reused_once_a_batch_is_long():
    """Phi-3's longrope keys depend on whether the batch is past the pretraining length (40
    here). A prefix cache kept across two calls: the first, short, fills it; the second, long
    from the start, finds none of those blocks (a call of its own finds as many as it does)
    and gives the tokens it gives without a cache."""
    from lmq.plugins.phi3 import Phi3Backbone

    half_head = 4  # head_dim 8: one factor per rotary frequency
    phi3 = DecoderOnlyModel(random_weights(Phi3Backbone(
        vocabulary_size=ENGINE_VOCAB, num_layers=2, num_query_heads=4, hidden_dim=32, intermediate_dim=64,
        num_key_value_heads=2, max_sequence_length=128, pretraining_sequence_length=40, rope_scaling_type="su",
        rope_scaling_short_factor=[1.0 + 0.1 * i for i in range(half_head)],
        rope_scaling_long_factor=[1.0 + 2.0 * i for i in range(half_head)],
    )))
    short = shared_prefix_job(4, 32, seed=9, own=(2, 4))
    long = [prompt[:32] + list(range(10, 24 + i)) for i, prompt in enumerate(short)]
    kept = PrefixCache(1024)
    run(phi3, short, [2] * 4, prefix_cache=kept)
    assert kept.blocks and kept.variant is False
    engine, result = run(phi3, long, [4] * 4, prefix_cache=kept)
    fresh, _ = run(phi3, long, [4] * 4, prefix_cache=PrefixCache(1024))
    assert kept.variant is True
    assert engine.scheduler.prompt_tokens_computed == fresh.scheduler.prompt_tokens_computed
    assert result.completions == run(phi3, long, [4] * 4, prefix_cache=False)[1].completions


def test_a_prefix_cache_that_takes_the_whole_budget_is_refused(llama):
    with pytest.raises(ValueError, match="prefix cache of 64 positions leaves no room in max_cache_tokens=64"):
        run(llama, [[1, 2]], [3], prefix_cache=PrefixCache(64), max_cache_tokens=64)


@pytest.mark.parametrize("cache_kind", ["plain", "rolling"])
@pytest.mark.parametrize("storage_order", ["in order", "out of order"])
def test_blocks_go_out_of_one_slot_and_into_another_as_they_were(cache_kind, storage_order):
    """The pool's copies: blocks read from one slot land in another at the same positions,
    whether the pool stored them in order or not (after evictions); a rolling cache also
    records which position each slot now holds."""
    shape = (2, 3, 2, 40, 4)  # layers, slots, kv heads, positions, head dim
    if cache_kind == "rolling":
        cache = RollingKVCache(*shape, torch.float32, "cpu", window=8, prompt_width=40)
        cache.slot_positions[2] = -1
    else:
        cache = KVCache(*shape, torch.float32, "cpu")
    cache.keys.normal_()
    cache.values.normal_()
    pool = PrefixCache(4 * 8, block_size=8)
    if storage_order == "out of order":
        pool.free = [0, 3, 1, 2]  # the chain's blocks go to storage blocks 2, 1, 3
    digests = pool.digests(list(range(24)))
    pool.save(cache, 0, digests, 0, 3)
    assert len(pool.load(cache, 2, digests, 0, 2)) == 2
    torch.testing.assert_close(cache.keys[:, 2, :, :16], cache.keys[:, 0, :, :16], rtol=0, atol=0)
    torch.testing.assert_close(cache.values[:, 2, :, :16], cache.values[:, 0, :, :16], rtol=0, atol=0)
    assert not torch.equal(cache.keys[:, 2, :, 16:24], cache.keys[:, 0, :, 16:24])
    if cache_kind == "rolling":
        assert cache.slot_positions[2, :16].tolist() == list(range(16))
        assert cache.slot_positions[2, 16:].eq(-1).all()
    # The chain: a prompt that differs in its first block shares none of the blocks after it.
    assert pool.load(cache, 1, pool.digests([99] + list(range(1, 24))), 0, 3) == []


def test_a_move_from_a_start_position_leaves_the_target_s_positions_before_it():
    """A row whose leading positions are read from the pool moves without them: the target slot's
    positions before the row's start stay as they were (the manager gives them back)."""
    cache = KVCache(2, 3, 2, 12, 4, torch.float32, "cpu")
    cache.keys.normal_()
    cache.values.normal_()
    cache.extent = 10
    before = cache.keys[:, 2].clone()
    cache.move_rows(torch.tensor([0]), torch.tensor([2]), starts=[6])
    torch.testing.assert_close(cache.keys[:, 2, :, 6:10], cache.keys[:, 0, :, 6:10], rtol=0, atol=0)
    torch.testing.assert_close(cache.values[:, 2, :, 6:10], cache.values[:, 0, :, 6:10], rtol=0, atol=0)
    torch.testing.assert_close(cache.keys[:, 2, :, :6], before[:, :, :6], rtol=0, atol=0)
    torch.testing.assert_close(cache.keys[:, 2, :, 10:], before[:, :, 10:], rtol=0, atol=0)


def test_the_setting_is_on_by_default_and_a_bad_one_is_named():
    assert load_settings({}).prefix_cache is True
    assert load_settings({"LMQ_PREFIX_CACHE": "off"}).prefix_cache is False
    assert load_settings({"LMQ_PREFIX_CACHE": "ON"}).prefix_cache is True
    with pytest.raises(SettingsError, match="LMQ_PREFIX_CACHE must be on or off, got 'sometimes'"):
        load_settings({"LMQ_PREFIX_CACHE": "sometimes"})


def test_rows_sharing_a_long_prefix_read_its_keys_once_with_the_tokens_of_each_row_alone(llama, monkeypatch):
    """Decoding rows whose prompts begin with the same 80 tokens attend over one copy of those
    keys (``CachedAttention._attend_shared_prefix``): with the prefix cache, the copy in its pool
    (the rows that took those blocks from it); without, the first row's. Every row's greedy
    tokens are those it gets alone (where no other row shares its keys)."""
    from lmq.core.layers.attention import CachedAttention

    shared_reads = []
    attend_shared = CachedAttention._attend_shared_prefix

    def counting(self, queries, keys, values, part, pool=None):
        shared_reads.append((part.shared, "pool" if part.pooled is not None else "first row", len(queries)))
        return attend_shared(self, queries, keys, values, part, pool)

    monkeypatch.setattr(CachedAttention, "_attend_shared_prefix", counting)
    prompts = shared_prefix_job(12, 80, seed=5)
    limits = [8] * len(prompts)
    alone = [decode(llama, [p], [8], GreedySampler()).completions[0] for p in prompts]
    assert not shared_reads  # one row alone shares nothing
    for prefix_cache, source in ((True, "pool"), (False, "first row")):
        together = decode(llama, prompts, limits, GreedySampler(), prefix_cache=prefix_cache).completions
        assert shared_reads and {(shared, where) for shared, where, _ in shared_reads} == {(80, source)}
        assert max(rows for *_, rows in shared_reads) >= len(prompts) - 1  # all but the one that computed it
        assert_greedy_rows_equal(llama, prompts, together, alone)
        shared_reads.clear()


def test_attention_over_a_shared_prefix_equals_each_row_over_its_own_keys():
    from lmq.core.layers.attention import AttentionPart, CachedAttention

    torch.manual_seed(0)
    layer = CachedAttention(num_query_heads=4, num_key_value_heads=2, hidden_dim=32, cache_index=0)
    rows, positions, shared = 5, torch.tensor([30, 41, 29, 35, 38]), 24
    keys, values = torch.randn(2, 7, 2, 48, 8)  # [slots, kv heads, length, dim], rows 2..6 used
    keys[3:7, :, :shared], values[3:7, :, :shared] = keys[2, :, :shared], values[2, :, :shared]
    queries = torch.randn(rows, 4, 1, 8)
    mask = (torch.arange(42)[None] <= positions[:, None])[:, None, None]  # [rows, 1, 1, keys]
    part = AttentionPart(slice(0, rows), 2, rows, 42, mask, shared=shared)
    expected = torch.nn.functional.scaled_dot_product_attention(
        queries, keys[2:7, :, :42], values[2:7, :, :42], attn_mask=mask, enable_gqa=True
    )
    torch.testing.assert_close(layer._attend_shared_prefix(queries, keys, values, part), expected)


def test_a_job_s_own_pool_holds_the_blocks_its_prompts_share_and_one_prompt_s_more():
    """A one-shot decode's pool ends with it: sized for the blocks two or more prompts share
    (and one prompt's blocks besides), not for every prompt; none when nothing is shared."""
    prompts = shared_prefix_job(6, 2 * BLOCK + 5, seed=3, own=(20, 40))  # 2 full blocks shared
    longest_blocks = max(len(p) for p in prompts) // BLOCK
    requests = [Request(i, p, 4) for i, p in enumerate(prompts)]
    assert PrefixCache.for_requests(requests).capacity == 2 + longest_blocks
    other_adapter = [Request(0, prompts[0], 4, adapter="a"), Request(1, prompts[1], 4, adapter="b")]
    assert PrefixCache.for_requests(other_adapter).capacity == 0  # different adapters share no KV
    unshared = [Request(i, [i] * 40, 4) for i in range(5)]
    engine = Engine.for_requests(DecoderOnlyModel(random_weights(BACKBONES["llama"]())), GreedySampler(), unshared)
    assert engine.prefix_cache is None


def resident_pages(view):
    """How many memory pages under ``view`` (a contiguous CPU tensor view) are resident (mincore)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
    start = view.data_ptr() // mmap.PAGESIZE * mmap.PAGESIZE
    length = view.data_ptr() + view.numel() * view.element_size() - start
    pages = (ctypes.c_ubyte * -(-length // mmap.PAGESIZE))()
    assert libc.mincore(start, length, pages) == 0, ctypes.get_errno()
    return sum(page & 1 for page in pages)


def test_rows_that_took_a_long_prefix_read_it_from_the_pool_and_hold_no_copy_of_it():
    """Rows that took a long run of leading blocks from the pool decode reading them there: their
    slots hold none of those positions in memory (given back, skipped by moves, given back again
    after the cache grows), the pool keeps the blocks while such a row reads them and lets them
    go after, and every row's tokens are those of computing it without the cache."""
    from lmq.plugins.llama.llama_backbone import LlamaBackbone

    # heads of 64: a row's 80 prefix positions are 5 pages of each layer's keys and values
    llama = DecoderOnlyModel(random_weights(LlamaBackbone(
        vocabulary_size=ENGINE_VOCAB, num_layers=2, num_query_heads=2, hidden_dim=128, intermediate_dim=64,
        num_key_value_heads=1,
    )))
    prompts = sorted(shared_prefix_job(10, 5 * BLOCK, seed=9, own=(3, 60)), key=len)  # admitted shortest first
    limits = [2, 9, 4, 12, 3, 7, 10, 2, 6, 5]
    requests = [Request(i, prompt, limit) for i, (prompt, limit) in enumerate(zip(prompts, limits))]
    engine = Engine.for_requests(llama, GreedySampler(), requests, max_rows=4)
    group = engine.submit(requests, GreedySampler())
    pooled_rows, lengths = 0, set()
    with torch.inference_mode():
        while engine.busy:
            engine.step()
            group.deliver()
            manager = engine.cache_manager
            lengths.add(manager.length)
            in_flight = [manager.pooled[r] for r in [*manager.decoding_requests, *manager.prefilling] if r in manager.pooled]
            assert sum(engine.prefix_cache.pins.values()) == sum(len(p.blocks) for p in in_flight)
            for slot, request in enumerate(manager.decoding_requests):
                pooled = manager.pooled.get(request)
                if pooled is not None:
                    assert pooled.length == 5 * BLOCK
                    for tensor in (manager.cache.keys, manager.cache.values):
                        for layer in range(2):  # at most the pages it shares with its neighbours
                            assert resident_pages(tensor[layer, slot, 0, : pooled.length]) <= 2
                    pooled_rows += 1
    assert pooled_rows >= 20 and len(lengths) > 1  # rows read the pool over many steps, and the cache grew
    assert not engine.prefix_cache.pins
    _, computed = run(llama, prompts, limits, prefix_cache=False, max_rows=4)
    assert_greedy_rows_equal(llama, prompts, group.result().completions, computed.completions)
