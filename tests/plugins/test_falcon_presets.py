"""Falcon presets in KerasHub's format, and the byte-level BPE tokenizer behind FalconTokenizer."""

import json

import h5py
import numpy as np
import pytest

from lmq.core.models import BytePairTokenizer, CausalLM
from lmq.core.plugins import get_registry
from lmq.plugins.falcon import FalconCausalLM, FalconTokenizer
from model_support import FIXTURES, fixture_expected

FALCON = FIXTURES / "falcon"
ASSETS = FALCON / "assets" / "tokenizer"
TEXTS = ["The module provides", "  Return a new\n\nline's 42<|endoftext|>x  ", "naïve café ✓", ""]


@pytest.fixture(scope="module")
def fixture_lm():
    return CausalLM.from_preset(str(FALCON))


@pytest.fixture(scope="module")
def saved(fixture_lm, tmp_path_factory):
    directory = tmp_path_factory.mktemp("falcon") / "preset"
    fixture_lm.save_to_preset(directory)
    return directory


def test_saved_files_have_keras_hub_structure(saved):
    """Same files, JSON keys, class names and weight paths/shapes as the preset KerasHub saved."""
    names = lambda d: sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file() and p.suffix != ".npy")
    assert names(saved) == names(FALCON)
    for file in ("config.json", "task.json", "preprocessor.json", "tokenizer.json", "metadata.json"):
        ours, theirs = (json.loads((d / file).read_text()) for d in (saved, FALCON))
        assert ours.keys() == theirs.keys(), file
        if "config" in ours:
            assert ours["config"].keys() == theirs["config"].keys(), file
            assert [ours[k] for k in ("class_name", "registered_name", "module")] == [
                theirs[k] for k in ("class_name", "registered_name", "module")
            ]
    assert json.loads((saved / "metadata.json").read_text())["parameter_count"] == 63872

    def shapes(path):  # {dataset path: shape}
        names = []
        with h5py.File(path) as f:
            f.visit(names.append)
            return {name: f[name].shape for name in names if isinstance(f[name], h5py.Dataset)}

    assert shapes(saved / "model.weights.h5") == shapes(FALCON / "model.weights.h5")


def test_saved_preset_reloads_with_the_same_logits(fixture_lm, saved):
    expected = fixture_expected("falcon")
    ids, mask = np.array(expected["token_ids"]), np.array(expected["padding_mask"])
    reloaded = CausalLM.from_preset(str(saved))
    assert isinstance(reloaded, FalconCausalLM)
    assert (reloaded.score(ids, mask) - fixture_lm.score(ids, mask)).abs().max() == 0
    assert reloaded.preprocessor.tokenizer.get_config() == fixture_lm.preprocessor.tokenizer.get_config()


def test_tokenizer_uses_endoftext_and_pads_with_id_0(fixture_lm):
    tokenizer = fixture_lm.preprocessor.tokenizer
    assert isinstance(tokenizer, FalconTokenizer)
    assert tokenizer.start_token_id == tokenizer.end_token_id == tokenizer.token_to_id("<|endoftext|>")
    assert tokenizer.pad_token_id == 0
    token_ids, _ = fixture_lm.preprocessor.pack([[5, 6]], 6, True, True)
    assert token_ids.tolist() == [[tokenizer.start_token_id, 5, 6, tokenizer.end_token_id, 0, 0]]


def test_builtin_preset_name_maps_to_kaggle():
    architecture, info = get_registry().find_preset("falcon_refinedweb_1b_en")
    assert architecture.name == "falcon"
    assert info.handle == "kaggle://keras/falcon/keras/falcon_refinedweb_1b_en"
    assert "falcon_refinedweb_1b_en" in FalconCausalLM.presets


def test_byte_pair_tokenizer_from_files_matches_keras_hub():
    tokenizer = FalconTokenizer(vocabulary=str(ASSETS / "vocabulary.json"), merges=str(ASSETS / "merges.txt"))
    expected = fixture_expected("falcon")
    assert tokenizer.tokenize(expected["prompts"]) == expected["tokenized_prompts"]
    assert tokenizer.detokenize(tokenizer.tokenize(TEXTS)) == TEXTS
    assert tokenizer.tokenize("a<|endoftext|>b")[1] == tokenizer.end_token_id  # never split


def test_byte_pair_tokenizer_round_trips_through_assets_and_config(tmp_path):
    vocabulary = json.loads((ASSETS / "vocabulary.json").read_text())
    merges = (ASSETS / "merges.txt").read_text().splitlines()
    tokenizer = BytePairTokenizer(vocabulary, merges, add_prefix_space=True, unsplittable_tokens=["<|endoftext|>"])
    tokenizer.save_assets(tmp_path)
    restored = BytePairTokenizer.from_config(tokenizer.get_config())
    restored.load_assets(tmp_path)
    assert restored.get_config() == tokenizer.get_config()
    assert restored.tokenize(TEXTS) == tokenizer.tokenize(TEXTS)
    assert tokenizer.tokenize("x") == tokenizer.tokenize(" x")  # add_prefix_space


def test_byte_pair_tokenizer_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="quick"):  # a merge whose result is not in the vocabulary
        BytePairTokenizer({"<|endoftext|>": 0, "q": 1, "uick": 2}, ["q uick"])
    with pytest.raises(ValueError, match="endoftext"):
        FalconTokenizer({"a": 0}, [])
    with pytest.raises(FileNotFoundError, match="missing.json"):
        BytePairTokenizer(str(tmp_path / "missing.json"), [])
    with pytest.raises(ValueError, match="no vocabulary yet"):
        BytePairTokenizer().tokenize("a")


def test_fit_lowers_the_loss():
    """Training runs through the same ALiBi mask, with KerasHub's dropout rates in place."""
    import keras

    lm = CausalLM.from_preset(str(FALCON))
    lm.backbone.transformer_layers[0].dropout = lm.backbone.transformer_layers[0].attention_dropout = 0.1
    lm.compile(optimizer=keras.optimizers.Adam(1e-2))
    history = lm.fit(x=["Return a new module.", "The module provides a simple way to"] * 4, batch_size=4, epochs=6, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0] * 0.8
