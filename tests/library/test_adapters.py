"""Adapter presets served over one base (``lmq.core.adapters``): rows of different adapters decode in
one batch, each with its own low-rank updates, and give the tokens each adapter gives served alone;
the base's weights are held once, and the adapters cost their own size."""

import json

import keras
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from lmq.core.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, save_adapter_preset
from lmq.core.models import CausalLM
from lmq.workers.pool import weight_bytes
from model_support import ENGINE_VOCAB, engine_backbones, padded_for_generation, random_adapter, random_weights

ADAPTERS = 4
NEW_TOKENS = 10


@pytest.fixture(scope="module", params=list(engine_backbones()))
def presets(request, tmp_path_factory):
    """(base preset, four adapter presets of it) for Llama, Mistral (window 4) and Falcon (fused query_key_value)."""
    from lmq.core.plugins import get_registry

    root = tmp_path_factory.mktemp(request.param)
    backbone = random_weights(engine_backbones()[request.param]())
    task = get_registry().architecture_of_class(type(backbone).__name__).load("task")(backbone)
    task.save_to_preset(str(root / "base"))
    return root / "base", [random_adapter(root / "base", root / f"adapter-{i}", seed=i) for i in range(ADAPTERS)]


def job(count=13, seed=0):
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 20, (count,), generator=generator).tolist()
    return [torch.randint(0, ENGINE_VOCAB, (n,), generator=generator).tolist() for n in lengths]


def completions(lm, prompts, **options):
    """Each prompt's new tokens, generated from token ids (no end token)."""
    ids, mask = padded_for_generation(prompts, NEW_TOKENS)
    out = lm.generate({"token_ids": ids, "padding_mask": mask}, stop_token_ids=None, max_new_tokens=NEW_TOKENS, **options)
    return [row[len(p) : len(p) + NEW_TOKENS].tolist() for row, p in zip(out["token_ids"], prompts)]


@pytest.mark.parametrize("sampler", ["greedy", "top_k"])
def test_four_adapters_in_one_batch_give_each_row_its_tokens_alone(presets, sampler):
    """Thirteen prompts naming four adapters and the base, three rows in flight with chunked prefill
    (rows of different adapters decode, join and leave together): each row's tokens are those its
    adapter preset gives that prompt loaded as its own model (``from_preset``), with the row's seed."""
    base_dir, adapter_dirs = presets
    served = CausalLM.from_preset(str(base_dir))
    for i, directory in enumerate(adapter_dirs):
        served.load_adapter(str(directory), name=f"ft-{i}")
    prompts = job()
    names = [None if i % 5 == 4 else f"ft-{i % 5}" for i in range(len(prompts))]
    seeds = list(range(100, 100 + len(prompts)))
    together = completions(served, prompts, sampler=sampler, adapter=names, seed=seeds, max_rows=3)

    alone_models = {None: CausalLM.from_preset(str(base_dir))}
    alone_models.update({f"ft-{i}": CausalLM.from_preset(str(d)) for i, d in enumerate(adapter_dirs)})
    alone = [completions(alone_models[n], [p], sampler=sampler, seed=[s])[0] for p, n, s in zip(prompts, names, seeds)]
    assert together == alone
    by_adapter = {name: [row for row, n in zip(together, names) if n == name] for name in set(names)}
    assert len({json.dumps(rows[0]) for rows in by_adapter.values()}) > 1  # the adapters change the tokens


def test_memory_grows_by_the_adapters_size_not_a_models(presets):
    """Four adapters over one base: the base's tensors are the same ones, none is added to the model,
    and what the adapters hold is what their files hold."""
    base_dir, adapter_dirs = presets
    lm = CausalLM.from_preset(str(base_dir))
    tensors = {id(v): v.value.data_ptr() for v in lm.weights}
    model_bytes = weight_bytes(lm)
    for i, directory in enumerate(adapter_dirs):
        adapter = lm.load_adapter(str(directory), name=f"ft-{i}")
        stored = load_file(directory / ADAPTER_WEIGHTS)
        assert adapter.nbytes == sum(t.numel() * t.element_size() for t in stored.values())
    assert {id(v): v.value.data_ptr() for v in lm.weights} == tensors
    assert weight_bytes(lm) == model_bytes
    assert lm.adapters.nbytes == sum(lm.adapters._adapters[i].nbytes for i in range(ADAPTERS)) < model_bytes / 2
    lm.adapters.remove("ft-0")
    assert "ft-0" not in lm.adapters and lm.adapters.nbytes < sum(a.nbytes for a in lm.adapters._adapters[1:]) + 1


