"""A preset is a closed world (issue 11, deliverable 2): every escape route the probe found.

Each malicious preset leads to a canary outside its directory. A canary is a real, valid copy
of the file it stands for (so a loader that followed the route would load without complaint)
with a marker a leaked error would show. That the canary stays unread is checked with
inotify: the kernel reports every open of the watched file, whoever opens it - Python,
HDF5's C library, safetensors' Rust, sentencepiece - through any symlink or path. That is
robust where the alternatives are not: tests run as root (so no permission trick), atime
depends on the mount's options, and patching ``open`` misses native code.
``test_the_canary_watch_sees_native_opens`` shows the watch catches each kind of reader.
"""

import ctypes
import json
import os
import pathlib
import shutil
import struct

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from lmq.core.models import CausalLM
from lmq.core.presets.files import PresetFileError, PresetFiles
from lmq.plugins.llama import LlamaTokenizer
from model_support import FIXTURES, random_hf_llama, train_sentencepiece

MARKER = "CANARY-4f1e"  # in every canary's content; never in an error
IN_ACCESS, IN_OPEN = 0x1, 0x20


class CanaryWatch:
    """Reports opens and reads of the watched files (inotify, non-blocking)."""

    def __init__(self):
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        assert self.fd >= 0, os.strerror(ctypes.get_errno())
        self.watched = {}

    def watch(self, *paths):
        for path in paths:
            for file in [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()):
                wd = self.libc.inotify_add_watch(self.fd, os.fsencode(file), IN_OPEN | IN_ACCESS)
                assert wd >= 0, os.strerror(ctypes.get_errno())
                self.watched[wd] = file

    def opened(self):
        """The watched files opened or read since the last call."""
        seen = set()
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return seen
            offset = 0
            while offset < len(data):
                wd, _, _, length = struct.unpack_from("iIII", data, offset)
                seen.add(self.watched[wd])
                offset += 16 + length

    def close(self):
        os.close(self.fd)


@pytest.fixture
def canaries():
    watch = CanaryWatch()
    yield watch
    watch.close()


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    return train_sentencepiece(tmp_path_factory.mktemp("spm"))


def keras_hub_preset(tmp_path, arch="llama"):
    preset = shutil.copytree(FIXTURES / arch, tmp_path / "preset")
    (tmp_path / "outside").mkdir()
    return preset, tmp_path / "outside"


def move_out(preset, outside, relative, marker=True):
    """Moves the preset's file or directory out (the canary), leaving a symlink to it in its place."""
    target = outside / relative.replace("/", "_")
    shutil.move(preset / relative, target)
    if marker and target.is_file() and target.suffix == ".json":  # still valid JSON, now with the marker
        data = json.loads(target.read_text())
        data["canary"] = MARKER
        target.write_text(json.dumps(data))
    (preset / relative).symlink_to(target, target_is_directory=target.is_dir())
    return target


def refused(preset, canaries, *outside, file, handle=None):
    """Loading ``preset`` is a PresetFileError naming it and ``file``; nothing ``outside`` is opened."""
    canaries.watch(*outside)
    with pytest.raises(PresetFileError) as raised:
        CausalLM.from_preset(handle or str(preset))
    message = str(raised.value)
    assert f"Preset {handle or str(preset)!r}" in message and file in message, message
    assert MARKER not in message and "root:" not in message, message
    assert canaries.opened() == set(), f"{canaries.opened()} read; {message}"
    return message


def test_the_canary_watch_sees_native_opens(tmp_path, canaries, spm_model):
    """The method itself: Python, HDF5, safetensors and sentencepiece opens are all reported."""
    weights = tmp_path / "w.h5"
    with h5py.File(weights, "w") as f:
        f["x"] = np.zeros(2)
    tensors = tmp_path / "t.safetensors"
    save_file({"x": torch.zeros(2)}, tensors)
    text = tmp_path / "t.txt"
    text.write_text(MARKER)
    canaries.watch(weights, tensors, text, pathlib.Path(spm_model))
    with h5py.File(weights, "r") as f:
        f["x"][()]
    assert canaries.opened() == {weights}
    load_file(tensors)
    assert canaries.opened() == {tensors}
    (tmp_path / "link").symlink_to(text)
    (tmp_path / "link").read_text()
    assert canaries.opened() == {text}
    import sentencepiece

    sentencepiece.SentencePieceProcessor(model_file=str(spm_model))
    assert canaries.opened() == {pathlib.Path(spm_model)}


