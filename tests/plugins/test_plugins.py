"""The plugin registry: entry points, the allow-list, broken plugins, the backbone contract, and
the example third-party architecture (examples/lmq-minigpt) installed, passing the kit, serving a job."""

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

from lmq.core.testing import CausalLMConformance

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "lmq-minigpt"
BROKEN_PLUGIN = {
    "lmq_broken_plugin-0.1.dist-info/METADATA": "Metadata-Version: 2.1\nName: lmq-broken-plugin\nVersion: 0.1\n",
    "lmq_broken_plugin-0.1.dist-info/entry_points.txt": "[lmq.plugins]\nbroken = lmq_missing_module_xyz\n",
}


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A directory for PYTHONPATH where the example is pip-installed (no network: no dependencies,
    the venv's setuptools) beside a broken plugin's entry point."""
    site = tmp_path_factory.mktemp("site")
    source = shutil.copytree(EXAMPLE, tmp_path_factory.mktemp("example") / EXAMPLE.name)  # builds write here
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(site), str(source)],
        check=True, capture_output=True,
    )
    for name, text in BROKEN_PLUGIN.items():
        (site / name).parent.mkdir(parents=True, exist_ok=True)
        (site / name).write_text(text)
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
    from lmq.core.plugins import get_registry
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
    # each built-in plugin registers its own architecture; the llama plugin Llama 3's too
    assert found["architectures"] == {**{name: name for name in builtin}, "llama3": "llama", "minigpt": "minigpt"}
    assert found["heavy"] == []


def test_a_broken_plugin_is_named_and_the_others_load(site, tmp_path):
    found = run_python(LIST, site, tmp_path)
    assert list(found["errors"]) == ["broken"]
    assert "lmq plugin 'broken' failed to load" in found["errors"]["broken"]
    assert "lmq_missing_module_xyz" in found["errors"]["broken"]


def test_lmq_plugins_allow_list(site, tmp_path):
    found = run_python(LIST, site, tmp_path, LMQ_PLUGINS="llama,minigpt")
    assert found["architectures"] == {"llama": "llama", "llama3": "llama", "minigpt": "minigpt"}
    assert found["errors"] == {}


def test_an_allow_list_name_no_plugin_has_is_named_in_one_line(site, tmp_path):
    unknown = run_python(LIST + "    print(json.dumps(registry.unknown_plugins))\n", site, tmp_path, LMQ_PLUGINS="lama,llama")
    assert unknown == ["lama"]
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)]), "LMQ_PLUGINS": "lama"}
    environment["LMQ_HOME"] = str(tmp_path / "home")
    done = subprocess.run(
        [sys.executable, "-m", "lmq.api.cli", "architectures"], env=environment, capture_output=True, text=True, cwd=tmp_path
    )
    assert done.returncode != 0 and done.stdout == ""
    assert done.stderr.strip().count("\n") == 0 and "LMQ_PLUGINS names no installed plugin: lama" in done.stderr
    assert "llama" in done.stderr.partition("installed:")[2]


def test_the_installed_example_passes_the_plugin_kit(site, tmp_path):
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)])}
    environment.pop("LMQ_PLUGINS", None)
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(EXAMPLE / "tests")],
        env=environment, capture_output=True, text=True, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout[-3000:]
    kit_checks = [name for name in dir(CausalLMConformance) if name.startswith("test_")]
    passed = re.search(r"(\d+) passed", done.stdout)
    assert passed and int(passed.group(1)) == len(kit_checks) + 1, done.stdout[-500:]  # + its tokenizer test


def test_third_party_architecture_serves_a_job(site, tmp_path):
    outcome = run_python(
        """
        import json
        import lmq.core
        import keras
        from lmq.api.cli import main
        from lmq.core.models import CausalLM
        from lmq_minigpt import MiniGPTBackbone, MiniGPTCausalLM, MiniGPTCausalLMPreprocessor, MiniGPTTokenizer

        keras.utils.set_random_seed(1)
        tokenizer = MiniGPTTokenizer()
        backbone = MiniGPTBackbone(tokenizer.vocabulary_size(), 2, 4, 32, 64)
        MiniGPTCausalLM(backbone, MiniGPTCausalLMPreprocessor(tokenizer, sequence_length=64)).save_to_preset("preset")
        prompts = ["Return the number", "Open the file"]
        with open("in.jsonl", "w") as f:
            f.writelines(json.dumps({"custom_id": str(i), "prompt": p}) + "\\n" for i, p in enumerate(prompts))
        code = main(["generate", "--preset", "preset", "in.jsonl", "-o", "out.jsonl", "--max-length", "32"])
        served = [json.loads(line)["output"] for line in open("out.jsonl")]
        lm = CausalLM.from_preset("preset")
        lm.compile(sampler="greedy")
        print(json.dumps({
            "code": code,
            "class": type(lm).__name__,
            "module": type(lm).__module__,
            "served": served,
            "direct": lm.generate(prompts, max_length=32),
            "config_class": json.load(open("preset/config.json"))["class_name"],
        }))
        """,
        site,
        tmp_path,
    )
    assert outcome["code"] == 0
    assert outcome["class"] == "MiniGPTCausalLM" and outcome["config_class"] == "MiniGPTBackbone"
    assert outcome["module"] == "lmq_minigpt.minigpt_causal_lm"
    assert outcome["served"] == outcome["direct"]
    assert all(out.startswith(p) for out, p in zip(outcome["served"], ["Return the number", "Open the file"]))


# -- the backbone contract -------------------------------------------------------------


def test_a_backbone_class_missing_a_piece_is_refused_when_created():
    from lmq.core.models import BackboneContractError, DecoderOnlyBackbone

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
        from lmq.plugins.llama.llama_backbone import LlamaBackbone

        class HalfLayout(LlamaBackbone):
            keras_hub_layout = {k: v for k, v in LlamaBackbone.keras_hub_layout.items() if k != "final_norm"}


def test_a_backbone_instance_missing_a_piece_is_named_once_built():
    from lmq.core.layers import ReversibleEmbedding
    from lmq.core.models import BackboneContractError, DecoderOnlyBackbone

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