def test_a_fitted_lora_saved_as_an_adapter_generates_as_the_fitted_model(tmp_path):
    """``fit`` with LoRA, then ``save_adapter_preset``: the adapter over the base generates the
    fitted model's tokens, and the base stays the base."""
    backbone = random_weights(engine_backbones()["llama"]())
    from lmq.plugins.llama import LlamaCausalLM

    LlamaCausalLM(backbone).save_to_preset(str(tmp_path / "base"))
    lm = CausalLM.from_preset(str(tmp_path / "base"))
    lm.backbone.enable_lora(4)
    lm.compile(optimizer=keras.optimizers.Adam(0.05), sampler="greedy")  # enough to move greedy tokens
    ids = np.array([[1, 5, 9, 22, 7, 8, 30, 31]])
    lm.fit(x={"token_ids": ids, "padding_mask": np.ones_like(ids, bool)}, y=np.roll(ids, -1), epochs=10, verbose=0)
    prompts = job(4, seed=3)
    fitted = completions(lm, prompts)
    save_adapter_preset(lm, tmp_path / "adapter", str(tmp_path / "base"))

    base = CausalLM.from_preset(str(tmp_path / "base"))
    base.compile(sampler="greedy")
    base.load_adapter(str(tmp_path / "adapter"), name="tuned")
    assert completions(base, prompts, adapter="tuned") == fitted
    assert completions(base, prompts) != fitted


def test_bad_adapters_and_names_are_refused_by_name(presets, tmp_path):
    base_dir, adapter_dirs = presets
    lm = CausalLM.from_preset(str(base_dir))
    lm.load_adapter(str(adapter_dirs[0]), name="ft-0")
    with pytest.raises(ValueError, match="adapter 'nope' is not loaded on this model"):
        completions(lm, [[1, 2, 3]], adapter="nope")
    with pytest.raises(ValueError, match="adapter has 2 names for 1 prompts"):
        completions(lm, [[1, 2, 3]], adapter=["ft-0", None])
    with pytest.raises(ValueError, match="is no adapter preset"):
        lm.load_adapter(str(base_dir))

    def broken(name, config=None, tensors=None):
        directory = tmp_path / name
        directory.mkdir()
        stored = json.loads((adapter_dirs[0] / ADAPTER_CONFIG).read_text())
        (directory / ADAPTER_CONFIG).write_text(json.dumps({**stored, **(config or {})}))
        save_file(tensors or load_file(adapter_dirs[0] / ADAPTER_WEIGHTS), directory / ADAPTER_WEIGHTS)
        return str(directory)

    with pytest.raises(ValueError, match="use_dora=true is not supported"):
        lm.load_adapter(broken("dora", {"use_dora": True}))
    with pytest.raises(ValueError, match="peft_type 'IA3' is not supported"):
        lm.load_adapter(broken("ia3", {"peft_type": "IA3"}))
    stored = load_file(adapter_dirs[0] / ADAPTER_WEIGHTS)
    module = next(iter(stored)).removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
    elsewhere = {key.replace(module, "model.nowhere.q_proj"): value for key, value in stored.items() if module in key}
    with pytest.raises(ValueError, match="module 'model.nowhere.q_proj' is no projection of the base"):
        lm.load_adapter(broken("elsewhere", tensors=elsewhere))
    wrong = {k: (torch.zeros(v.shape[0], v.shape[1] + 3) if ".lora_A." in k else v) for k, v in stored.items()}
    with pytest.raises(ValueError, match="does not fit the base's layer"):
        lm.load_adapter(broken("wrong-width", tensors=wrong))
    with pytest.raises(ValueError, match="names no base preset"):
        CausalLM.from_preset(broken("baseless", {"base_model_name_or_path": None}))


def test_the_pool_pins_the_base_once_and_evicts_adapters_on_their_own(presets, tmp_path):
    """Adapters of one base in a worker's pool: one base, each adapter counted at its own size and
    evicted least recently used first while the base stays; a job on the base alone shares it; a
    base evicted takes its adapters with it."""
    import shutil

    from lmq.workers.pool import ModelPool

    base_dir, adapter_dirs = presets
    base, adapters = str(base_dir.resolve()), [str(d.resolve()) for d in adapter_dirs]
    base_bytes = weight_bytes(CausalLM.from_preset(base))
    adapter_bytes = sum(t.numel() * t.element_size() for t in load_file(adapter_dirs[0] / ADAPTER_WEIGHTS).values())
    pool = ModelPool(budget_bytes=base_bytes + 2 * adapter_bytes, device="cpu")

    first, second = pool.get(adapters[0]), pool.get(adapters[1])
    assert (first.adapter, second.adapter) == (adapters[0], adapters[1]) and not second.hit
    assert second.model is first.model and pool.get(base).model is first.model  # the base, once
    assert pool.pinned_bytes == base_bytes + 2 * adapter_bytes
    third = pool.get(adapters[2])
    assert third.evicted == [adapters[0]] and third.model is first.model
    assert third.model.adapters.names() == [adapters[1], adapters[2]]
    assert pool.keys() == [(adapters[1], None), (base, None), (adapters[2], None)]

    prompts = job(3, seed=5)
    alone = CausalLM.from_preset(adapters[2])
    assert completions(third.model, prompts, sampler="greedy", adapter=third.adapter) == completions(
        alone, prompts, sampler="greedy"
    )

    other = shutil.copytree(base_dir, tmp_path / "other-base")
    evicted = pool.get(str(other)).evicted
    assert sorted(evicted) == sorted([adapters[1], base, adapters[2]])
    assert pool.keys() == [(str(other), None)]
