"""Adapter presets against Hugging Face ``peft``: a LoRA adapter that ``peft`` made on a transformers
Llama, Mistral, Phi-3 or Falcon (fused query-key-value and gate-up modules) loads in lmq and gives
``peft``'s logits; an adapter lmq saves loads in ``peft`` and gives lmq's."""

import json

import keras
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from lmq.core.adapters import save_adapter_preset
from lmq.core.models import CausalLM
from model_support import random_hf_llama, random_transformers_lm, right_padded

PROMPTS = [[1, 17, 42, 99, 250, 7, 300, 12, 5, 6, 7, 81], [1, 5, 6, 7, 8], [1, 200, 201, 202, 9]]
SIZES = dict(vocab_size=400, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, initializer_range=0.15)


def random_hf_mistral(seed=0):
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(
        **SIZES, intermediate_size=128, num_key_value_heads=2, sliding_window=6, rms_norm_eps=1e-5,
        attn_implementation="eager",
    )
    return random_transformers_lm(MistralForCausalLM, config, seed)


def random_hf_phi3(seed=0):
    from transformers import Phi3Config, Phi3ForCausalLM

    config = Phi3Config(**SIZES, intermediate_size=128, num_key_value_heads=2, rms_norm_eps=1e-5, pad_token_id=0,
                        attn_implementation="eager")
    return random_transformers_lm(Phi3ForCausalLM, config, seed)


def random_hf_falcon(seed=0):
    """Falcon-7B's layout (rotary, multi-query, attention beside the MLP); SDPA, as lmq's Falcon parity tests."""
    from transformers import FalconConfig, FalconForCausalLM

    return random_transformers_lm(FalconForCausalLM, FalconConfig(**SIZES, attn_implementation="sdpa"), seed)


# architecture: (a random transformers model, its projections as peft names them: attention's first, the MLP's last)
BASES = {
    "llama": (random_hf_llama, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "mistral": (random_hf_mistral, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "phi3": (random_hf_phi3, ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]),  # fused: one A, B split
    "falcon": (random_hf_falcon, ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]),
}
# (rank, alpha, target_modules) of lmq's query-and-value LoRA of rank 3, alpha 6, exported: a fused
# query-key-value module holds both updates side by side, rank 6
EXPORTED = {
    "llama": (3, 6, ["q_proj", "v_proj"]),
    "mistral": (3, 6, ["q_proj", "v_proj"]),
    "phi3": (6, 12, ["qkv_proj"]),
    "falcon": (6, 12, ["query_key_value"]),
}


def logits(model, prompts=PROMPTS):
    """A transformers (or peft) model's logits [batch, length, vocab] of right-padded prompts, and the mask."""
    ids, mask = right_padded(prompts)
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask).long()).logits, mask


def max_difference(lm, reference, mask, prompts=PROMPTS):
    ids, _ = right_padded(prompts)
    return float((lm.score(ids, mask) - reference)[torch.tensor(mask)].abs().max())


@pytest.fixture(params=sorted(BASES))
def arch(request):
    return request.param


@pytest.fixture
def base_dir(arch, tmp_path):
    """A random transformers checkpoint of each architecture, saved as lmq loads it."""
    BASES[arch][0]().save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def load_hf(base_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base_dir).eval()


def peft_configs(modules):
    """Every projection; the attention's first in one layer, with rsLoRA; two with an alpha of their own."""
    return {
        "every_projection": dict(r=4, lora_alpha=8, target_modules=modules),
        "rslora_one_layer": dict(r=2, lora_alpha=16, target_modules=modules[:1], use_rslora=True, layers_to_transform=[1]),
        "alpha_pattern": dict(r=4, lora_alpha=8, target_modules=[modules[0], modules[-1]], alpha_pattern={modules[-1]: 32}),
    }


@pytest.mark.parametrize("case", sorted(peft_configs([""])))
def test_a_peft_adapter_gives_peft_logits(arch, base_dir, tmp_path, case):
    """Random A and B (``init_lora_weights=False``), so the adapter changes every logit it touches."""
    config = peft_configs(BASES[arch][1])[case]
    torch.manual_seed(1)
    peft_model = get_peft_model(load_hf(base_dir), LoraConfig(init_lora_weights=False, **config)).eval()
    peft_model.save_pretrained(tmp_path / "adapter")
    reference, mask = logits(peft_model)
    with peft_model.disable_adapter():
        base_logits, _ = logits(peft_model)
    assert float((reference - base_logits).abs().max()) > 1e-2  # the adapter matters

    lm = CausalLM.from_preset(str(tmp_path / "adapter"), base=str(base_dir))
    assert max_difference(lm, reference, mask) <= 1e-4


def test_the_base_comes_from_the_adapter_config(arch, base_dir, tmp_path):
    """``peft`` writes the base's name into adapter_config.json; naming the adapter alone loads both."""
    torch.manual_seed(2)
    hf = load_hf(base_dir)
    hf.config._name_or_path = str(base_dir)  # as from_pretrained(base_dir) records it
    peft_model = get_peft_model(hf, LoraConfig(r=4, lora_alpha=8, target_modules=BASES[arch][1], init_lora_weights=False)).eval()
    peft_model.save_pretrained(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base_dir)
    reference, mask = logits(peft_model)
    assert max_difference(CausalLM.from_preset(str(tmp_path / "adapter")), reference, mask) <= 1e-4


def test_an_lmq_adapter_loads_in_peft(arch, base_dir, tmp_path):
    """lmq's LoRA (query and value, KerasHub's) trained a step, saved as an adapter preset: ``peft``
    loads it onto the transformers base and gives lmq's logits, and so does lmq reloading it."""
    lm = CausalLM.from_preset(str(base_dir))
    lm.backbone.enable_lora(3, alpha=6)
    lm.compile(optimizer=keras.optimizers.SGD(0.5))
    lm.fit(x={"token_ids": torch.tensor([[1, 5, 9, 22, 7, 8]]), "padding_mask": torch.ones(1, 6, dtype=bool)},
           y=torch.tensor([[5, 9, 22, 7, 8, 3]]), epochs=1, verbose=0)
    ids, mask = right_padded(PROMPTS)
    ours = lm.score(ids, mask)
    save_adapter_preset(lm, tmp_path / "adapter", str(base_dir))

    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["target_modules"]) == EXPORTED[arch]
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    peft_model = PeftModel.from_pretrained(load_hf(base_dir), tmp_path / "adapter").eval()
    reference, _ = logits(peft_model)
    with peft_model.disable_adapter():
        base_logits, _ = logits(peft_model)
    assert float((reference - base_logits).abs().max()) > 1e-3  # the step moved the adapter off zero
    assert float((ours - reference)[torch.tensor(mask)].abs().max()) <= 1e-4
    assert max_difference(CausalLM.from_preset(str(tmp_path / "adapter")), reference, mask) <= 1e-4
