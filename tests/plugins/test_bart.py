"""Bart (Seq2SeqLM) against KerasHub's saved preset and transformers' BartForConditionalGeneration:
same logits, tokenization and generations; conversion, fine-tuning and saving."""

import json
import shutil
import sys
import types

import numpy as np
import pytest
import torch

from lmq.core.models import CausalLM, Seq2SeqLM
from lmq.core.samplers import BeamSampler
from lmq.plugins.bart import BartSeq2SeqLM
from model_support import FIXTURES, assert_keras_hub_structure, fixture_expected, right_padded

BART = FIXTURES / "bart"
ID_KEYS = ("encoder_token_ids", "encoder_padding_mask", "decoder_token_ids", "decoder_padding_mask")
# encoder and decoder rows of different lengths, padded with <pad> (1)
ENCODER = [[0, 17, 42, 99, 250, 7, 30, 2], [0, 5, 6, 7, 2], [0, 200, 201, 202, 203, 204, 205, 206, 207, 208, 2]]
DECODER = [[2, 0, 11, 12, 13, 14], [2, 0, 21, 22], [2, 0, 9]]
START = [2, 0]  # Bart's decoder start tokens: </s> <s>


def id_batch(encoder, decoder):
    (encoder_ids, encoder_mask), (decoder_ids, decoder_mask) = right_padded(encoder, 1), right_padded(decoder, 1)
    return dict(zip(ID_KEYS, (encoder_ids, encoder_mask, decoder_ids, decoder_mask)))


# -- KerasHub's preset -------------------------------------------------------------------


@pytest.fixture(scope="module")
def keras_hub_bart():
    return Seq2SeqLM.from_preset(str(BART))


def test_keras_hub_preset_reproduces_its_logits(keras_hub_bart):
    expected = fixture_expected("bart")
    assert isinstance(keras_hub_bart, BartSeq2SeqLM)
    inputs = {key: np.array(expected[key]) for key in ID_KEYS}
    logits = keras_hub_bart(inputs).detach().numpy()
    reference = np.load(BART / "expected_logits.npy")
    real = inputs["decoder_padding_mask"]
    assert logits.shape == reference.shape
    assert np.abs(logits - reference)[real].max() <= 1e-4


def test_keras_hub_preset_greedy_outputs(keras_hub_bart):
    expected = fixture_expected("bart")
    keras_hub_bart.compile(sampler="greedy")
    assert keras_hub_bart.generate(expected["inputs"], max_length=expected["max_length"]) == expected["greedy_generate"]


def test_tokenization_matches_transformers_bart_tokenizer(keras_hub_bart):
    from transformers import BartTokenizer as HFBartTokenizer

    assets = BART / "assets" / "tokenizer"
    reference = HFBartTokenizer(vocab=str(assets / "vocabulary.json"), merges=str(assets / "merges.txt"))
    texts = fixture_expected("bart")["inputs"] + ["  Spaces, tabs\tand <s> specials </s>!", "ünïcödé and 123"]
    tokenizer = keras_hub_bart.preprocessor.tokenizer
    assert tokenizer.tokenize(texts) == [reference(t, add_special_tokens=False)["input_ids"] for t in texts]
    encoder, decoder = keras_hub_bart.preprocessor.generate_preprocess(texts[:1])
    assert encoder == [reference(texts[0])["input_ids"]]  # <s> tokens </s>
    assert decoder == [START]


def test_preprocessor_packs_as_keras_hub_and_truncates(keras_hub_bart):
    preprocessor = keras_hub_bart.preprocessor
    tokenizer = preprocessor.tokenizer
    text = fixture_expected("bart")["inputs"][0]
    tokens = tokenizer.tokenize(text)
    x, y, weights = preprocessor({"encoder_text": [text], "decoder_text": [text]}, encoder_sequence_length=6,
                                 decoder_sequence_length=8)
    assert x["encoder_token_ids"].tolist() == [[0, *tokens[:4], 2]]  # truncated, end token kept
    assert x["decoder_token_ids"].tolist() == [[2, 0, *tokens[:6]]]
    assert y.tolist() == [[0, *tokens[:6], 2]]
    assert weights.all()