# -- KerasHub presets: symlinks ---------------------------------------------------------


@pytest.mark.parametrize(
    "relative", ["config.json", "model.weights.h5", "tokenizer.json", "preprocessor.json", "task.json"]
)
def test_a_symlinked_preset_file_is_refused_unread(tmp_path, canaries, relative):
    preset, outside = keras_hub_preset(tmp_path)
    canary = move_out(preset, outside, relative)
    message = refused(preset, canaries, canary, file=relative)
    assert "outside the preset" in message


@pytest.mark.parametrize("relative", ["assets", "assets/tokenizer", "assets/tokenizer/vocabulary.spm"])
def test_symlinked_tokenizer_assets_are_refused_unread(tmp_path, canaries, relative):
    preset, outside = keras_hub_preset(tmp_path)
    canary = move_out(preset, outside, relative)
    refused(preset, canaries, canary, file=relative)


@pytest.mark.parametrize("arch, field", [("llama", "proto"), ("falcon", "vocabulary"), ("falcon", "merges")])
def test_a_tokenizer_config_naming_a_file_is_refused_unread(tmp_path, canaries, arch, field):
    preset, outside = keras_hub_preset(tmp_path, arch)
    assets = preset / "assets" / "tokenizer"
    name = {"proto": "vocabulary.spm", "vocabulary": "vocabulary.json", "merges": "merges.txt"}[field]
    canary = shutil.copy(assets / name, outside / name)
    config = json.loads((preset / "tokenizer.json").read_text())
    for path in (str(canary), f"../outside/{name}"):
        config["config"][field] = path
        (preset / "tokenizer.json").write_text(json.dumps(config))
        message = refused(preset, canaries, pathlib.Path(canary), file="tokenizer.json")
        assert field in message


def test_a_bad_bpe_vocabulary_is_named_without_its_tokens(tmp_path):
    """The probe's leak: the tokenizers package's error quoted a token of the vocabulary."""
    preset, _ = keras_hub_preset(tmp_path, "falcon")
    merges = preset / "assets" / "tokenizer" / "merges.txt"
    merges.write_text(f"#version: 0.2\n{MARKER}a {MARKER}b\n")
    with pytest.raises(PresetFileError, match="merges.txt") as raised:
        CausalLM.from_preset(str(preset))
    assert MARKER not in str(raised.value)


def test_undecodable_assets_are_named_without_their_bytes(tmp_path):
    preset, _ = keras_hub_preset(tmp_path, "falcon")
    (preset / "assets" / "tokenizer" / "merges.txt").write_bytes(b"#version: 0.2\n\xff\xfeCANARY\n")
    with pytest.raises(PresetFileError, match="merges.txt: is not UTF-8 text") as raised:
        CausalLM.from_preset(str(preset))
    assert "CANARY" not in str(raised.value) and "0xff" not in str(raised.value)
    llama, _ = keras_hub_preset(tmp_path / "llama")
    (llama / "assets" / "tokenizer" / "vocabulary.spm").write_bytes(b"root:x:0:0:root:/root:/bin/bash\n")
    with pytest.raises(PresetFileError, match="vocabulary.spm: Not a valid SentencePiece model") as raised:
        CausalLM.from_preset(str(llama))
    assert "root:" not in str(raised.value)


# -- KerasHub presets: inside model.weights.h5 --------------------------------------------


def rewrite_weight(preset, make):
    """Replaces the first weight of ``model.weights.h5`` with ``make(h5_file, path, data)``."""
    with h5py.File(preset / "model.weights.h5", "r+") as weights:
        found = []
        weights.visititems(lambda name, item: found.append(name) if isinstance(item, h5py.Dataset) else None)
        path = found[0]
        data = weights[path][()]
        del weights[path]
        make(weights, path, data)
    return path


