"""int8 as Keras 3 and KerasHub quantize: KerasHub's int8 presets, lmq's quantize("int8"), saving, sizes."""

import json
import shutil

import h5py
import keras
import numpy as np
import pytest
import torch

from lmq.api.cli import main
from lmq.core.layers import CachedAttention, GatedFeedForward, ReversibleEmbedding
from lmq.core.models import CausalLM, Task
from lmq.workers.pool import weight_bytes
from model_support import FIXTURES

EXPECTED = json.loads((FIXTURES / "expected.json").read_text())
INT8_PRESETS = ["llama_int8", "mistral_int8"]


def numpy(x):
    return keras.ops.convert_to_numpy(x)


def fixed_batch_logits(lm, name):
    expected = EXPECTED[name]
    batch = {"token_ids": np.array(expected["token_ids"]), "padding_mask": np.array(expected["padding_mask"])}
    with torch.inference_mode():
        return numpy(lm(batch))


def h5_datasets(path):
    found = {}
    with h5py.File(path, "r") as h5_file:
        h5_file.visititems(lambda name, item: found.update({name: item[()]}) if isinstance(item, h5py.Dataset) else None)
    return found


@pytest.fixture(scope="module", params=INT8_PRESETS)
def int8_preset(request):
    return request.param, CausalLM.from_preset(str(FIXTURES / request.param))


# -- KerasHub's int8 presets ------------------------------------------------------------------


def test_keras_hub_int8_preset_loads_as_int8(int8_preset):
    name, lm = int8_preset
    assert lm.backbone.quantization_mode == "int8"
    attention = lm.backbone.transformer_layers[0].attention
    assert attention.query_kernel.dtype == "int8" and tuple(attention.query_kernel_scale.shape) == (1, 1, 4, 16)
    assert lm.backbone.token_embedding.embeddings.dtype == "int8"


def test_keras_hub_int8_preset_reproduces_its_logits(int8_preset):
    name, lm = int8_preset
    expected = np.load(FIXTURES / name / "expected_logits.npy")
    np.testing.assert_allclose(fixed_batch_logits(lm, name), expected, atol=1e-3, rtol=0)


def test_keras_hub_int8_preset_reproduces_its_tokenization_and_greedy_outputs(int8_preset):
    name, lm = int8_preset
    expected = EXPECTED[name]
    assert [list(map(int, lm.preprocessor.tokenizer(p))) for p in expected["prompts"]] == expected["tokenized_prompts"]
    lm.compile(sampler="greedy")
    assert lm.generate(expected["prompts"], max_length=expected["max_length"]) == expected["greedy_generate"]


# -- lmq's quantize("int8") against Keras' own int8 layers ------------------------------------


def keras_int8(layer, x):
    layer.quantize("int8")
    return numpy(layer(x))