def test_saved_preset_has_keras_hub_layout_and_loads_back_bit_identically(keras_hub_bart, tmp_path):
    keras_hub_bart.save_to_preset(tmp_path / "saved")
    assert_keras_hub_structure(tmp_path / "saved", BART)
    loaded = Seq2SeqLM.from_preset(str(tmp_path / "saved"))
    for ours, theirs in zip(keras_hub_bart.backbone.weights, loaded.backbone.weights):
        assert torch.equal(ours.value, theirs.value)
    inputs = id_batch(ENCODER, DECODER)
    assert torch.equal(keras_hub_bart(inputs), loaded(inputs))


def test_a_bart_preset_is_not_a_causal_lm():
    with pytest.raises(ValueError, match="not a CausalLM"):
        CausalLM.from_preset(str(BART))


def test_fit_on_text_pairs_lowers_the_loss(tmp_path):
    shutil.copytree(BART, tmp_path / "bart")
    lm = Seq2SeqLM.from_preset(str(tmp_path / "bart"))
    lm.preprocessor.encoder_sequence_length = lm.preprocessor.decoder_sequence_length = 16
    pairs = {"encoder_text": ["Return the number of items.", "This class implements a queue."] * 2,
             "decoder_text": ["Number of items.", "A queue."] * 2}
    lm.compile(optimizer=__import__("keras").optimizers.Adam(1e-2))
    history = lm.fit(pairs, epochs=4, batch_size=4, verbose=0)
    losses = history.history["loss"]
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("name, download", [
    ("bart_base_en", "keras/bart/keras/bart_base_en"),
    ("bart_large_en", "keras/bart/keras/bart_large_en"),
    ("bart_large_en_cnn", "keras/bart/keras/bart_large_en_cnn"),  # KerasHub's name
    ("bart_large_cnn_en", "keras/bart/keras/bart_large_en_cnn"),  # the same preset
])
def test_builtin_preset_names_download_keras_hub_handles(name, download, monkeypatch):
    """Each name fetches its KerasHub handle through kagglehub (here one that serves the fixture)."""
    fetched = []
    kagglehub = types.SimpleNamespace(model_download=lambda path: fetched.append(path) or str(BART))
    monkeypatch.setitem(sys.modules, "kagglehub", kagglehub)
    assert name in Seq2SeqLM.presets and name in BartSeq2SeqLM.presets
    assert isinstance(Seq2SeqLM.from_preset(name), BartSeq2SeqLM)
    assert fetched == [download]


def test_compile_has_keras_hub_defaults(keras_hub_bart):
    import keras

    from lmq.core.samplers import TopKSampler

    keras_hub_bart.compile()
    assert isinstance(keras_hub_bart.optimizer, keras.optimizers.Adam)
    assert float(keras_hub_bart.optimizer.learning_rate) == pytest.approx(2e-5)
    assert isinstance(keras_hub_bart.loss, keras.losses.SparseCategoricalCrossentropy)
    assert keras_hub_bart.loss.get_config()["from_logits"]
    assert isinstance(keras_hub_bart.sampler, TopKSampler)


def test_fit_on_pre_tokenized_inputs_without_preprocessor(tmp_path):
    """KerasHub's "fit without preprocessing": the id/mask dict, labels and sample weights as given."""
    shutil.copytree(BART, tmp_path / "bart")
    lm = Seq2SeqLM.from_preset(str(tmp_path / "bart"), preprocessor=None)
    assert lm.preprocessor is None
    x = {
        "encoder_token_ids": np.array([[0, 133, 219, 2, 1]] * 2),
        "encoder_padding_mask": np.array([[1, 1, 1, 1, 0]] * 2),
        "decoder_token_ids": np.array([[2, 0, 133, 176, 2]] * 2),
        "decoder_padding_mask": np.array([[1, 1, 1, 1, 1]] * 2),
    }
    y, weights = np.array([[0, 133, 176, 2, 1]] * 2), np.array([[1, 1, 1, 1, 0]] * 2)
    lm.compile(optimizer=__import__("keras").optimizers.Adam(1e-2))
    losses = lm.fit(x=x, y=y, sample_weight=weights, batch_size=2, epochs=4, verbose=0).history["loss"]
    assert losses[-1] < losses[0]
    for text_call in (lambda: lm.fit({"encoder_text": ["a"], "decoder_text": ["b"]}), lambda: lm.generate("a")):
        with pytest.raises(ValueError, match="no preprocessor"):
            text_call()


