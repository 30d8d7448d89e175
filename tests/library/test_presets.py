"""Preset round trips, transformers imports, and clear errors for bad presets."""

import ast
import json
import pathlib
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

from lmq.core.models import CausalLM
from lmq.core.presets import PresetNotFound, PresetResolver
from lmq.plugins.llama import LlamaBackbone, LlamaCausalLM, LlamaCausalLMPreprocessor, LlamaTokenizer
from import_support import assert_no_cycle, imports_of, module_graph
from model_support import FIXTURES, random_hf_llama, right_padded, tiny_llama, train_sentencepiece


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    return train_sentencepiece(tmp_path_factory.mktemp("spm"))


@pytest.fixture
def tiny_lm(spm_model):
    return tiny_llama(spm_model, sequence_length=32)


def _batch():
    return right_padded([[1, 30, 31, 32, 33, 34], [1, 40, 41]])


def test_save_and_load_give_bit_identical_logits(tiny_lm, tmp_path):
    tiny_lm.save_to_preset(tmp_path / "preset")
    loaded = CausalLM.from_preset(str(tmp_path / "preset"))
    ids, mask = _batch()
    assert torch.equal(tiny_lm.score(ids, mask), loaded.score(ids, mask))
    assert loaded.preprocessor.sequence_length == 32
    assert loaded.preprocessor.tokenizer.tokenize("Return the path") == tiny_lm.preprocessor.tokenizer.tokenize(
        "Return the path"
    )


def test_tied_embeddings_survive_save_and_load(spm_model, tmp_path):
    tokenizer = LlamaTokenizer(proto=spm_model)
    backbone = LlamaBackbone(tokenizer.vocabulary_size(), 1, 2, 16, 32, 1, tie_word_embeddings=True)
    LlamaCausalLM(backbone, LlamaCausalLMPreprocessor(tokenizer)).save_to_preset(tmp_path / "tied")
    loaded = CausalLM.from_preset(str(tmp_path / "tied"))
    assert loaded.backbone.tie_word_embeddings
    assert loaded.backbone.token_embedding.reverse_embeddings is None
    with h5py.File(tmp_path / "tied" / "model.weights.h5") as f:
        assert "layers/reversible_embedding/vars/1" not in f


def test_saved_files_have_keras_hub_structure(tiny_lm, tmp_path):
    """Same files, JSON keys, class names and weight paths/shapes as the preset KerasHub saved."""
    tiny_lm.save_to_preset(tmp_path / "preset")
    ours, theirs = tmp_path / "preset", FIXTURES / "llama"
    names = lambda d: sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file() and p.suffix != ".npy")
    assert names(ours) == names(theirs)
    for file in ("config.json", "task.json", "preprocessor.json", "tokenizer.json", "metadata.json"):
        a, b = json.loads((ours / file).read_text()), json.loads((theirs / file).read_text())
        assert a.keys() == b.keys(), file
        if "config" in a:
            assert a["config"].keys() == b["config"].keys(), file
            assert (a["class_name"], a["registered_name"], a["module"]) == (
                b["class_name"],
                b["registered_name"],
                b["module"],
            )

    def datasets(path):
        found = {}
        with h5py.File(path) as f:
            f.visititems(lambda n, o: found.__setitem__(n, o.ndim) if isinstance(o, h5py.Dataset) else None)
        return found

    assert datasets(ours / "model.weights.h5") == datasets(theirs / "model.weights.h5")


def test_fit_lowers_the_loss(tiny_lm):
    texts = ["Return the number of items in a container.", "Open the file and return a stream."] * 4
    tiny_lm.compile(optimizer=__import__("keras").optimizers.Adam(1e-2))
    history = tiny_lm.fit(x=texts, batch_size=4, epochs=6, verbose=0)
    losses = history.history["loss"]
    assert losses[-1] < losses[0] * 0.8


def test_fit_on_pretokenized_dict(tiny_lm):
    ids, mask = right_padded([[1, 30, 31, 32, 33, 2], [1, 40, 41, 2]])
    y = np.roll(ids, -1, axis=1)
    sample_weight = np.roll(mask, -1, axis=1)
    sample_weight[:, -1] = False
    tiny_lm.compile(optimizer=__import__("keras").optimizers.Adam(1e-2))
    history = tiny_lm.fit(
        x={"token_ids": ids, "padding_mask": mask}, y=y, sample_weight=sample_weight, batch_size=2, epochs=5, verbose=0
    )
    assert history.history["loss"][-1] < history.history["loss"][0]


