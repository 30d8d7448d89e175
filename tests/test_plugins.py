"""The plugin registry: entry points, the allow-list, broken plugins, a third-party architecture."""

import json
import os
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

from tests.model_support import train_sentencepiece

ROOT = Path(__file__).resolve().parents[1]

EXAMPLE_PLUGIN = {
    "lmq_example_plugin/__init__.py": '''
        """A third-party architecture: one entry point, one hook."""
        from core.plugins import Architecture, PresetInfo, hookimpl

        ARCHITECTURE = Architecture(
            name="example",
            backbone="lmq_example_plugin.model:ExampleBackbone",
            tokenizer="lmq_example_plugin.model:ExampleTokenizer",
            preprocessor="lmq_example_plugin.model:ExampleCausalLMPreprocessor",
            task="lmq_example_plugin.model:ExampleCausalLM",
            presets={"example_tiny_en": PresetInfo("kaggle://acme/example/keras/tiny")},
        )

        @hookimpl
        def register_architectures(register):
            register(ARCHITECTURE)
    ''',
    "lmq_example_plugin/model.py": '''
        from plugins.llama.llama_backbone import LlamaBackbone
        from plugins.llama.llama_causal_lm import LlamaCausalLM
        from plugins.llama.llama_causal_lm_preprocessor import LlamaCausalLMPreprocessor
        from plugins.llama.llama_tokenizer import LlamaTokenizer

        class ExampleBackbone(LlamaBackbone):
            keras_hub_layout = {**LlamaBackbone.keras_hub_layout, "block": "example_decoder"}

        class ExampleTokenizer(LlamaTokenizer):
            pass

        class ExampleCausalLMPreprocessor(LlamaCausalLMPreprocessor):
            tokenizer_cls = ExampleTokenizer

        class ExampleCausalLM(LlamaCausalLM):
            backbone_cls = ExampleBackbone
            preprocessor_cls = ExampleCausalLMPreprocessor
    ''',
    "lmq_example_plugin-0.1.dist-info/METADATA": "Metadata-Version: 2.1\nName: lmq-example-plugin\nVersion: 0.1\n",
    "lmq_example_plugin-0.1.dist-info/entry_points.txt": "[lmq.plugins]\nexample = lmq_example_plugin\n",
    "lmq_broken_plugin-0.1.dist-info/METADATA": "Metadata-Version: 2.1\nName: lmq-broken-plugin\nVersion: 0.1\n",
    "lmq_broken_plugin-0.1.dist-info/entry_points.txt": "[lmq.plugins]\nbroken = lmq_missing_module_xyz\n",
}


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A directory on PYTHONPATH where the example (and a broken) plugin are 'installed'."""
    site = tmp_path_factory.mktemp("site")
    for name, text in EXAMPLE_PLUGIN.items():
        path = site / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip())
    return site


def run_python(code, site, tmp_path, **env):
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)]), "LMQ_HOME": str(tmp_path / "home")}
    environment.pop("LMQ_PLUGINS", None)
    environment.pop("LMQ_DATABASE_URL", None)
    environment.pop("LMQ_BROKER_URL", None)
    environment.update(env)
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=environment, capture_output=True, text=True, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


LIST = """
    import json, sys
    from core.plugins import get_registry
    registry = get_registry()
    print(json.dumps({
        "architectures": {a.name: a.plugin for a in registry.architectures()},
        "errors": registry.load_errors,
        "heavy": sorted(m for m in ("keras", "torch") if m in sys.modules),
    }))
