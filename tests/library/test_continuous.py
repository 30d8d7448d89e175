"""Continuous batching in the decode engine: row slots, chunked prefill, a cache that grows.

Tiny random decoders (Llama, Mistral with a short sliding window, Falcon with ALiBi):
requests leave and join a running batch, long prompts are prefilled a chunk at a time
between the others' decode steps, and every request's tokens are those it gets alone.
"""

import os
import shutil
from types import SimpleNamespace

import pytest
import torch

from lmq.core.config import DEMO_PRESETS, SettingsError, load_settings
from lmq.core.models.task import resolve_device
from lmq.core.generation import DecoderOnlyModel, decode
from lmq.core.layers.cache import KVCache
from lmq.core.samplers import BeamSampler, ContrastiveSampler, GreedySampler, TopKSampler
from lmq.plugins.llama.llama_backbone import LlamaBackbone
from lmq.workers.batching import GPU_ROW_POSITIONS, MAX_GPU_ROWS, RowBudget, row_budget
from lmq.workers.pool import ModelPool
from model_support import ENGINE_VOCAB, engine_backbones, random_weights

VOCAB = ENGINE_VOCAB
SIZES = dict(
    vocabulary_size=VOCAB, num_layers=2, num_query_heads=4, hidden_dim=32, intermediate_dim=64, num_key_value_heads=2
)



BACKBONES = engine_backbones()


@pytest.fixture(scope="module", params=list(BACKBONES))
def model(request):
    return DecoderOnlyModel(random_weights(BACKBONES[request.param]()))


@pytest.fixture(scope="module")
def llama():
    return DecoderOnlyModel(random_weights(LlamaBackbone(**SIZES)))


def job(count, seed=0, longest=30):
    """Prompts of 1..longest tokens and per-row limits of 0..12."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, longest + 1, (count,), generator=generator).tolist()
    prompts = [torch.randint(0, VOCAB, (n,), generator=generator).tolist() for n in lengths]
    limits = torch.randint(0, 13, (count,), generator=generator).tolist()
    return prompts, limits


def stop_token(model, prompts):
    """A token greedy search emits in some rows but not all: rows stop on it at different points."""
    probe = decode(model, prompts[:6], [8] * len(prompts[:6]), GreedySampler())
    counts = torch.bincount(torch.tensor([t for row in probe.completions for t in row]), minlength=VOCAB)
    return int(counts.argmax())


def test_rows_leaving_and_joining_with_chunked_prefill_give_each_request_its_tokens_alone(model):
    """Three requests in flight, prompts prefilled five tokens per step: every request's
    greedy tokens and finish reason are those of that prompt decoded alone."""
    prompts, limits = job(14)
    stop = stop_token(model, prompts)
    joined = decode(model, prompts, limits, GreedySampler(), stop_token_ids=[stop], max_rows=3, prefill_chunk=5)
    for i, (prompt, limit) in enumerate(zip(prompts, limits)):
        alone = decode(model, [prompt], [limit], GreedySampler(), stop_token_ids=[stop])
        assert (joined.completions[i], joined.finish_reasons[i]) == (alone.completions[0], alone.finish_reasons[0])
    assert {"stop", "length"} <= set(joined.finish_reasons)


def counted_calls(monkeypatch, name):
    """Wraps lmq's kernel ``name`` (``lmq.core.kernels``) so that its calls are counted: returns
    the list that each call appends to."""
    from lmq.core import kernels

    kernel, calls = getattr(kernels, name)(), []
    monkeypatch.setattr(kernels, name, lambda: lambda *tensors: calls.append(1) or kernel(*tensors))
    return calls


def test_decoding_rows_over_a_plain_cache_attend_through_the_kernel_others_through_torch(model, monkeypatch):
    """lmq's decode attention kernel serves rows that see exactly their first slots (Llama);
    a sliding window (Mistral) or ALiBi (Falcon) goes through torch's ops. The tokens of both
    paths are checked against each row alone by the test above."""
    from lmq.core import kernels

    if kernels.decode_attention() is None:
        pytest.skip("no C++ compiler on this machine: lmq's kernels cannot be built, torch's ops serve")
    calls = counted_calls(monkeypatch, "decode_attention")
    prompts, limits = job(6)
    decode(model, prompts, limits, GreedySampler())
    plain = not model.backbone.sliding_window and not model.backbone.key_position_bias
    assert bool(calls) == plain


def test_the_kernel_takes_every_decoding_row_in_one_call_a_layer(llama, monkeypatch):
    """20 rows of unlike lengths, enough to cut into runs that each read to their longest row:
    lmq's kernel reads each row to its own length, so one call a layer and step takes them all."""
    from lmq.core import kernels

    if kernels.decode_attention() is None:
        pytest.skip("no C++ compiler on this machine: lmq's kernels cannot be built, torch's ops serve")
    rows_per_call, kernel = [], kernels.decode_attention()
    monkeypatch.setattr(kernels, "decode_attention", lambda: lambda q, *rest: rows_per_call.append(len(q)) or kernel(q, *rest))
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, VOCAB, (n,), generator=generator).tolist() for n in range(1, 41, 2)]  # one step's prefill
    decode(llama, prompts, [6] * len(prompts), GreedySampler())
    assert rows_per_call == [len(prompts)] * (5 * llama.backbone.num_layers)  # 5 decode steps after the prefill