def test_hdf5_external_storage_is_refused_unread(tmp_path, canaries):
    preset, outside = keras_hub_preset(tmp_path)
    canary = outside / "raw.bin"

    def external(weights, path, data):
        canary.write_bytes(data.astype("float32").tobytes())  # the weight's own values: reading it would "work"
        weights.create_dataset(path, shape=data.shape, dtype="float32", external=[(str(canary), 0, data.nbytes)])

    rewrite_weight(preset, external)
    assert "other files" in refused(preset, canaries, canary, file="model.weights.h5")


def test_hdf5_virtual_datasets_are_refused_unread(tmp_path, canaries):
    preset, outside = keras_hub_preset(tmp_path)
    canary = outside / "source.h5"

    def virtual(weights, path, data):
        with h5py.File(canary, "w") as source:
            source["data"] = data.astype("float32")
        layout = h5py.VirtualLayout(shape=data.shape, dtype="float32")
        layout[...] = h5py.VirtualSource(str(canary), "data", shape=data.shape)
        weights.create_virtual_dataset(path, layout)

    rewrite_weight(preset, virtual)
    assert "other files" in refused(preset, canaries, canary, file="model.weights.h5")


@pytest.mark.parametrize("kind", ["SoftLink", "ExternalLink"])
def test_hdf5_soft_and_external_links_are_refused_unread(tmp_path, canaries, kind):
    preset, outside = keras_hub_preset(tmp_path)
    canary = outside / "other.h5"

    def link(weights, path, data):
        with h5py.File(canary, "w") as other:
            other["data"] = data
        if kind == "SoftLink":
            weights["stash"] = data
            weights[path] = h5py.SoftLink("/stash")
        else:
            weights[path] = h5py.ExternalLink(str(canary), "/data")

    rewrite_weight(preset, link)
    assert kind in refused(preset, canaries, canary, file="model.weights.h5")


def test_an_hdf5_filter_that_loads_a_plugin_library_is_refused(tmp_path):
    """For a filter it lacks (32001: Blosc), HDF5 would load a library from its plugin path."""
    preset, _ = keras_hub_preset(tmp_path)

    def blosc(weights, path, data):
        options = {"chunks": data.shape, "compression": 32001, "allow_unknown_filter": True}
        dataset = weights.create_dataset(path, shape=data.shape, dtype="float32", **options)
        dataset.id.write_direct_chunk((0,) * data.ndim, data.astype("float32").tobytes())

    rewrite_weight(preset, blosc)
    with pytest.raises(PresetFileError, match=r"model.weights.h5: dataset .* needs HDF5 filter \[32001\]"):
        CausalLM.from_preset(str(preset))


def test_integer_weight_data_is_refused_not_cast(tmp_path):
    """The probe's int64 weights were cast into float weights silently."""
    preset, _ = keras_hub_preset(tmp_path)
    path = rewrite_weight(preset, lambda weights, path, data: weights.create_dataset(path, data=data.astype("int64")))
    expected = f"model.weights.h5: weight '{path}' holds int64 data, but the layer is float"
    with pytest.raises(PresetFileError, match=expected):
        CausalLM.from_preset(str(preset))


# -- transformers checkpoints -------------------------------------------------------------


@pytest.fixture
def checkpoint(tmp_path, spm_model):
    """A transformers Llama checkpoint with its tokenizer, and a directory beside it."""
    directory = tmp_path / "hf"
    random_hf_llama(vocab_size=LlamaTokenizer(proto=spm_model).vocabulary_size()).save_pretrained(directory)
    shutil.copy(spm_model, directory / "tokenizer.model")
    (tmp_path / "outside").mkdir()
    assert isinstance(CausalLM.from_preset(str(directory)), CausalLM)  # whole, it loads
    return directory, tmp_path / "outside"


def write_index(directory, entry):
    """A shard index naming ``model.safetensors`` for every tensor, and ``entry`` for the first."""
    names = sorted(load_file(directory / "model.safetensors"))
    weight_map = {name: "model.safetensors" for name in names}
    weight_map[names[0]] = entry
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.mark.parametrize("entry", ["absolute", "../outside/canary.safetensors", "sub/../../outside/canary.safetensors"])
def test_an_index_entry_outside_the_checkpoint_is_refused_unread(checkpoint, canaries, entry):
    directory, outside = checkpoint
    canary = pathlib.Path(shutil.copy(directory / "model.safetensors", outside / "canary.safetensors"))
    write_index(directory, str(canary) if entry == "absolute" else entry)
    message = refused(directory, canaries, canary, file=str(canary) if entry == "absolute" else entry)
    assert "outside the preset" in message