def test_score_loss_is_next_token_cross_entropy(tiny_lm):
    ids, mask = _batch()
    logits = tiny_lm.score(ids, mask).float()
    losses = tiny_lm.score(ids, mask, scoring_mode="loss")
    expected = torch.nn.functional.cross_entropy(logits[0, 0], torch.tensor(ids[0, 1]))
    assert torch.allclose(losses[0, 0], expected, atol=1e-5)
    assert losses[1, 2:].abs().sum() == 0  # no next token past row 1's prompt


def test_transformers_checkpoint_with_tokenizer_and_bfloat16(spm_model, tmp_path):
    hf = random_hf_llama(vocab_size=LlamaTokenizer(proto=spm_model).vocabulary_size())
    hf.save_pretrained(tmp_path / "hf")
    shutil.copy(spm_model, tmp_path / "hf" / "tokenizer.model")
    lm = CausalLM.from_preset(str(tmp_path / "hf"))
    assert lm.preprocessor is not None
    assert lm.preprocessor.tokenizer.tokenize("Return the path")[0] != 0
    lm16 = CausalLM.from_preset(str(tmp_path / "hf"), dtype="bfloat16")
    assert lm16.backbone.token_embedding.embeddings.value.dtype == torch.bfloat16
    ids, mask = _batch()
    full, half = lm.score(ids, mask), lm16.score(ids, mask).float()
    assert (full - half)[torch.tensor(mask)].abs().max() < 0.1
    lm16.compile(sampler="greedy")
    assert isinstance(lm16.generate("Return the", max_length=12), str)


def test_sharded_safetensors_checkpoint(tmp_path):
    hf = random_hf_llama()
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    lm = CausalLM.from_preset(str(tmp_path / "sharded"))
    ids, mask = _batch()
    with torch.no_grad():
        reference = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask).long()).logits
    assert (lm.score(ids, mask) - reference)[torch.tensor(mask)].abs().max() <= 1e-4