def test_decoder_text_starts_the_output_and_strip_prompt_drops_it(keras_hub_bart):
    keras_hub_bart.compile(sampler="random")
    prompt = {"encoder_text": fixture_expected("bart")["inputs"][0], "decoder_text": "Return the"}
    options = dict(max_length=14, stop_token_ids=None, seed=4)
    full = keras_hub_bart.generate(prompt, **options)
    completion = keras_hub_bart.generate(prompt, **options, strip_prompt=True)
    assert full.startswith("Return the") and len(full) > len("Return the")
    assert full == "Return the" + completion


# -- transformers --------------------------------------------------------------------------


def random_hf_bart(seed=0, **settings):
    """Random weights peaked enough for a stable argmax, with random biases and norms."""
    from transformers import BartConfig, BartForConditionalGeneration

    config = BartConfig(**{
        **dict(
            vocab_size=300, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
            dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, init_std=0.2, pad_token_id=1,
            bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, forced_bos_token_id=0,
        ),
        **settings,
    })
    torch.manual_seed(seed)
    model = BartForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):
                parameter.normal_(0.0, 0.1)
            elif "layer_norm" in name or "layernorm" in name:
                parameter.normal_(1.0, 0.1)
    return model


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    hf = random_hf_bart()
    directory = tmp_path_factory.mktemp("hf_bart")
    hf.save_pretrained(directory)
    return hf, Seq2SeqLM.from_preset(str(directory))


def hf_inputs(inputs):
    return dict(
        input_ids=torch.tensor(inputs["encoder_token_ids"]),
        attention_mask=torch.tensor(inputs["encoder_padding_mask"]).long(),
    )


def test_converted_checkpoint_matches_transformers_logits_on_padded_batches(pair):
    hf, lm = pair
    assert isinstance(lm, BartSeq2SeqLM)
    inputs = id_batch(ENCODER, DECODER)
    with torch.no_grad():
        reference = hf(
            **hf_inputs(inputs),
            decoder_input_ids=torch.tensor(inputs["decoder_token_ids"]),
            decoder_attention_mask=torch.tensor(inputs["decoder_padding_mask"]).long(),
        ).logits
    logits = lm(inputs)
    real = torch.tensor(inputs["decoder_padding_mask"])
    assert (logits - reference).abs()[real].max() <= 1e-4


def hf_generate(hf, inputs, new, **settings):
    """transformers' generate from the decoder start tokens, with nothing forced or stopped."""
    with torch.no_grad():
        out = hf.generate(
            **hf_inputs(inputs), decoder_input_ids=torch.tensor([START] * len(inputs["encoder_token_ids"])),
            max_new_tokens=new, min_length=0, eos_token_id=None, forced_bos_token_id=None, forced_eos_token_id=None,
            no_repeat_ngram_size=0, do_sample=False, **settings,
        )
    return out[:, len(START):].tolist()


def lmq_generate(lm, inputs, new, **options):
    rows = len(inputs["encoder_token_ids"])
    decoder = id_batch(ENCODER[:rows], [START + [1] * new] * rows)
    decoder["decoder_padding_mask"][:, len(START):] = False
    out = lm.generate({**inputs, "decoder_token_ids": decoder["decoder_token_ids"],
                       "decoder_padding_mask": decoder["decoder_padding_mask"]}, stop_token_ids=None, **options)
    return out["decoder_token_ids"][:, len(START):].tolist()


@pytest.mark.parametrize("sampler, settings", [("greedy", dict(num_beams=1)),
                                               (BeamSampler(num_beams=3), dict(num_beams=3, length_penalty=0.0))])