def test_a_long_prompt_is_prefilled_between_the_decode_steps_of_the_others(llama):
    """A 40-token prompt joining with a 3-token one, 8 prompt tokens per step: the short
    request decodes while the long one is prefilled, and both get their tokens alone."""
    prompts, limits = [[5, 9, 2], list(range(1, 41))], [12, 4]
    events = []
    joined = decode(
        llama, prompts, limits, GreedySampler(), prefill_chunk=8, stream=lambda request, token: events.append(request)
    )
    assert events.index(1) >= 4  # the short row's tokens came while the long prompt went in
    for i, (prompt, limit) in enumerate(zip(prompts, limits)):
        assert joined.completions[i] == decode(llama, [prompt], [limit], GreedySampler()).completions[0]


def test_finished_rows_free_their_slots_and_nothing_copies_the_cache(llama, monkeypatch):
    """Twelve requests through three slots: one cache for the whole job, and rows move
    between slots only to fill the slot of a finished one (a row, not the cache)."""
    prompts, limits = job(12, seed=1, longest=6)
    limits = [12 - len(p) for p in prompts]  # every request needs 12 positions: no reason to grow
    caches, moved = [], []
    new_cache = llama.new_cache

    def spied_new_cache(rows, max_length, prompt_width):
        cache = new_cache(rows, max_length, prompt_width)
        move_rows = cache.move_rows
        cache.move_rows = lambda source, target, *bounds: (moved.append(len(source)), move_rows(source, target, *bounds))
        caches.append(rows)
        return cache

    monkeypatch.setattr(llama, "new_cache", spied_new_cache)
    joined = decode(llama, prompts, limits, GreedySampler(), max_rows=3)
    assert caches == [3]
    assert sum(moved) < len(prompts)  # at most one row moved per finished request
    for i, prompt in enumerate(prompts):
        assert joined.completions[i] == decode(llama, [prompt], [limits[i]], GreedySampler()).completions[0]


def _resident_mib():
    with open("/proc/self/status") as status:
        return int(next(line for line in status if line.startswith("VmRSS:")).split()[1]) / 1024


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads Linux's /proc for resident memory")
def test_a_cpu_cache_is_resident_only_where_rows_were_written_and_moves_copy_only_that():
    """A 256 MiB cache whose rows hold 4 positions of 1024 costs a few MiB; a moved row
    arrives whole (its written positions) and leaves the rest of its new slot untouched."""
    before = _resident_mib()
    cache = KVCache(8, 16, 4, 1024, 64, torch.float32, "cpu")  # 2 x 8 x 16 x 4 x 1024 x 64 floats: 256 MiB
    cache.place(torch.zeros(4, dtype=torch.long), torch.arange(4), end=4)
    written = torch.randn(8, 16, 4, 4, 64)
    cache.keys[:, :, :, :4] = written
    cache.move_rows(torch.tensor([3, 5]), torch.tensor([5, 3]))  # rows trading places
    cache.move_rows(torch.tensor([7, 8]), torch.tensor([9, 1]))  # rows into other slots
    assert _resident_mib() - before < 32
    assert torch.equal(cache.keys[:, 3, :, :4], written[:, 5]) and torch.equal(cache.keys[:, 5, :, :4], written[:, 3])
    assert torch.equal(cache.keys[:, 9, :, :4], written[:, 7]) and torch.equal(cache.keys[:, 1, :, :4], written[:, 8])
    assert not cache.keys[:, :, :, 4:].any()


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads Linux's /proc for resident memory")
def test_slots_given_back_read_as_zeros_and_cost_no_memory():
    """Half of a written 256 MiB cache given back: about 128 MiB less resident, those slots
    all zeros, the others as written."""
    cache = KVCache(8, 16, 4, 1024, 64, torch.float32, "cpu")
    cache.keys.normal_(), cache.values.normal_()
    kept = cache.keys[:, :8].clone()
    written = _resident_mib()
    cache.release_rows(8, 16)
    assert written - _resident_mib() > 120
    assert not cache.keys[:, 8:].any() and not cache.values[:, 8:].any()
    assert torch.equal(cache.keys[:, :8], kept)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads Linux's /proc for resident memory")
def test_a_row_moves_no_further_than_its_end_so_its_new_slots_pages_past_it_stay_unwritten():
    """A row of 4 positions moves into the slot of one that reached 1024, in a cache written to
    position 1024: it copies its 4 positions, not 1024 (16 MiB of pages faulted in)."""
    cache = KVCache(8, 16, 4, 1024, 64, torch.float32, "cpu")  # 256 MiB
    cache.place(torch.zeros(1, dtype=torch.long), torch.tensor([1023]), end=1024)  # slot 0 reached 1024
    written = torch.randn(8, 4, 4, 64)
    cache.keys[:, 5, :, :4] = written
    cache.values[:, 5, :, :4] = written
    before = _resident_mib()
    cache.move_rows(torch.tensor([5]), torch.tensor([9]), stops=[4])
    assert _resident_mib() - before < 4
    assert torch.equal(cache.keys[:, 9, :, :4], written) and torch.equal(cache.values[:, 9, :, :4], written)
    cache.move_rows(torch.tensor([5]), torch.tensor([10]))  # no stop: to the furthest position written
    assert _resident_mib() - before > 12