def test_an_index_entry_naming_etc_passwd_is_refused(checkpoint):
    directory, _ = checkpoint
    write_index(directory, "/etc/passwd")
    with pytest.raises(PresetFileError, match="/etc/passwd: names a place outside the preset") as raised:
        CausalLM.from_preset(str(directory))
    assert "root:" not in str(raised.value)


@pytest.mark.parametrize("relative", ["model.safetensors", "config.json", "tokenizer.model"])
def test_a_symlinked_checkpoint_file_is_refused_unread(checkpoint, canaries, relative):
    directory, outside = checkpoint
    canary = move_out(directory, outside, relative)
    refused(directory, canaries, canary, file=relative)


def test_a_symlinked_shard_is_refused_unread(checkpoint, canaries):
    directory, outside = checkpoint
    shutil.copy(directory / "model.safetensors", directory / "shard-1.safetensors")
    write_index(directory, "shard-1.safetensors")
    canary = move_out(directory, outside, "shard-1.safetensors")
    refused(directory, canaries, canary, file="shard-1.safetensors")


def test_integer_tensors_are_refused_not_cast(checkpoint):
    directory, _ = checkpoint
    tensors = load_file(directory / "model.safetensors")
    name = "model.embed_tokens.weight"
    tensors[name] = (tensors[name] * 100).to(torch.int64)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(PresetFileError, match=f"model.safetensors: tensor '{name}' holds int64 data"):
        CausalLM.from_preset(str(directory))


@pytest.mark.parametrize(
    "change, expected",
    [
        (lambda c: ["model_type"], "must hold a JSON object"),  # gave AttributeError
        (lambda c: {**c, "num_attention_heads": 0}, "config.json: does not describe a model lmq can build"),
        (lambda c: {k: v for k, v in c.items() if k != "hidden_size"}, "lacks the setting 'hidden_size'"),
    ],
)
def test_a_broken_checkpoint_config_is_a_named_error_not_a_raw_one(checkpoint, change, expected):
    directory, _ = checkpoint
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps(change(config)))
    with pytest.raises(ValueError, match=expected) as raised:
        CausalLM.from_preset(str(directory))
    assert str(directory) in str(raised.value) or "config.json" in str(raised.value)