def test_hf_handle_from_offline_cache(tmp_path, monkeypatch):
    """hf://org/name resolves through huggingface_hub's cache with HF_HUB_OFFLINE set."""
    hf = random_hf_llama()
    cache = tmp_path / "hub"
    snapshot = cache / "models--acme--tiny-llama" / "snapshots" / ("a" * 40)
    hf.save_pretrained(snapshot)
    (cache / "models--acme--tiny-llama" / "refs").mkdir()
    (cache / "models--acme--tiny-llama" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    lm = CausalLM.from_preset("hf://acme/tiny-llama")
    assert isinstance(lm, LlamaCausalLM)
    with pytest.raises(PresetNotFound, match="hf://acme/missing"):
        CausalLM.from_preset("hf://acme/missing")


# -- the resolver ---------------------------------------------------------------------


def test_named_presets_come_only_from_the_callers_lookup(tmp_path):
    named = {"tuned": str(FIXTURES / "llama")}
    with pytest.raises(PresetNotFound, match="unknown preset 'tuned'"):
        CausalLM.from_preset("tuned")  # plain library use knows no store names
    lm = CausalLM.from_preset("tuned", resolver=PresetResolver(named.get))
    assert isinstance(lm, LlamaCausalLM)
    assert PresetResolver(named.get).locate("tuned") == str((FIXTURES / "llama").resolve())


def test_builtin_names_win_over_the_lookup_and_remote_handles_pass_through():
    resolver = PresetResolver({"llama2_7b_en": "/somewhere", "hf://acme/x": "/elsewhere"}.get)
    assert resolver.locate("llama2_7b_en") == "llama2_7b_en"
    assert resolver.locate("hf://acme/x") == "hf://acme/x"
    assert resolver.locate("hf://acme/x@main") == "hf://acme/x@main"
    assert resolver.locate("kaggle://keras/llama2/keras/llama2_7b_en/2") == "kaggle://keras/llama2/keras/llama2_7b_en/2"


@pytest.mark.parametrize(
    "handle",
    ["hf://acme", "hf://acme/x/y", "hf://../etc", "hf://x/../../y", "hf://acme/x@", "kaggle://a", "kaggle://a//b/c"],
)
def test_malformed_remote_handles_are_refused_before_any_fetch(handle):
    with pytest.raises(PresetNotFound, match="expected (hf|kaggle)://"):
        PresetResolver().locate(handle)


def test_local_directories_relative_to_the_roots(tmp_path):
    inside = shutil.copytree(FIXTURES / "llama", tmp_path / "roots" / "llama")
    resolver = PresetResolver(local_roots=[tmp_path / "roots"])
    assert resolver.directory(str(tmp_path / "roots" / "." / "llama")) == inside.resolve()
    with pytest.raises(PresetNotFound, match="outside the allowed preset roots"):
        resolver.locate(str(FIXTURES / "llama"))


@pytest.mark.parametrize("handle", ["~no_such_user_xyz/model", "x" * 300, "a/" + "y" * 300])
def test_unusable_paths_are_preset_not_found(tmp_path, monkeypatch, handle):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a").mkdir()
    with pytest.raises(PresetNotFound, match="unknown preset"):
        PresetResolver().locate(handle)


LIBRARY = ("core/models", "core/presets", "core/layers", "core/samplers")
ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_the_model_library_and_plugins_import_without_a_cycle():
    """Lazy imports count: a function-level import that closes a loop is still a cycle."""
    paths = [ROOT / "core" / "plugins.py"]
    for package in ("core/models", "core/presets", "core/layers", "core/testing", "plugins"):
        paths += (ROOT / package).rglob("*.py")
    assert_no_cycle(module_graph(paths))


def test_the_model_library_reads_neither_the_store_nor_the_environment():
    for path in sorted(p for package in LIBRARY for p in (ROOT / package).rglob("*.py")):
        assert not [m for m in imports_of(path) if m.startswith(("lmq.core.store", "lmq.core.config"))], path
        names = {node.attr for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Attribute)}
        assert not names & {"environ", "getenv"}, path
    code = (
        "import sys; from lmq.core.models import CausalLM; "
        f"CausalLM.from_preset({str(FIXTURES / 'llama')!r}); "
        "print(sorted(m for m in sys.modules if m.startswith(('lmq.core.store', 'lmq.core.config'))))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


# -- bad presets --------------------------------------------------------------------


def _copy_fixture(tmp_path):
    return shutil.copytree(FIXTURES / "llama", tmp_path / "llama")


def test_unknown_handle_is_named():
    with pytest.raises(PresetNotFound, match="no_such_preset_xyz"):
        CausalLM.from_preset("no_such_preset_xyz")


def test_kaggle_handle_without_kagglehub_names_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "kagglehub", None)
    with pytest.raises(PresetNotFound, match="kagglehub"):
        CausalLM.from_preset("llama2_7b_en")


def test_missing_weights_file_is_named(tmp_path):
    preset = _copy_fixture(tmp_path)
    (preset / "model.weights.h5").unlink()
    with pytest.raises(FileNotFoundError, match="model.weights.h5"):
        CausalLM.from_preset(str(preset))


def test_shape_mismatch_names_the_weight(tmp_path):
    preset = _copy_fixture(tmp_path)
    config = json.loads((preset / "config.json").read_text())
    config["config"]["intermediate_dim"] = 48
    (preset / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="_feedforward_gate_dense.*shape"):
        CausalLM.from_preset(str(preset))


def test_unknown_class_is_named_and_module_never_imported(tmp_path):
    preset = _copy_fixture(tmp_path)
    config = json.loads((preset / "config.json").read_text())
    config["module"] = "lmq_test_never_import_me"
    (preset / "config.json").write_text(json.dumps(config))
    CausalLM.from_preset(str(preset))
    assert "lmq_test_never_import_me" not in sys.modules
    config["class_name"] = "EvilBackbone"
    config["registered_name"] = "keras_hub>EvilBackbone"
    (preset / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="EvilBackbone"):
        CausalLM.from_preset(str(preset))
    assert "lmq_test_never_import_me" not in sys.modules