def test_generate_is_token_identical_to_transformers(pair, sampler, settings):
    hf, lm = pair
    inputs = id_batch(ENCODER, DECODER)
    lm.compile(sampler=sampler)
    assert lmq_generate(lm, inputs, 10) == hf_generate(hf, inputs, 10, **settings)


@pytest.mark.parametrize("sampler", ["greedy", BeamSampler(num_beams=2)])
def test_rows_joining_a_running_batch_get_the_same_tokens(pair, sampler):
    """One row at a time (continuous batching): each joining row's encoder keys/values are
    written into the running cache, whatever its encoder length."""
    _, lm = pair
    inputs = id_batch(ENCODER, DECODER)
    lm.compile(sampler=sampler)
    assert lmq_generate(lm, inputs, 8, max_rows=1) == lmq_generate(lm, inputs, 8)


@pytest.mark.parametrize("sampler", ["greedy", BeamSampler(num_beams=2), "contrastive"])
def test_requests_finishing_and_joining_keep_their_encoder_memory(pair, sampler):
    """Decoder prompts of different lengths in a 12-token batch have different token limits
    (9, 8, 6, 5 tokens). With three requests in flight, the third finishes first, the fourth
    joins in its slots, then moves into the second's when that one finishes: each request
    (its beams or candidates sharing one encoder memory) gets what it gets alone."""
    _, lm = pair
    lm.compile(sampler=sampler)
    encoder = ENCODER + [[0, 31, 32, 33, 34, 35, 36, 2]]
    decoder = [[2, 0, 11], [2, 0, 21, 22], [2, 0, 9, 8, 7, 6], [2, 0, 5, 5, 5, 5, 5]]
    inputs = id_batch(encoder, [row + [1] * (12 - len(row)) for row in decoder])
    inputs["decoder_padding_mask"] = inputs["decoder_token_ids"] != 1

    def generate(batch, **options):
        return lm.generate(batch, stop_token_ids=None, seed=5, **options)["decoder_token_ids"].tolist()

    alone = [generate({key: value[i : i + 1] for key, value in inputs.items()})[0] for i in range(len(decoder))]
    assert generate(inputs, max_rows=3) == alone


@pytest.fixture(scope="module")
def with_tokenizer(tmp_path_factory):
    """A transformers checkpoint with the fixture's tokenizer files: (transformers' model and
    tokenizer, lmq's Seq2SeqLM of them)."""
    from transformers import BartTokenizer as HFBartTokenizer

    assets = BART / "assets" / "tokenizer"
    tokenizer = HFBartTokenizer(vocab=str(assets / "vocabulary.json"), merges=str(assets / "merges.txt"))
    hf = random_hf_bart(seed=1, vocab_size=len(tokenizer))
    directory = tmp_path_factory.mktemp("hf_bart_with_tokenizer")
    hf.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return hf, tokenizer, Seq2SeqLM.from_preset(str(directory))


def hf_texts(hf, tokenizer, texts, new, **settings):
    batch = tokenizer(texts, return_tensors="np", padding=True)
    inputs = {"encoder_token_ids": batch["input_ids"], "encoder_padding_mask": batch["attention_mask"].astype(bool)}
    return tokenizer.batch_decode(hf_generate(hf, inputs, new, **settings), skip_special_tokens=True)


def test_checkpoint_with_its_tokenizer_generates_the_text_transformers_does(with_tokenizer):
    hf, tokenizer, lm = with_tokenizer
    lm.compile(sampler="greedy")
    texts = fixture_expected("bart")["inputs"]
    encoder, _ = lm.preprocessor.generate_preprocess(texts)
    assert encoder == tokenizer(texts)["input_ids"]
    assert lm.generate(texts, max_length=len(START) + 8, stop_token_ids=None) == hf_texts(hf, tokenizer, texts, 8)


@pytest.mark.parametrize("setting", [
    dict(scale_embedding=True), dict(decoder_layers=3), dict(activation_function="relu"),
    dict(decoder_start_token_id=0), dict(forced_bos_token_id=5),
])
def test_unsupported_checkpoint_settings_are_named(setting, tmp_path):
    random_hf_bart().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **setting}))
    key = next(iter(setting))
    with pytest.raises(Exception, match=key):
        Seq2SeqLM.from_preset(str(tmp_path))


