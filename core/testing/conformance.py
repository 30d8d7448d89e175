"""``CausalLMConformance``: the checks a causal LM plugin passes (see ``lmq.core.testing``)."""

import json
import pathlib
import shutil
import tempfile

import h5py
import keras
import numpy as np
import torch

from lmq.core.models import CausalLM
from lmq.core.names import SAMPLER_NAMES, TaskKind
from lmq.core.plugins import get_registry, import_path
from lmq.core.presets import PresetNotFound, PresetResolver
from lmq.core.presets.weights import WEIGHTS_FILE

PRESET_FILES = ("config.json", "task.json", "preprocessor.json", "tokenizer.json", "metadata.json", WEIGHTS_FILE)


class CausalLMConformance:
    """Subclass it as ``Test<Architecture>Conformance`` and define ``make_task()``: a new tiny
    task of the architecture (random weights, a preprocessor), each time it is called.

    ``prompts`` and ``new_tokens`` may be overridden; the prompts must tokenize to a few
    tokens each and decode back to themselves.
    """

    prompts = ("Return the number of items", "Open the file")
    new_tokens = 6

    @classmethod
    def setup_class(cls):
        """One tiny task (seeded weights) and its saved preset, for the checks that only read them."""
        keras.utils.set_random_seed(0)
        cls.task = cls().make_task()
        cls.workspace = pathlib.Path(tempfile.mkdtemp(prefix="lmq-conformance-"))
        cls.preset = cls.workspace / "preset"
        cls.task.save_to_preset(cls.preset)

    @classmethod
    def teardown_class(cls):
        shutil.rmtree(cls.workspace, ignore_errors=True)

    # -- helpers ------------------------------------------------------------------------

    def prompt_ids(self):
        return self.task.preprocessor.generate_preprocess(list(self.prompts))

    def padded(self, rows, width):
        """Right-padded ``rows`` [batch, width] and their padding mask."""
        ids = np.zeros((len(rows), width), dtype="int64")
        mask = np.zeros((len(rows), width), dtype=bool)
        for i, row in enumerate(rows):
            ids[i, : len(row)], mask[i, : len(row)] = row, True
        return ids, mask

    def broken_copy(self, name):
        """A copy of the saved preset, to break."""
        return pathlib.Path(shutil.copytree(self.preset, self.workspace / name, dirs_exist_ok=True))

    def refused(self, preset, error, *words):
        """Loading ``preset`` raises ``error`` whose message holds every one of ``words``."""
        try:
            CausalLM.from_preset(str(preset))
        except error as raised:
            message = str(raised)
            assert all(word in message for word in words), f"{type(raised).__name__}: {message!r} lacks {words}"
            return
        raise AssertionError(f"{preset} loaded; expected {error.__name__} naming {words}")

    # -- the architecture and its records --------------------------------------------------

    def test_the_architecture_is_registered_with_these_classes(self):
        task, backbone = self.task, self.task.backbone
        architecture = get_registry().architecture_of_class(type(backbone).__name__)
        assert architecture is not None, f"no registered plugin provides {type(backbone).__name__}"
        layouts = [architecture.backbone, *architecture.extra_classes]  # a second backbone layout is an extra class
        assert type(backbone) in [import_path(path) for path in layouts], (
            f"{architecture.name}'s backbone is not {type(backbone).__name__}"
        )
        parts = {
            "tokenizer": task.preprocessor.tokenizer,
            "preprocessor": task.preprocessor,
            "task": task,
        }
        for role, part in parts.items():
            assert architecture.load(role) is type(part), f"{architecture.name}'s {role} is not {type(part).__name__}"
        assert architecture.task_kind == task.task_kind == TaskKind.causal_lm

    def test_builtin_preset_names_are_well_formed_handles(self):
        architecture = get_registry().architecture_of_class(type(self.task.backbone).__name__)
        for name, info in architecture.presets.items():
            assert PresetResolver().locate(name) == name
            PresetResolver().locate(info.handle)  # raises PresetNotFound on a malformed handle
        assert architecture.presets.keys() <= type(self.task).presets.keys()

    # -- presets ----------------------------------------------------------------------------

    def test_a_saved_preset_has_keras_hub_files_and_weight_layout(self):
        for name in PRESET_FILES:
            assert (self.preset / name).is_file(), f"the preset has no {name}"
        config = json.loads((self.preset / "config.json").read_text())
        backbone = self.task.backbone
        assert config["class_name"] == type(backbone).__name__
        assert config["registered_name"] == f"keras_hub>{type(backbone).__name__}"
        assert set(backbone.keras_hub_config) <= config["config"].keys()
        with h5py.File(self.preset / WEIGHTS_FILE) as weights:
            found = {}
            weights.visititems(lambda path, item: found.update({path: item.shape}) if hasattr(item, "shape") else None)
        expected = {path: tuple(variable.shape) for path, variable in backbone.keras_hub_weights().items()}
        assert found == expected
        assert len(expected) == len({id(v) for v in backbone.keras_hub_weights().values()}), "a variable saved twice"

    def test_logits_are_bit_identical_after_save_and_load(self):
        loaded = CausalLM.from_preset(str(self.preset))
        assert type(loaded) is type(self.task)
        assert loaded.backbone.get_config() == self.task.backbone.get_config()
        assert loaded.preprocessor.get_config() == self.task.preprocessor.get_config()
        ids, mask = self.padded(self.prompt_ids(), max(map(len, self.prompt_ids())))
        assert torch.equal(loaded.score(ids, mask), self.task.score(ids, mask))

    def test_bad_presets_get_errors_naming_the_file(self):
        self.refused(self.workspace / "no-such-preset", PresetNotFound, "no-such-preset")

        missing = self.broken_copy("missing-weights")
        (missing / WEIGHTS_FILE).unlink()
        self.refused(missing, FileNotFoundError, WEIGHTS_FILE)

        not_json = self.broken_copy("not-json")
        (not_json / "config.json").write_text("{ not json")
        self.refused(not_json, ValueError, "config.json", "not valid JSON")

        def edit_config(name, change):
            broken = self.broken_copy(name)
            config = json.loads((broken / "config.json").read_text())
            change(config)
            (broken / "config.json").write_text(json.dumps(config))
            return broken

        unknown = edit_config("unknown-class", lambda c: c.update(class_name="NoSuchBackbone", registered_name=None))
        self.refused(unknown, ValueError, "config.json", "NoSuchBackbone")
        extra = edit_config("extra-key", lambda c: c["config"].update(no_such_argument=1))
        self.refused(extra, ValueError, "config.json", "no_such_argument")

        reshaped = self.broken_copy("wrong-shape")
        with h5py.File(reshaped / WEIGHTS_FILE, "r+") as weights:
            path = next(iter(self.task.backbone.keras_hub_weights()))
            shape = weights[path].shape
            del weights[path]
            weights.create_dataset(path, data=np.zeros((shape[0] + 1, *shape[1:]), "float32"))
        self.refused(reshaped, ValueError, WEIGHTS_FILE, path)

    # -- generation ---------------------------------------------------------------------------

    def test_cached_decoding_gives_the_logits_of_a_forward_pass(self):
        """``prefill`` then ``decode`` one token per row, each row at its own position (the entry
        points generation uses, with its cache), against ``score`` over the whole sequences."""
        lm, rows = self.task, self.prompt_ids()
        backbone, vocabulary = lm.backbone, lm.preprocessor.tokenizer.vocabulary_size()
        lengths, width = [len(row) for row in rows], max(map(len, rows))
        steps = range(self.new_tokens)
        followers = [[(31 * i + 17 * step + 5) % vocabulary for step in steps] for i in range(len(rows))]
        full = [list(row) + follow for row, follow in zip(rows, followers)]
        ids, mask = self.padded(full, width + self.new_tokens)
        expected = lm.score(ids, mask)  # [batch, length, vocab]
        with torch.inference_mode():
            cache = backbone.new_cache(len(rows), width + self.new_tokens, prompt_width=width)
            prompts = torch.as_tensor(self.padded(rows, width)[0], device=backbone.device)
            hidden = backbone.prefill(prompts, cache)
            last = torch.tensor(lengths) - 1
            logits = backbone.token_embedding.reverse(hidden)[torch.arange(len(rows)), last]
            assert torch.allclose(logits, expected[torch.arange(len(rows)), last], atol=1e-4), "prefill"
            for step in range(self.new_tokens):
                positions = torch.tensor(lengths, device=backbone.device) + step
                tokens = torch.tensor([follow[step] for follow in followers], device=backbone.device)
                hidden = backbone.decode(tokens[:, None], positions, cache, int(positions.max()) + 1)
                logits = backbone.token_embedding.reverse(hidden)[:, 0]
                reference = expected[torch.arange(len(rows)), positions.cpu()]
                difference = float((logits - reference).abs().max())
                assert difference <= 1e-4, f"decode step {step}: logits differ by {difference}"

    def test_greedy_generation_follows_the_forward_pass(self):
        """The cached decode path (prefill, then one token per step) agrees with full forward passes."""
        lm, rows = self.task, self.prompt_ids()
        lm.compile(sampler="greedy")
        width = max(map(len, rows)) + self.new_tokens
        inputs = dict(zip(("token_ids", "padding_mask"), self.padded(rows, width)))
        generated = lm.generate(inputs, stop_token_ids=None)
        for i, row in enumerate(rows):
            expected = list(row)
            for _ in range(self.new_tokens):
                logits = lm.score(np.array([expected]))[0, -1]
                expected.append(int(torch.argmax(logits)))
            assert generated["token_ids"][i, : len(expected)].tolist() == expected, f"prompt {i}"

    def test_every_sampler_generates_text_and_token_ids(self):
        lm, rows = self.task, self.prompt_ids()
        width = max(map(len, rows)) + self.new_tokens
        vocabulary = lm.preprocessor.tokenizer.vocabulary_size()
        for sampler in SAMPLER_NAMES:
            lm.compile(sampler=sampler)
            texts = lm.generate(list(self.prompts), max_length=width, seed=7)
            assert len(texts) == len(self.prompts), sampler
            for text, prompt in zip(texts, self.prompts):
                assert isinstance(text, str) and text.startswith(prompt), f"{sampler}: {text!r}"
            inputs = dict(zip(("token_ids", "padding_mask"), self.padded(rows, width)))
            first, again = (lm.generate(inputs, stop_token_ids=None, seed=7) for _ in range(2))
            assert np.array_equal(first["token_ids"], again["token_ids"]), f"{sampler} is not reproducible by seed"
            assert first["padding_mask"].all(), f"{sampler} stopped early without a stop token"
            for i, row in enumerate(rows):
                assert first["token_ids"][i, : len(row)].tolist() == list(row), f"{sampler} changed prompt {i}"
            assert ((first["token_ids"] >= 0) & (first["token_ids"] < vocabulary)).all(), sampler

    # -- training -----------------------------------------------------------------------------

    def test_fit_lowers_the_loss(self):
        keras.utils.set_random_seed(1)
        lm = self.make_task()
        lm.compile(optimizer=keras.optimizers.Adam(1e-2))
        losses = lm.fit(x=list(self.prompts) * 4, batch_size=4, epochs=6, verbose=0).history["loss"]
        assert losses[-1] < losses[0] * 0.9, f"fit did not learn: losses {losses}"