def test_an_undecodable_safetensors_header_is_named_without_its_content(checkpoint):
    directory, _ = checkpoint
    header = json.dumps({"x": {"dtype": MARKER, "shape": [1], "data_offsets": [0, 4]}}).encode()
    (directory / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
    with pytest.raises(PresetFileError, match="model.safetensors: is not a readable safetensors file") as raised:
        CausalLM.from_preset(str(directory))
    assert MARKER not in str(raised.value)


# -- hf:// snapshots ---------------------------------------------------------------------


def hub_snapshot(tmp_path, monkeypatch, checkpoint_dir):
    """``checkpoint_dir`` as huggingface_hub caches it: blobs, and a snapshot of links into them."""
    import huggingface_hub.constants as constants

    repo = tmp_path / "hub" / "models--acme--tiny"
    snapshot = repo / "snapshots" / ("a" * 40)
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for file in sorted(checkpoint_dir.iterdir()):
        blob = repo / "blobs" / f"blob-{file.name}"
        shutil.copy(file, blob)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    for name, value in (("HF_HUB_CACHE", str(tmp_path / "hub")), ("HF_HUB_OFFLINE", True)):
        monkeypatch.setattr(constants, name, value)
    return snapshot


def test_an_hf_snapshot_reads_its_blobs_and_nothing_else(checkpoint, canaries, tmp_path, monkeypatch):
    directory, outside = checkpoint
    snapshot = hub_snapshot(tmp_path, monkeypatch, directory)
    assert isinstance(CausalLM.from_preset("hf://acme/tiny"), CausalLM)  # its links into blobs/ are inside
    canary = pathlib.Path(shutil.copy(directory / "tokenizer.model", outside / "tokenizer.model"))
    (snapshot / "tokenizer.model").unlink()
    (snapshot / "tokenizer.model").symlink_to(canary)
    refused(snapshot, canaries, canary, file="tokenizer.model", handle="hf://acme/tiny")


# -- the helper ----------------------------------------------------------------------------


def test_preset_files_refuse_every_name_that_leads_out(tmp_path):
    (tmp_path / "preset").mkdir()
    (tmp_path / "preset" / "ok.json").write_text("{}")
    (tmp_path / "preset" / "loop").symlink_to(tmp_path / "preset" / "loop")
    files = PresetFiles(tmp_path / "preset", "mine")
    assert files.read_json("ok.json") == {}
    for name in ("/etc/passwd", "../x", "a/../../x", "..", "loop", "", "a\x00b", "x" * 300, 7, ["ok.json"]):
        with pytest.raises(PresetFileError, match="Preset 'mine'"):
            files.read_bytes(name)
    with pytest.raises(FileNotFoundError, match="Preset 'mine', file nothing.json: not found"):
        files.read_json("nothing.json")


def test_lmq_presets_import_copies_no_file_from_outside(lmq_home, tmp_path, canaries, capsys):
    """The import copies the preset into the store; a followed link would copy the canary in."""
    from lmq.api.cli import main

    preset, outside = keras_hub_preset(tmp_path)
    canary = move_out(preset, outside, "assets/tokenizer/vocabulary.spm")
    canaries.watch(canary)
    with pytest.raises(SystemExit) as exit:
        main(["presets", "import", str(preset), "--name", "copied"])
    error = capsys.readouterr().err
    assert exit.value.code == 2 and "file assets/tokenizer/vocabulary.spm" in error and "outside" in error, error
    assert canaries.opened() == set() and not (lmq_home / "presets" / "copied").exists()
    (preset / "assets" / "tokenizer" / "vocabulary.spm").unlink()
    shutil.copy(canary, preset / "assets" / "tokenizer" / "vocabulary.spm")
    (preset / "assets" / "tokenizer" / "loop").symlink_to(preset / "assets")  # inside, but a linked directory
    with pytest.raises(SystemExit):
        main(["presets", "import", str(preset), "--name", "copied"])
    assert "assets/tokenizer/loop: is a linked directory" in capsys.readouterr().err
    (preset / "assets" / "tokenizer" / "loop").unlink()
    assert main(["presets", "import", str(preset), "--name", "copied"]) == 0
    assert isinstance(CausalLM.from_preset(str(lmq_home / "presets" / "copied")), CausalLM)


# -- through the service -------------------------------------------------------------------


def test_a_job_on_a_malicious_preset_fails_with_the_named_error(lmq_home, tmp_path):
    """The embedded `lmq serve` runs the job: it fails naming the file, quotes nothing, and no answer is a 5xx."""
    from api_support import ApiServer, generate_body, wait_for_job

    roots = tmp_path / "presets"
    roots.mkdir()
    linked, outside = keras_hub_preset(roots / "linked")
    move_out(linked, outside, "assets/tokenizer/vocabulary.spm")
    leaky, _ = keras_hub_preset(roots / "leaky", "falcon")
    (leaky / "assets" / "tokenizer" / "merges.txt").write_text(f"{MARKER}a {MARKER}b\n")
    server = ApiServer({"LMQ_HOME": str(lmq_home), "LMQ_PRESET_ROOTS": str(roots)}, tmp_path / "server.log")
    try:
        with server.client() as client:
            for preset, file in ((linked, "assets/tokenizer/vocabulary.spm"), (leaky, "assets/tokenizer/merges.txt")):
                submitted = client.post("/v1/jobs", json=generate_body(preset, ["x"], max_length=8))
                assert submitted.status_code == 202, submitted.text
                job = wait_for_job(client, submitted.json()["id"], 120, [server.log])
                assert job["status"] == "failed", job
                assert f"file {file}" in job["error"] and MARKER not in json.dumps(job), job["error"]
                assert client.get(f"/v1/jobs/{job['id']}").status_code == 200
    finally:
        server.stop()