def test_requests_that_leave_move_no_further_than_their_own_keys(llama):
    """Of three decoding requests the first leaves: the last, whose keys end at position 5, moves
    into its slot copying 5 positions, and the old request's keys past them stay (never read)."""
    from lmq.core.generation.kv_cache_manager import KVCacheManager

    manager = KVCacheManager(llama, rows_per_request=1, max_length=32, prompt_width=8)
    manager.allocate(["a", "b", "c"], 32)
    manager.cache.place(torch.arange(3), torch.full((3,), 31), end=32)
    for slot in range(3):
        manager.cache.keys[:, slot] = slot + 1.0
    manager.start_decoding(["a", "b", "c"])
    assert manager.leave([0], ends=[32, 32, 5]) == [2, 1]
    keys = manager.cache.keys
    assert (keys[:, 0, :, :5] == 3).all() and (keys[:, 0, :, 5:] == 1).all()
    assert (keys[:, 1] == 2).all()


def test_requests_that_leave_give_their_slots_pages_back(llama):
    """Four decoding requests, two leave: the last one moves into a freed slot, and the slots
    past the two left in flight are given back (zeros) while the two keep their keys."""
    from lmq.core.generation.kv_cache_manager import KVCacheManager

    manager = KVCacheManager(llama, rows_per_request=1, max_length=32, prompt_width=8)
    manager.allocate(["a", "b", "c", "d"], 32)
    manager.cache.place(torch.arange(4), torch.full((4,), 31), end=32)  # every slot written to its end
    for slot in range(4):
        manager.cache.keys[:, slot] = slot + 1.0
    manager.start_decoding(["a", "b", "c", "d"])
    assert manager.leave([1, 2]) == [0, 3]  # d moves into b's slot
    keys = manager.cache.keys
    assert (keys[:, 0] == 1).all() and (keys[:, 1] == 4).all()
    assert not keys[:, 2:4].any()


def test_slots_left_give_their_pages_back_together_an_eighth_of_the_cache_at_a_time(llama):
    """Of 16 decoding requests one leaves: its slot keeps its pages (a release costs a layer's
    pages off every core); when a second leaves, the two slots past those in flight are given
    back at once, and the 14 kept hold their keys."""
    from lmq.core.generation.kv_cache_manager import KVCacheManager

    requests = [f"r{i}" for i in range(16)]
    manager = KVCacheManager(llama, rows_per_request=1, max_length=32, prompt_width=8)
    manager.allocate(requests, 32)
    manager.cache.place(torch.arange(16), torch.full((16,), 31), end=32)
    for slot in range(16):
        manager.cache.keys[:, slot] = slot + 1.0
    manager.start_decoding(requests)
    assert manager.groups == 16
    manager.leave([3], ends=[32] * 16)  # the last request moves into slot 3
    keys = manager.cache.keys
    assert (keys[:, 3] == 16).all() and (keys[:, 15] == 16).all()  # slot 15 not given back yet
    manager.leave([0], ends=[32] * 15)  # slot 14's request moves into slot 0
    assert not keys[:, 14:].any()
    assert [int(keys[0, slot, 0, 0, 0]) for slot in range(14)] == [15, 2, 3, 16, *range(5, 15)]


def test_generating_processes_give_onednn_a_small_primitive_cache_unless_told_otherwise(monkeypatch):
    from lmq.workers.runner import pool_from_settings

    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    pool_from_settings(load_settings({}))
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "16"
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "256")
    pool_from_settings(load_settings({}))
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "256"


def test_the_lmq_command_starts_again_with_tcmalloc_where_the_machine_has_it(monkeypatch):
    """Where tcmalloc is found and nothing is preloaded, ``lmq`` starts again as ``python -m
    lmq.api.cli`` with tcmalloc preloaded; an LD_PRELOAD of the user's, even empty, stands, and a
    machine without tcmalloc runs the command as it is."""
    import ctypes.util
    import sys

    from lmq.api import launch
    from lmq.core.config import allocator_environment

    monkeypatch.setattr(ctypes.util, "find_library", lambda name: f"lib{name}.so.4")
    assert allocator_environment({}) == {"LD_PRELOAD": "libtcmalloc_minimal.so.4"}
    assert allocator_environment({"LD_PRELOAD": ""}) == {}
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.setattr(sys, "argv", ["lmq", "jobs", "list"])
    started = []

    def execve(path, args, env):
        started.append((path, args, env["LD_PRELOAD"]))
        raise SystemExit(0)  # the process is replaced: nothing after the call runs

    monkeypatch.setattr(os, "execve", execve)
    with pytest.raises(SystemExit):
        launch.run()
    assert started == [(sys.executable, [sys.executable, "-m", "lmq.api.cli", "jobs", "list"], "libtcmalloc_minimal.so.4")]
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
    assert allocator_environment({}) == {}
    monkeypatch.setattr("lmq.api.cli.main", lambda: 7)
    assert launch.run() == 7 and len(started) == 1