"""


def test_entry_points_register_builtin_and_third_party_without_keras(site, tmp_path):
    found = run_python(LIST, site, tmp_path)
    builtin = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["lmq.plugins"]
    assert {"llama", "mistral", "phi3", "falcon"} <= builtin.keys()
    assert found["architectures"] == {**{name: name for name in builtin}, "example": "example"}
    assert found["heavy"] == []


def test_a_broken_plugin_is_named_and_the_others_load(site, tmp_path):
    found = run_python(LIST, site, tmp_path)
    assert list(found["errors"]) == ["broken"]
    assert "lmq plugin 'broken' failed to load" in found["errors"]["broken"]
    assert "lmq_missing_module_xyz" in found["errors"]["broken"]


def test_lmq_plugins_allow_list(site, tmp_path):
    found = run_python(LIST, site, tmp_path, LMQ_PLUGINS="llama,example")
    assert found["architectures"] == {"llama": "llama", "example": "example"}
    assert found["errors"] == {}


def test_third_party_architecture_serves_a_job(site, tmp_path):
    spm = train_sentencepiece(tmp_path / "spm")
    outcome = run_python(
        f"""
        import json
        import core
        import keras
        from api.cli import main
        from core.models import CausalLM
        from lmq_example_plugin.model import (
            ExampleBackbone, ExampleCausalLM, ExampleCausalLMPreprocessor, ExampleTokenizer)

        keras.utils.set_random_seed(1)
        tokenizer = ExampleTokenizer(proto={str(spm)!r})
        backbone = ExampleBackbone(tokenizer.vocabulary_size(), 2, 4, 32, 64, 2)
        ExampleCausalLM(backbone, ExampleCausalLMPreprocessor(tokenizer, sequence_length=32)).save_to_preset("preset")
        prompts = ["Return the number", "Open the file"]
        with open("in.jsonl", "w") as f:
            f.writelines(json.dumps({{"custom_id": str(i), "prompt": p}}) + "\\n" for i, p in enumerate(prompts))
        code = main(["generate", "--preset", "preset", "in.jsonl", "-o", "out.jsonl", "--max-length", "16"])
        served = [json.loads(line)["output"] for line in open("out.jsonl")]
        lm = CausalLM.from_preset("preset")
        lm.compile(sampler="greedy")
        print(json.dumps({{
            "code": code,
            "class": type(lm).__name__,
            "served": served,
            "direct": lm.generate(prompts, max_length=16),
            "config_class": json.load(open("preset/config.json"))["class_name"],
        }}))
        """,
        site,
        tmp_path,
    )
    assert outcome["code"] == 0
    assert outcome["class"] == "ExampleCausalLM" and outcome["config_class"] == "ExampleBackbone"
    assert outcome["served"] == outcome["direct"]
    assert all(out.startswith(p) for out, p in zip(outcome["served"], ["Return the number", "Open the file"]))


# -- the backbone contract -------------------------------------------------------------


def test_a_backbone_class_missing_a_piece_is_refused_when_created():
    from core.models import BackboneContractError, DecoderOnlyBackbone

    with pytest.raises(BackboneContractError, match=r"NoWeights does not meet the Backbone contract: .*keras_hub_weights\("):

        class NoWeights(DecoderOnlyBackbone):
            keras_hub_config = ("vocabulary_size",)

            def __init__(self, vocabulary_size, **kwargs):
                super().__init__(**kwargs)

    with pytest.raises(BackboneContractError, match=r"constructor arguments \['hidden_dim'\] are in neither"):

        class UnsavedArgument(DecoderOnlyBackbone):
            keras_hub_config = ("vocabulary_size",)
            keras_hub_weights = dict

            def __init__(self, vocabulary_size, hidden_dim, **kwargs):
                super().__init__(**kwargs)

    with pytest.raises(BackboneContractError, match=r"keras_hub_layout names no \['final_norm'\]"):
        from plugins.llama.llama_backbone import LlamaBackbone

        class HalfLayout(LlamaBackbone):
            keras_hub_layout = {k: v for k, v in LlamaBackbone.keras_hub_layout.items() if k != "final_norm"}


def test_a_backbone_instance_missing_a_piece_is_named_once_built():
    from core.layers import ReversibleEmbedding
    from core.models import BackboneContractError, DecoderOnlyBackbone

    class NoStack(DecoderOnlyBackbone):
        keras_hub_config = ("vocabulary_size",)
        keras_hub_weights = dict

        def __init__(self, vocabulary_size, **kwargs):
            super().__init__(**kwargs)
            self.vocabulary_size = vocabulary_size
            self.token_embedding = ReversibleEmbedding(vocabulary_size, 8)

    with pytest.raises(BackboneContractError, match="NoStack .* it builds no transformer_layers"):
        NoStack(10)

    class NoAttribute(NoStack):
        def __init__(self, vocabulary_size, **kwargs):
            super().__init__(vocabulary_size, **kwargs)
            del self.vocabulary_size

    # The subclass's constructor runs to its end before the check, and the check names the key.
    with pytest.raises(BackboneContractError, match=r"no attribute for the config keys \['vocabulary_size'\]"):
        NoAttribute(10)