def test_pickle_weights_are_refused(tmp_path):
    hf = random_hf_llama()
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    (tmp_path / "hf" / "model.safetensors").rename(tmp_path / "hf" / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="pickle"):
        CausalLM.from_preset(str(tmp_path / "hf"))


def test_prompt_longer_than_max_length_is_named(tiny_lm):
    with pytest.raises(ValueError, match="Prompt 1 .* longer than max_length=4"):
        tiny_lm.generate(["a", "Return the number of items in a container"], max_length=4)


def test_no_tensorflow():
    import importlib.util

    assert importlib.util.find_spec("tensorflow") is None
    assert not any(name.split(".")[0] == "tensorflow" for name in sys.modules)


def test_tokenizer_and_preprocessor_from_preset(tmp_path, spm_model):
    from lmq.core.models import CausalLMPreprocessor

    preprocessor = LlamaCausalLMPreprocessor.from_preset(str(FIXTURES / "llama"), sequence_length=12)
    assert preprocessor.sequence_length == 12
    x, y, _ = preprocessor(["Return a new"])
    assert x["token_ids"].shape == (1, 12) and (x["token_ids"][0, 1:] == y[0, :-1]).all()
    tokenizer = LlamaTokenizer.from_preset(str(FIXTURES / "llama"))
    assert tokenizer.tokenize("Return a new") == [481, 260, 599]
    hf = random_hf_llama(vocab_size=LlamaTokenizer(proto=spm_model).vocabulary_size())
    hf.save_pretrained(tmp_path / "hf")
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        CausalLMPreprocessor.from_preset(str(tmp_path / "hf"))
    shutil.copy(spm_model, tmp_path / "hf" / "tokenizer.model")
    assert isinstance(CausalLMPreprocessor.from_preset(str(tmp_path / "hf")), LlamaCausalLMPreprocessor)


def test_lora_trains_only_adapters_and_saves_a_plain_preset(tiny_lm, tmp_path):
    import keras

    backbone = tiny_lm.backbone
    kernel_before = backbone.transformer_layers[0].attention.query_kernel.value.detach().clone()
    ids, mask = _batch()
    logits_before = tiny_lm.score(ids, mask)
    backbone.enable_lora(4)
    assert torch.equal(tiny_lm.score(ids, mask), logits_before)  # adapters start as a no-op
    trainable = {v.path.split("/")[-1] for v in tiny_lm.trainable_variables}
    assert trainable == {"query_lora_down", "query_lora_up", "value_lora_down", "value_lora_up"}
    assert len(tiny_lm.trainable_variables) == 4 * backbone.num_layers

    tiny_lm.compile(optimizer=keras.optimizers.Adam(1e-2))
    history = tiny_lm.fit(x=["Return the number of items in a container."] * 8, batch_size=4, epochs=4, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]
    assert torch.equal(backbone.transformer_layers[0].attention.query_kernel.value, kernel_before)
    tuned = tiny_lm.score(ids, mask)
    assert not torch.allclose(tuned, logits_before)

    tiny_lm.save_to_preset(tmp_path / "lora")
    loaded = CausalLM.from_preset(str(tmp_path / "lora"))
    assert not loaded.backbone.transformer_layers[0].attention.lora
    assert (loaded.score(ids, mask) - tuned).abs().max() < 1e-5


@pytest.mark.parametrize("mode", ["float8", "int4"])
def test_an_unsupported_quantize_mode_is_refused_by_name_and_changes_nothing(tiny_lm, mode):
    """Only int8 is supported (tests/test_int8.py); Keras' other modes are refused, not ignored."""
    ids, mask = _batch()
    before = tiny_lm.score(ids, mask)
    for target in (tiny_lm, tiny_lm.backbone):
        with pytest.raises(ValueError, match=f"unsupported quantization mode '{mode}'; lmq supports"):
            target.quantize(mode)
    assert {v.dtype for v in tiny_lm.backbone.weights} == {"float32"}
    assert torch.equal(tiny_lm.score(ids, mask), before)


def test_lora_rank_must_be_positive(tiny_lm):
    with pytest.raises(ValueError, match="rank"):
        tiny_lm.backbone.enable_lora(0)