def test_the_cache_grows_for_a_long_tail_within_the_token_budget(model, monkeypatch):
    """Short requests first, then longer ones: the cache starts as long as the first
    requests need and grows when a longer one joins; slots x positions stay within the
    budget, and every request gets its tokens alone."""
    short, _ = job(8, seed=2, longest=4)
    prompts = short + [list(range(1, 25)), list(range(3, 40))]
    limits = [6] * len(short) + [10, 12]
    sizes = []
    new_cache = model.new_cache

    def spied_new_cache(rows, max_length, prompt_width):
        sizes.append((rows, max_length))
        return new_cache(rows, max_length, prompt_width)

    monkeypatch.setattr(model, "new_cache", spied_new_cache)
    budget = 64
    joined = decode(model, prompts, limits, GreedySampler(), max_rows=4, max_cache_tokens=budget, prefill_chunk=7)
    room = max(len(p) + n for p, n in zip(prompts, limits))
    assert sizes[0][1] < room and sizes[-1][1] == room and len(sizes) >= 2
    assert all(rows * length <= budget or rows == 1 for rows, length in sizes)
    for i, (prompt, limit) in enumerate(zip(prompts, limits)):
        assert joined.completions[i] == decode(model, [prompt], [limit], GreedySampler()).completions[0]


def test_a_seeded_request_samples_the_same_whatever_its_neighbours_and_chunks(llama):
    prompts, _ = job(8, seed=3)
    limits = [8] * len(prompts)
    sampler = TopKSampler(k=8)
    seeds = [40 + i for i in range(len(prompts))]
    alone = [decode(llama, [p], [8], sampler, seeds=[s]).completions[0] for p, s in zip(prompts, seeds)]
    joined = decode(llama, prompts, limits, sampler, seeds=seeds, max_rows=3, prefill_chunk=4)
    assert joined.completions == alone
    assert decode(llama, prompts, limits, sampler, seeds=[s + 1 for s in seeds]).completions != alone


@pytest.mark.parametrize(
    "sampler", [BeamSampler(num_beams=3, return_all_beams=True), ContrastiveSampler(k=3)], ids=["beam", "contrastive"]
)
def test_searches_with_chunked_prefill_in_a_running_batch_equal_one_batch(llama, sampler):
    """Beam and contrastive requests take a slot group each: their rows move together."""
    prompts, limits = job(7, seed=4)
    together = decode(llama, prompts, limits, sampler)
    joined = decode(llama, prompts, limits, sampler, max_rows=2, prefill_chunk=6)
    assert (joined.completions, joined.finish_reasons) == (together.completions, together.finish_reasons)


def test_a_budget_that_is_not_positive_is_refused(llama):
    with pytest.raises(ValueError, match="max_rows=0"):
        decode(llama, [[1, 2]], [3], GreedySampler(), max_rows=0)
    with pytest.raises(ValueError, match="max_cache_tokens=0"):
        decode(llama, [[1, 2]], [3], GreedySampler(), max_cache_tokens=0)


# -- the device a job runs on ---------------------------------------------------------


def test_the_device_setting_is_auto_by_default_and_a_bad_one_is_named():
    assert load_settings({}).device == "auto"
    assert load_settings({"LMQ_DEVICE": "cuda:1"}).device == "cuda:1"
    with pytest.raises(SettingsError, match="LMQ_DEVICE must be auto, cpu, cuda or cuda:N, got 'gpu'"):
        load_settings({"LMQ_DEVICE": "gpu"})


def test_the_compile_setting_is_on_by_default_and_off_turns_the_kernels_off():
    from lmq.core import kernels
    from lmq.workers.runner import pool_from_settings

    assert load_settings({}).compile
    with pytest.raises(SettingsError, match="LMQ_COMPILE must be on or off, got 'fast'"):
        load_settings({"LMQ_COMPILE": "fast"})
    try:
        pool_from_settings(load_settings({"LMQ_COMPILE": "off"}))
        assert kernels.decode_attention() is None
    finally:
        kernels.configure(enabled=True)


def test_auto_is_the_gpu_when_torch_sees_one_and_a_missing_gpu_is_named():
    gpu = torch.cuda.is_available()
    assert resolve_device("auto") == ("cuda" if gpu else "cpu")
    assert resolve_device("cpu") == "cpu"
    if gpu:
        assert resolve_device("cuda:0") == "cuda:0"
    else:
        with pytest.raises(ValueError, match="device='cuda:0', but torch sees no GPU"):
            resolve_device("cuda:0")


def test_the_pool_loads_the_demo_preset_on_the_device_it_is_given():
    """On the CPU the preset keeps its dtype; the worker's pool passes LMQ_DEVICE on."""
    pool = ModelPool(2**30, device="cpu")
    lm = pool.get(str(DEMO_PRESETS / "stdlib-tiny-llama")).model
    assert lm.backbone.device.type == "cpu"
    assert lm.backbone.token_embedding.embeddings.value.dtype == torch.float32
    assert isinstance(lm.generate("def", max_new_tokens=3), str)