# -- samplers and generation options ---------------------------------------------------------


@pytest.mark.parametrize("sampler", ["top_k", "top_p", "random", "contrastive", "beam"])
def test_every_sampler_generates_text_reproducibly(keras_hub_bart, sampler):
    keras_hub_bart.compile(sampler=sampler)
    prompts = fixture_expected("bart")["inputs"]
    first = keras_hub_bart.generate(prompts, max_length=12, stop_token_ids=None, seed=7, return_details=True)
    again = keras_hub_bart.generate(prompts, max_length=12, stop_token_ids=None, seed=7, return_details=True)
    assert [g.token_ids for g in first] == [g.token_ids for g in again]
    assert all(g.completion_tokens == 10 for g in first)  # 12 decoder tokens, 2 of them the start


def test_max_new_tokens_and_stop_strings(keras_hub_bart):
    keras_hub_bart.compile(sampler="random")  # the fixture's greedy output is only end tokens
    prompt = fixture_expected("bart")["inputs"][0]
    options = dict(max_length=20, stop_token_ids=None, seed=3)
    full = keras_hub_bart.generate(prompt, **options, return_details=True)
    short = keras_hub_bart.generate(prompt, **options, max_new_tokens=3, return_details=True)
    assert short.token_ids == full.token_ids[:3] and short.finish_reason == "length"
    assert len(full.text) > 6
    stop = full.text[len(full.text) // 2 :][:3]
    cut = keras_hub_bart.generate(prompt, **options, stop=[stop])
    assert stop not in cut and full.text.startswith(cut) and len(cut) < len(full.text)


def test_beam_search_text_streams_and_stops_on_the_chosen_beam(with_tokenizer):
    """Beam search commits only at the end: its text is transformers' beam search's, the stream
    receives the chosen beam's tokens, and a stop string cuts that beam."""
    hf, tokenizer, lm = with_tokenizer
    lm.compile(sampler=BeamSampler(num_beams=3))
    prompt = fixture_expected("bart")["inputs"][1]
    options = dict(max_length=len(START) + 10, stop_token_ids=None)
    streamed = []
    full = lm.generate(prompt, **options, return_details=True, stream=lambda row, token: streamed.append(token))
    assert [full.text] == hf_texts(hf, tokenizer, [prompt], 10, num_beams=3, length_penalty=0.0)
    assert streamed == full.token_ids and len(full.token_ids) == 10 and len(full.text) > 4
    stop = full.text[len(full.text) // 2 :][:2]
    cut = lm.generate(prompt, **options, stop=[stop], return_details=True)
    assert stop not in cut.text and full.text.startswith(cut.text) and cut.finish_reason == "stop"


def test_streaming_receives_each_generated_token(keras_hub_bart):
    keras_hub_bart.compile(sampler="top_k")
    streamed = {}
    prompts = fixture_expected("bart")["inputs"]
    results = keras_hub_bart.generate(
        prompts, max_length=10, stop_token_ids=None, seed=1, return_details=True,
        stream=lambda row, token: streamed.setdefault(row, []).append(token),
    )
    assert [streamed[row] for row in range(len(prompts))] == [r.token_ids for r in results]


def test_a_max_length_past_the_learned_positions_is_named_before_decoding(keras_hub_bart):
    learned = keras_hub_bart.backbone.max_sequence_length
    with pytest.raises(ValueError, match=f"Position {learned} is beyond this model's {learned} learned positions"):
        keras_hub_bart.generate("The quick brown fox", max_length=learned + 1)
    encoder_ids = [[0, 5, 2] + [1] * learned]  # one position past the encoder's learned ones
    with pytest.raises(ValueError, match=f"Position {learned + 2} is beyond"):
        keras_hub_bart.backbone.encode(torch.tensor(encoder_ids), torch.ones(1, learned + 3, dtype=torch.bool))