def test_projections_quantize_as_keras_dense_and_einsum_dense():
    keras.utils.set_random_seed(3)
    x = torch.randn(2, 5, 32) * 3
    feedforward = GatedFeedForward(32, 48)
    dense = keras.layers.Dense(48, use_bias=False)
    dense.build((None, 32))
    dense.kernel.assign(feedforward.gate_kernel.value)
    attention = CachedAttention(32, 4, 2)
    query = keras.layers.EinsumDense("btd,dnh->btnh", output_shape=(None, 4, 8))
    query.build((None, None, 32))
    query.kernel.assign(attention.query_kernel.value)
    heads = torch.randn(2, 5, 4, 8)
    output = keras.layers.EinsumDense("btnh,nhd->btd", output_shape=(None, 32))
    output.build((None, None, 4, 8))
    output.kernel.assign(attention.output_kernel.value)

    feedforward.quantize("int8")
    attention.quantize("int8")
    from lmq.core.layers.projection import project

    expected = keras_int8(dense, x)
    np.testing.assert_array_equal(numpy(feedforward.gate_kernel.value), numpy(dense._kernel.value))
    np.testing.assert_array_equal(numpy(feedforward.gate_kernel_scale.value), numpy(dense.kernel_scale.value))
    np.testing.assert_allclose(numpy(project(x, feedforward.kernel("gate_kernel"))), expected, atol=1e-6, rtol=1e-6)

    expected = keras_int8(query, x)  # [batch, seq, heads, head_dim]
    assert tuple(attention.query_kernel_scale.shape) == tuple(query.kernel_scale.shape)
    np.testing.assert_array_equal(numpy(attention.query_kernel_scale.value), numpy(query.kernel_scale.value))
    np.testing.assert_allclose(numpy(attention._heads(x, "query").transpose(1, 2)), expected, atol=1e-6, rtol=1e-6)

    expected = keras_int8(output, heads)
    np.testing.assert_array_equal(numpy(attention.output_kernel.value), numpy(output._kernel.value))
    np.testing.assert_array_equal(numpy(attention.output_kernel_scale.value), numpy(output.kernel_scale.value))
    ours = project(heads.reshape(2, 5, 32), attention.kernel("output_kernel"))
    np.testing.assert_allclose(numpy(ours), expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("tie_weights", [True, False])
def test_reversible_embedding_quantizes_as_keras(tie_weights):
    keras.utils.set_random_seed(4)
    ours = ReversibleEmbedding(50, 16, tie_weights=tie_weights)
    theirs = keras.layers.ReversibleEmbedding(50, 16, tie_weights=tie_weights)
    theirs.build()
    theirs.embeddings.assign(ours.embeddings.value)
    if not tie_weights:
        theirs.reverse_embeddings.assign(ours.reverse_embeddings.value)
    ours.quantize("int8")
    theirs.quantize("int8")
    ids = torch.tensor([[3, 7, 49], [0, 1, 2]])
    hidden = torch.randn(2, 3, 16)
    np.testing.assert_allclose(numpy(ours.call(ids)), numpy(theirs(ids)), atol=1e-6, rtol=1e-6)
    np.testing.assert_allclose(numpy(ours.reverse(hidden)), numpy(theirs(hidden, reverse=True)), atol=1e-6, rtol=1e-6)
    assert [tuple(v.shape) for v in ours.variables] == [tuple(v.shape) for v in theirs.variables]


def dequantized_copy(name):
    """The fixture's model in float32, each kernel its int8 values / scale (what KerasHub quantized)."""
    from lmq.core.layers.projection import Projections

    int8_lm = CausalLM.from_preset(str(FIXTURES / name))
    backbone = type(int8_lm.backbone).from_config({**int8_lm.backbone.get_config(), "dtype": "float32"})
    float_lm = type(int8_lm)(backbone=backbone, preprocessor=int8_lm.preprocessor)
    layers = [[x for x in lm.backbone._flatten_layers() if isinstance(x, Projections)] for lm in (float_lm, int8_lm)]
    for ours, theirs in zip(*layers):
        for kernel in ours.kernel_names():
            stored = getattr(theirs, kernel)
            if kernel == "embeddings":  # the table: one scale per row
                value = numpy(stored.value).astype("float32") / numpy(stored.int8_scale.value)[:, None]
            else:  # [in, out] / [out]
                matrix = theirs.kernel(kernel)
                value = (matrix.values.float() / matrix.scale).reshape(stored.shape)
            getattr(ours, kernel).assign(value)
    scales = {id(v.int8_scale) for v in int8_lm.backbone.weights if hasattr(v, "int8_scale")}
    float_weights = float_lm.backbone.keras_hub_weights()
    for path, variable in int8_lm.backbone.keras_hub_weights().items():
        if variable.dtype != "int8" and id(variable) not in scales:  # norms
            float_weights[path].assign(variable.value)
    assert float_lm.backbone.quantization_mode is None
    return float_lm


@pytest.mark.parametrize("name", INT8_PRESETS)
def test_lmq_quantize_matches_keras_hub_on_the_same_weights(name):
    """The fixture's weights back in float, quantized by lmq: KerasHub's int8 values, and its logits."""
    lm = dequantized_copy(name)
    lm.quantize("int8")
    ours = lm.backbone.weights_to_save()
    theirs = h5_datasets(FIXTURES / name / "model.weights.h5")
    assert sorted(ours) == sorted(theirs)
    for path, value in ours.items():
        if theirs[path].dtype == np.int8:
            np.testing.assert_array_equal(numpy(value), theirs[path], err_msg=path)
        else:
            np.testing.assert_allclose(numpy(value), theirs[path], rtol=1e-5, err_msg=path)
    expected = np.load(FIXTURES / name / "expected_logits.npy")
    np.testing.assert_allclose(fixed_batch_logits(lm, name), expected, atol=1e-3, rtol=0)


# -- saving ------------------------------------------------------------------------------------


def test_an_int8_preset_saves_in_keras_hub_layout_and_loads_back_bit_identical(int8_preset, tmp_path):
    name, lm = int8_preset
    lm.save_to_preset(str(tmp_path / "saved"))
    saved = tmp_path / "saved"
    config, fixture = (json.loads((d / "config.json").read_text()) for d in (saved, FIXTURES / name))
    assert config["config"]["dtype"] == fixture["config"]["dtype"]  # the same DTypePolicyMap
    assert config["registered_name"] == fixture["registered_name"]
    ours, theirs = h5_datasets(saved / "model.weights.h5"), h5_datasets(FIXTURES / name / "model.weights.h5")
    assert sorted(ours) == sorted(theirs)
    assert all(ours[p].dtype == theirs[p].dtype and np.array_equal(ours[p], theirs[p]) for p in ours)
    again = CausalLM.from_preset(str(saved))
    assert [v.dtype for v in again.backbone.weights] == [v.dtype for v in lm.backbone.weights]
    for before, after in zip(lm.backbone.weights, again.backbone.weights):
        np.testing.assert_array_equal(numpy(after.value), numpy(before.value))
    np.testing.assert_array_equal(fixed_batch_logits(again, name), fixed_batch_logits(lm, name))


def keras_hub_dense_layer_paths(h5_path):
    """KerasHub's layer paths of the kernels and token embedding in a float preset's weights
    file, from the layer names Keras writes beside each variable group (KerasHub's
    PositionEmbedding is no Keras Embedding: quantize leaves it in float)."""
    paths = []
    with h5py.File(h5_path, "r") as h5_file:

        def visit(name, item):
            if "position_embedding" in name:
                return
            if isinstance(item, h5py.Group) and name.endswith("/vars") and len(item) and item["0"].ndim >= 2:
                parts = name.split("/")[1:-1]
                names = [h5_file["/".join(["layers", *parts[: i + 1], "vars"])].attrs["name"] for i in range(len(parts))]
                paths.append("/".join(names))

        h5_file.visititems(visit)
    return sorted(paths)


@pytest.mark.parametrize("name", ["llama", "mistral", "phi3", "falcon", "bart"])
def test_a_model_quantized_by_lmq_saves_a_preset_keras_hub_loads(name, tmp_path):
    """The config's DTypePolicyMap names KerasHub's own layer paths (read from KerasHub's float
    preset), the weights hold int8 kernels and scales in Keras' order, and it loads back the same."""
    lm = Task.from_preset(str(FIXTURES / name))
    lm.quantize("int8")
    lm.save_to_preset(str(tmp_path / "q"))
    config = json.loads((tmp_path / "q" / "config.json").read_text())["config"]
    policy_map = config["dtype"]["config"]["policy_map"]
    assert config["dtype"]["class_name"] == "DTypePolicyMap"
    assert sorted(policy_map) == keras_hub_dense_layer_paths(FIXTURES / name / "model.weights.h5")
    keras_map = keras.dtype_policies.deserialize(config["dtype"])  # as KerasHub reads it
    assert {keras_map[path].name for path in policy_map} == {"int8_from_float32"}
    stored = h5_datasets(tmp_path / "q" / "model.weights.h5")
    query = [p for p in stored if p.endswith("_dense/vars/0") and "query" in p][0]
    scale = query.replace("vars/0", "vars/2" if name in ("falcon", "bart") else "vars/1")  # after the bias
    assert stored[query].dtype == np.int8 and stored[scale].shape == (1, 1, *stored[query].shape[1:])
    again = Task.from_preset(str(tmp_path / "q"))
    for before, after in zip(lm.backbone.weights, again.backbone.weights):
        assert before.dtype == after.dtype
        np.testing.assert_array_equal(numpy(after.value), numpy(before.value))
    lm.compile(sampler="greedy")
    again.compile(sampler="greedy")
    assert again.generate(["Hello there"], max_length=12) == lm.generate(["Hello there"], max_length=12)


# -- sizes, errors, jobs -----------------------------------------------------------------------


def quantized_layer_bytes(lm):
    from lmq.core.layers.projection import Projections

    layers = [layer for layer in lm.backbone._flatten_layers() if isinstance(layer, Projections)]
    variables = [v for layer in layers for v in layer.variables]
    return sum(numpy(v.value).nbytes for v in variables)


def test_int8_weights_take_about_a_quarter_of_float32_and_the_pool_counts_that():
    lm = CausalLM.from_preset(str(FIXTURES / "llama"))
    float_layers, float_total = quantized_layer_bytes(lm), weight_bytes(lm)
    lm.quantize("int8")
    int8_layers = quantized_layer_bytes(lm)
    assert int8_layers <= float_layers / 3
    real = sum(numpy(v.value).nbytes for v in lm.weights)
    assert weight_bytes(lm) == real < float_total / 2.5
    assert all(v.dtype in ("int8", "float32") for v in lm.weights)


def test_an_int8_preset_never_builds_its_kernels_in_float(monkeypatch):
    """Loading needs the int8 bytes only: no float kernel is allocated and then replaced."""
    created = []
    add_weight = keras.layers.Layer.add_weight

    def recording(layer, *args, **kwargs):
        variable = add_weight(layer, *args, **kwargs)
        created.append((variable.name, variable.dtype))
        return variable

    monkeypatch.setattr(keras.layers.Layer, "add_weight", recording)
    CausalLM.from_preset(str(FIXTURES / "llama_int8"))
    kernels = [(name, dtype) for name, dtype in created if name.endswith(("_kernel", "embeddings"))]
    assert len(kernels) == 2 * 7 + 2 and {dtype for _, dtype in kernels} == {"int8"}


def test_int8_kernels_project_from_their_own_storage():
    """No per-step copy: what ``project`` multiplies by is a view of the int8 variable."""
    lm = CausalLM.from_preset(str(FIXTURES / "llama_int8"))
    feedforward = lm.backbone.transformer_layers[0].feedforward
    kernel = feedforward.kernel("gate_kernel")
    assert kernel.values.dtype == torch.int8
    assert kernel.values.data_ptr() == feedforward.gate_kernel.value.data_ptr()


@pytest.mark.parametrize("mode", ["int4", "float8", "gptq", "int16"])
def test_an_unsupported_mode_is_a_value_error_naming_it(mode):
    lm = CausalLM.from_preset(str(FIXTURES / "llama"))
    with pytest.raises(ValueError, match=f"unsupported quantization mode '{mode}'; lmq supports \\['int8'\\]"):
        lm.quantize(mode)
    assert lm.backbone.quantization_mode is None


def test_quantized_dtypes_and_double_quantization_are_refused():
    with pytest.raises(ValueError, match="dtype 'int8' is a quantization mode"):
        CausalLM.from_preset(str(FIXTURES / "llama"), dtype="int8")
    lm = CausalLM.from_preset(str(FIXTURES / "llama_int8"))
    with pytest.raises(ValueError, match="already quantized"):
        lm.quantize("int8")
    with pytest.raises(ValueError, match="LoRA on a int8 model"):
        lm.backbone.enable_lora(2)
    lm.compile(optimizer="adam")
    with pytest.raises(ValueError, match="LlamaCausalLM is int8: fine-tune the float model"):
        lm.fit(["Some text to learn"], epochs=1)


def test_int8_weights_under_a_float_config_are_refused_by_name(tmp_path):
    preset = tmp_path / "mislabelled"
    shutil.copytree(FIXTURES / "llama_int8", preset)
    config = json.loads((preset / "config.json").read_text())
    config["config"]["dtype"] = "float32"
    (preset / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="holds int8 weights .*but config.json's dtype is not int8"):
        CausalLM.from_preset(str(preset))


def test_an_int8_preset_loads_in_bfloat16_and_stays_int8():
    lm = CausalLM.from_preset(str(FIXTURES / "llama_int8"), dtype="bfloat16")
    assert {str(v.dtype) for v in lm.backbone.weights} == {"int8", "bfloat16"}
    logits = fixed_batch_logits(lm, "llama_int8")
    expected = np.load(FIXTURES / "llama_int8" / "expected_logits.npy")
    np.testing.assert_allclose(logits.astype("float32"), expected, atol=0.02, rtol=0)


def test_a_generate_job_names_an_int8_preset(lmq_home, tmp_path):
    """Imported into the store like any preset, named by a job, it gives KerasHub's greedy outputs."""
    expected = EXPECTED["llama_int8"]
    assert main(["presets", "import", str(FIXTURES / "llama_int8"), "--name", "my-int8"]) == 0
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in expected["prompts"]))
    output = tmp_path / "out.jsonl"
    code = main(["generate", "--preset", "my-int8", str(source), "-o", str(output),
                 "--max-length", str(expected["max_length"])])
    assert code == 0
    results = sorted((json.loads(line) for line in output.read_text().splitlines()), key=lambda r: r["index"])
    assert all(r["error"] is None for r in results)
    assert [r["output"] for r in results] == expected["greedy_generate"]