def test_a_gpu_job_without_a_row_count_gets_the_rows_its_free_memory_holds(monkeypatch):
    """The token budget follows free GPU memory (80%), the rows follow the tokens; on a
    CPU, and for a job that names its micro_batch_size, the configured figures stand."""
    layers, heads, head_dim = 2, 2, 4  # a position: keys and values of 2 x 2 x 4 float32s = 128 bytes

    def backbone(device):
        embeddings = SimpleNamespace(value=torch.zeros(1))
        return SimpleNamespace(
            device=torch.device(device), token_embedding=SimpleNamespace(embeddings=embeddings),
            transformer_layers=[None] * layers, num_key_value_heads=heads, head_dim=head_dim,
        )

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (100 * 2**20, 200 * 2**20))
    gpu = row_budget(backbone("cuda"), None, 16, 16384)
    assert gpu.cache_tokens == int(100 * 2**20 * 0.8) // 128
    assert gpu.rows == min(MAX_GPU_ROWS, gpu.cache_tokens // GPU_ROW_POSITIONS) > 16
    assert row_budget(backbone("cuda"), 4, 16, 16384).rows == 4
    assert row_budget(backbone("cpu"), None, 16, 16384) == RowBudget(16, 16384)


def test_generation_follows_weights_changed_after_it_packed_them():
    """On a CPU, generation projects through kernels packed for oneDNN, kept beside the
    variables: weights assigned (as training or loading does) are packed again before the next
    generation uses them, so it gives what a model built with those weights gives."""
    prompts, limits = [[5, 9, 2, 33], [7, 1]], [6, 6]
    model = DecoderOnlyModel(random_weights(LlamaBackbone(**SIZES), seed=1))
    first = decode(model, prompts, limits, GreedySampler()).completions
    packed = model.backbone.token_embedding.packed
    assert ("embeddings",) in packed or ("reverse_embeddings",) in packed  # the head went through oneDNN
    random_weights(model.backbone, seed=2)  # in place: the same variables, new values
    again = decode(model, prompts, limits, GreedySampler()).completions
    fresh = DecoderOnlyModel(random_weights(LlamaBackbone(**SIZES), seed=2))
    assert again == decode(fresh, prompts, limits, GreedySampler()).completions
    assert again != first


@pytest.mark.parametrize("lora", [False, True])
def test_projections_that_read_one_input_run_as_one_packed_gemm_and_give_each_its_own_output(lora):
    """Generating on a CPU, a layer's query, key and value projections go through one oneDNN
    GEMM over the three kernels side by side (and a feed-forward's gate and up ones): each
    output, its bias and LoRA update included, equals its own projection's with autograd on
    (torch's matmul), within float rounding."""
    from lmq.core.layers import CachedAttention, GatedFeedForward

    torch.manual_seed(0)
    attention = CachedAttention(hidden_dim=32, num_query_heads=4, num_key_value_heads=2, use_bias=True)
    feedforward = GatedFeedForward(hidden_dim=32, intermediate_dim=48)
    for layer in (attention, feedforward):
        for weight in layer.weights:
            weight.assign(torch.randn(weight.shape))
    if lora:
        attention.enable_lora(rank=2)
        for weight in attention.weights:
            if "lora" in weight.name:
                weight.assign(torch.randn(weight.shape))
    x = torch.randn(1, 5, 32)
    qkv = ("query_kernel", "key_kernel", "value_kernel")
    biases = [attention._bias(name) for name in ("query", "key", "value")]
    expected = [attention.projected(x, name, bias) for name, bias in zip(qkv, biases)]
    gated = ("gate_kernel", "intermediate_kernel")
    expected_gated = [feedforward.projected(x, name) for name in gated]
    with torch.no_grad():
        together = attention.projected_together(x, qkv, biases)
        together_gated = feedforward.projected_together(x, gated, (None, None))
    assert list(attention.packed) == [qkv] and list(feedforward.packed) == [gated]  # one packed kernel each
    for got, want in zip(together + together_gated, expected + expected_gated):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-4)


def test_decode_rows_attend_in_runs_each_reading_to_its_own_longest_row():
    from lmq.core.models.backbone import decode_runs

    positions = torch.tensor([3, 5, 4, 2, 9, 8, 7, 9, 40, 41, 39, 60, 12, 11, 10, 13, 1, 2, 3, 4, 5, 6, 7, 8, 99, 0, 0, 0])
    # 28 rows: three runs of at least 8 neighbouring rows, each to one past its furthest position
    assert decode_runs(positions, most_width=128) == [(0, 10, 42), (10, 20, 61), (20, 28, 100)]
    assert decode_runs(positions.repeat(2), most_width=128) == [(0, 14, 61), (14, 28, 100), (28, 42, 61), (42, 56, 100)]
    assert decode_runs(positions, most_width=50)[-1] == (20, 28, 50)  # never past what a rolling cache holds
    assert decode_runs(positions[:15], most_width=128) == [(0, 15, 61)]  # too few rows to cut
    assert decode_runs(positions[:0], most_width=128) == []


@pytest.mark.parametrize("bias_by_head", [False, True])
def test_decoding_rows_attend_as_scaled_dot_product_attention_does(bias_by_head):
    """The decode path of attention (one query a row, two batched products per KV head) equals
    SDPA over the same keys: with a boolean mask, and with an additive one per head (ALiBi)."""
    from lmq.core.layers.attention import AttentionPart, CachedAttention

    torch.manual_seed(0)
    layer = CachedAttention(num_query_heads=8, num_key_value_heads=2, hidden_dim=64, cache_index=0)
    rows, positions = 5, torch.tensor([30, 41, 3, 35, 0])
    keys, values = torch.randn(2, rows, 2, 42, 8)  # [rows, kv heads, keys, dim]
    queries = torch.randn(rows, 8, 1, 8)
    mask = (torch.arange(42)[None] <= positions[:, None])[:, None, None]  # [rows, 1, 1, keys]
    if bias_by_head:
        slopes = torch.linspace(-1, -0.1, 8)[None, :, None, None]
        mask = torch.where(mask, slopes * torch.arange(42.0), float("-inf"))  # [rows, heads, 1, keys]
    expected = torch.nn.functional.scaled_dot_product_attention(
        queries, keys, values, attn_mask=mask, enable_gqa=True
    )
    part = AttentionPart(slice(0, rows), 0, rows, 42, mask)  # no lengths: torch's ops
    torch.testing.assert_close(layer._attend_decoding(queries, keys, values, part), expected)


def test_the_rms_norm_kernel_norms_as_torchs_ops_do_within_rounding():
    """lmq's C++ RMS norm (generation on a CPU) gives the eager form's result within float
    rounding (its sum of squares is added in another order), for a step's tokens of any count;
    a scale of another size is refused."""
    from lmq.core import kernels
    from lmq.core.layers.norms import RMSNorm

    if kernels.rms_norm() is None:
        pytest.skip("no C++ compiler on this machine: lmq's kernels cannot be built, torch's ops serve")
    torch.manual_seed(0)
    norm = RMSNorm(512, epsilon=1e-5)
    norm.scale.assign(torch.rand(512) + 0.5)
    for tokens in (1, 37, 300):
        x = torch.randn(1, tokens, 512) * 3
        expected = norm.scale.value * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))
        with torch.no_grad():
            torch.testing.assert_close(norm.call(x), expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(RuntimeError, match="scale must be a contiguous float32"):
        kernels.rms_norm()(torch.randn(3, 8), torch.ones(7), 1e-5)


def test_greedy_picks_through_the_argmax_kernel_the_index_torch_picks():
    """lmq's C++ argmax (greedy decoding on a CPU) gives torch.argmax's index on every row: the
    first of tied maxima, the first NaN (torch takes NaN for the largest), an infinity, +0 and -0."""
    from lmq.core import kernels

    if kernels.argmax() is None:
        pytest.skip("no C++ compiler on this machine: lmq's kernels cannot be built, torch's ops serve")
    torch.manual_seed(0)
    logits = torch.randn(9, 32000)
    logits[1, [700, 90]] = float("nan")
    logits[2] = 1.0  # every value tied
    logits[3, 31999] = float("inf")
    logits[4] = -logits[4].abs()
    logits[4, [30, 12]] = torch.tensor([0.0, -0.0])  # equal maxima: the first
    logits[5, [5, 31000]] = logits[5].max() + 1
    kernel = kernels.argmax()
    with torch.no_grad():
        assert torch.equal(kernel(logits), logits.argmax(dim=-1))
        assert kernel(logits).tolist()[1:6] == [90, 0, 31999, 12, 5]
        assert torch.equal(GreedySampler().next_token(logits[:1]), torch.tensor([logits[0].argmax()]))


@pytest.mark.parametrize("tokens, heads, dim", [(5, 8, 64), (300, 2, 128), (1, 4, 96), (7, 3, 8)])
def test_the_rotary_kernel_rotates_a_steps_queries_and_keys_exactly_as_torchs_ops_do(tokens, heads, dim, monkeypatch):
    """lmq's C++ rotary embedding (a flattened step on a CPU) gives torch's eager result bit for
    bit, for queries and keys of unlike head counts from one projection's strided output, in
    one call; an odd head size is refused."""
    from lmq.core import kernels
    from lmq.core.layers.rotary import apply_rotary

    if kernels.rotary() is None:
        pytest.skip("no C++ compiler on this machine: lmq's kernels cannot be built, torch's ops serve")
    torch.manual_seed(0)
    key_heads = max(heads // 4, 1)
    projected = torch.randn(1, tokens, (heads + key_heads) * dim + 5)  # [1, tokens, queries and keys side by side]
    query = projected[..., : heads * dim].unflatten(-1, (heads, dim)).transpose(1, 2)  # [1, heads, tokens, dim]
    key = projected[..., heads * dim : (heads + key_heads) * dim].unflatten(-1, (key_heads, dim)).transpose(1, 2)
    angles = torch.randint(0, 4000, (1, tokens, 1)).float() * torch.rand(dim // 2)
    angles = torch.cat((angles, angles), dim=-1)
    cos, sin = angles.cos()[:, None], angles.sin()[:, None]  # [1, 1, tokens, dim]
    half = dim // 2

    def expected(x):
        return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin

    kernel, calls = kernels.rotary(), counted_calls(monkeypatch, "rotary")
    with torch.no_grad():
        rotated_query, rotated_key = apply_rotary(query, key, cos, sin)
    assert len(calls) == 1
    assert torch.equal(rotated_query, expected(query)) and torch.equal(rotated_key, expected(key))
    with pytest.raises(RuntimeError, match="dim must be even, got 7"):
        kernel(torch.randn(2, 3, 7), torch.randn(1, 3, 7), torch.randn(3, 7), torch.randn(3, 7))


@pytest.mark.parametrize("tokens, width", [(1, 1376), (300, 40), (7, 13)])
def test_the_gated_feed_forward_activates_through_the_silu_kernel_exactly_as_torchs_ops_do(tokens, width, monkeypatch):
    """A gated feed-forward's ``silu(gate) * up`` in generation on a CPU goes through lmq's C++
    ``silu_mul`` and gives torch's eager result bit for bit, from one GEMM's two halves, with
    widths that leave values past the last pair of vectors; gate and up of unlike shapes are refused."""
    from lmq.core import kernels
    from lmq.core.layers.feedforward import GatedFeedForward

    if kernels.silu_mul() is None:
        pytest.skip("no C++ compiler on this machine: lmq's kernels cannot be built, torch's ops serve")
    torch.manual_seed(0)
    both = torch.randn(1, tokens, 2 * width) * 6  # [1, tokens, gate and up side by side]
    both[0, 0, :4] = torch.tensor([0.0, -0.0, 100.0, -100.0])
    gate, up = both[..., :width], both[..., width:]
    kernel, calls = kernels.silu_mul(), counted_calls(monkeypatch, "silu_mul")
    with torch.no_grad():
        gated = GatedFeedForward(16, width)._gated(gate, up)
    assert calls and gated.shape == gate.shape
    assert torch.equal(gated, torch.nn.functional.silu(gate) * up)
    with pytest.raises(RuntimeError, match="gate and up must be float32"):
        kernel(torch.randn(3, 8), torch.randn(3, 9))


@pytest.mark.parametrize(
    "rows, inputs, outputs, bias", [(1, 512, 768, False), (7, 40, 37, True), (200, 1376, 100, True)]
)
def test_packed_projections_go_through_the_linear_kernel_within_rounding_of_a_float64_product(
    rows, inputs, outputs, bias, monkeypatch
):
    """A packed projection in generation on a CPU (``PackedKernel``) goes through lmq's C++ GEMM
    where it serves (``OWN_GEMM``: an AVX2 CPU, set here to test it on any), and gives
    x @ kernel + bias within float32 rounding: a step's rows as a strided view, row
    counts that leave a short tile and span several blocks of rows, output widths that end
    inside a panel, with and without a bias."""
    from lmq.core import kernels
    from lmq.core.layers import projection

    if kernels.linear() is None:
        pytest.skip("no C++ compiler on this machine: lmq's kernels cannot be built, oneDNN's GEMM serves")
    torch.manual_seed(0)
    kernel = torch.randn(inputs, outputs) * inputs**-0.5
    offsets = torch.randn(outputs) if bias else None
    x = torch.randn(1, rows, inputs + 9)[..., 5 : 5 + inputs]  # [1, rows, in] with a row stride of in + 9
    calls = counted_calls(monkeypatch, "linear")
    monkeypatch.setattr(projection, "OWN_GEMM", True)
    with torch.no_grad():
        out = projection.PackedKernel(kernel).project(x, offsets)
    expected = x.double() @ kernel.double() + (0 if offsets is None else offsets.double())
    assert calls and out.shape == (1, rows, outputs)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_a_row_through_the_linear_kernel_gives_the_same_bits_alone_as_among_other_rows():
    """Each output of lmq's C++ GEMM is its row's products summed in one order, whatever rows
    share the call, so a request's projections (and so its tokens) do not depend on what else
    the step holds; wrong panels and a strided last axis are refused by name."""
    from lmq.core import kernels

    if kernels.linear() is None:
        pytest.skip("no C++ compiler on this machine: lmq's kernels cannot be built, oneDNN's GEMM serves")
    torch.manual_seed(0)
    kernel, bias = torch.randn(512, 300), torch.randn(300)
    packed = kernels.pack_linear()(kernel)
    step = torch.randn(131, 512)
    together = kernels.linear()(step, packed, 300, bias)
    for row in (0, 5, 6, 97, 130):
        assert torch.equal(kernels.linear()(step[row : row + 1], packed, 300, bias)[0], together[row])
    with pytest.raises(RuntimeError, match=r"packed must be pack_linear's panels of a kernel \[512, 400\]"):
        kernels.linear()(step, packed, 400, None)
    with pytest.raises(RuntimeError, match="x must be float32 \\[rows, in\\] with unit stride in in"):
        kernels.linear()(step.t(), packed, 300, None)


def test_the_kv_write_kernel_puts_each_token_in_its_row_and_position():
    """lmq's C++ KV write (a flattened step on a CPU) puts each token's keys and values, from a
    projection's strided output, where torch's indexed assignment puts them, and nothing else;
    a position past the cache is refused by name."""
    from lmq.core import kernels

    if kernels.write_kv() is None:
        pytest.skip("no C++ compiler on this machine: lmq's kernels cannot be built, torch's ops serve")
    torch.manual_seed(0)
    layers, slots, heads, length, dim, tokens = 2, 5, 2, 12, 8, 7
    cache = KVCache(layers, slots, heads, length, dim, torch.float32, "cpu")
    cache.keys.normal_(), cache.values.normal_()  # what earlier steps wrote
    projected = torch.randn(2, tokens, heads * dim + 3)[..., : heads * dim]  # keys and values, strided
    keys, values = (p.unflatten(-1, (heads, dim)).transpose(0, 1) for p in projected)  # [heads, tokens, dim]
    rows = torch.tensor([0, 0, 0, 3, 1, 4, 2])  # a chunk of three, then decoding rows
    positions = torch.tensor([4, 5, 6, 0, 11, 7, 2])
    expected_keys, expected_values = cache.keys[1].clone(), cache.values[1].clone()
    expected_keys[rows, :, positions] = keys.transpose(0, 1)
    expected_values[rows, :, positions] = values.transpose(0, 1)
    context = SimpleNamespace(token_rows=rows, write_positions=positions)
    with torch.no_grad():
        written_keys, written_values = cache.write(1, keys, values, context)
    assert torch.equal(written_keys, expected_keys) and torch.equal(written_values, expected_values)
    with pytest.raises(RuntimeError, match="position 12 is outside the cache's 12 positions"):
        kernels.write_kv()(cache.keys[0], cache.values[0], keys, values, rows, positions + 6)


@pytest.mark.parametrize("path", ["kernels", "torch's ops", "with autograd"])
def test_rows_that_share_a_prefix_read_it_once_and_attend_as_sdpa_does(path):
    """Rows whose first 70 slots hold the same keys (a shared prompt): every row's queries over
    the first row's copy (torch's flash attention, or two products with autograd on), each row's
    own keys after it (through the C++ kernel where it serves, or torch's ops), the two softmaxes
    merged: SDPA over each row's whole keys gives the same."""
    from lmq.core import kernels
    from lmq.core.layers.attention import AttentionPart, CachedAttention

    if path == "kernels" and kernels.decode_attention() is None:
        pytest.skip("no C++ compiler on this machine: lmq's kernels cannot be built, torch's ops serve")
    torch.manual_seed(0)
    layer = CachedAttention(num_query_heads=8, num_key_value_heads=2, hidden_dim=512, cache_index=0)
    rows, shared, positions = 5, 70, torch.tensor([90, 71, 70, 99, 80])
    cache = torch.randn(2, 7, 2, 100, 64)  # [keys or values, slots, kv heads, positions, dim]
    cache[:, 2:7, :, :shared] = cache[:, 2:3, :, :shared]  # rows 2..6 share their first 70 positions
    keys, values = cache[0], cache[1]
    queries = torch.randn(rows, 8, 1, 64)
    mask = (torch.arange(100)[None] <= positions[:, None])[:, None, None]  # [rows, 1, 1, keys]
    expected = torch.nn.functional.scaled_dot_product_attention(
        queries, keys[2:7], values[2:7], attn_mask=mask, enable_gqa=True
    )
    part = AttentionPart(slice(0, rows), 2, rows, 100, mask, shared, positions + 1 if path == "kernels" else None)
    with torch.set_grad_enabled(path == "with autograd"):
        torch.testing.assert_close(layer._attend_shared_prefix(queries, keys, values, part), expected)


@pytest.mark.parametrize("dim, query_heads", [(64, 8), (128, 2), (96, 4), (64, 16), (64, 6), (24, 6)])
def test_the_decode_attention_kernel_reads_each_row_to_its_own_length(dim, query_heads):
    """lmq's C++ decode attention (built on first use) equals SDPA over each row's first
    ``length`` slots, reading the cache through its strides, in the CPU's vectors (head sizes 64,
    96 and 128, any number of query heads per KV head) or not (24); a length outside the slots
    is refused."""
    if shutil.which("c++") is None:
        pytest.skip("no C++ compiler on this machine: lmq's kernels cannot be built, torch's ops serve")
    from lmq.core import kernels
    from lmq.core.layers.attention import AttentionPart, CachedAttention

    assert kernels.decode_attention() is not None
    torch.manual_seed(0)
    layer = CachedAttention(num_query_heads=query_heads, num_key_value_heads=2, hidden_dim=64, head_dim=dim, cache_index=0)
    rows, positions = 4, torch.tensor([30, 41, 0, 12])
    cache = torch.randn(2, 9, 2, 50, dim)  # [keys or values, slots, kv heads, slots per row, dim]
    keys, values = cache[0, 3:7, :, :42], cache[1, 3:7, :, :42]  # rows 3..6, as a decode run reads them
    queries = torch.randn(rows, query_heads, 1, dim)
    mask = (torch.arange(42)[None] <= positions[:, None])[:, None, None]
    expected = torch.nn.functional.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, enable_gqa=True)
    part = AttentionPart(slice(0, rows), 3, rows, 42, mask, lengths=positions + 1)
    with torch.no_grad():
        torch.testing.assert_close(layer._attend_decoding(queries, keys, values, part), expected)
        grouped = queries.reshape(rows, 2, query_heads // 2, dim).contiguous()
        with pytest.raises(RuntimeError, match="length 43 is not within 1..42"):
            kernels.decode_attention()(grouped, keys, values, torch.tensor([1, 43, 1, 1]))
