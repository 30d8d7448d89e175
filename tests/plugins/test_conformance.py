"""Every built-in plugin passes the plugin kit (core.testing), on a tiny random model of its own."""

from lmq.core.testing import CausalLMConformance
from model_support import FIXTURES

ASSETS = "assets/tokenizer"


class TestLlamaConformance(CausalLMConformance):
    def make_task(self):
        from lmq.plugins.llama import LlamaBackbone, LlamaCausalLM, LlamaCausalLMPreprocessor, LlamaTokenizer

        tokenizer = LlamaTokenizer(proto=FIXTURES / "llama" / ASSETS / "vocabulary.spm")
        backbone = LlamaBackbone(tokenizer.vocabulary_size(), 2, 4, 32, 64, 2)
        return LlamaCausalLM(backbone, LlamaCausalLMPreprocessor(tokenizer, sequence_length=32))


class TestLlama3Conformance(CausalLMConformance):
    def make_task(self):
        from lmq.plugins.llama import Llama3Backbone, Llama3CausalLM, Llama3CausalLMPreprocessor, Llama3Tokenizer

        assets = FIXTURES / "llama3" / ASSETS
        tokenizer = Llama3Tokenizer(assets / "vocabulary.json", assets / "merges.txt")
        backbone = Llama3Backbone(tokenizer.vocabulary_size(), 2, 4, 32, 64, 2)
        return Llama3CausalLM(backbone, Llama3CausalLMPreprocessor(tokenizer, sequence_length=32))


class TestMistralConformance(CausalLMConformance):
    def make_task(self):
        from lmq.plugins.mistral import MistralBackbone, MistralCausalLM, MistralCausalLMPreprocessor, MistralTokenizer

        tokenizer = MistralTokenizer(proto=FIXTURES / "mistral" / ASSETS / "vocabulary.spm")
        backbone = MistralBackbone(tokenizer.vocabulary_size(), 2, 4, 32, 64, 2, sliding_window=4)
        return MistralCausalLM(backbone, MistralCausalLMPreprocessor(tokenizer, sequence_length=32))


class TestPhi3Conformance(CausalLMConformance):
    def make_task(self):
        from lmq.plugins.phi3 import Phi3Backbone, Phi3CausalLM, Phi3CausalLMPreprocessor, Phi3Tokenizer

        tokenizer = Phi3Tokenizer(proto=FIXTURES / "phi3" / ASSETS / "vocabulary.spm")
        backbone = Phi3Backbone(tokenizer.vocabulary_size(), 2, 32, 64, 4, 2)
        return Phi3CausalLM(backbone, Phi3CausalLMPreprocessor(tokenizer, sequence_length=32))


class TestFalconConformance(CausalLMConformance):
    def make_task(self):
        from lmq.plugins.falcon import FalconBackbone, FalconCausalLM, FalconCausalLMPreprocessor, FalconTokenizer

        assets = FIXTURES / "falcon" / ASSETS
        tokenizer = FalconTokenizer(assets / "vocabulary.json", assets / "merges.txt")
        backbone = FalconBackbone(tokenizer.vocabulary_size(), 2, 4, 32, 128)
        return FalconCausalLM(backbone, FalconCausalLMPreprocessor(tokenizer, sequence_length=32))


class TestFalconRotaryConformance(CausalLMConformance):
    """The Falcon-40B layout: grouped key/value heads, attention in parallel with the MLP."""

    def make_task(self):
        from lmq.plugins.falcon import FalconCausalLM, FalconCausalLMPreprocessor, FalconRotaryBackbone, FalconTokenizer

        assets = FIXTURES / "falcon" / ASSETS
        tokenizer = FalconTokenizer(assets / "vocabulary.json", assets / "merges.txt")
        backbone = FalconRotaryBackbone(tokenizer.vocabulary_size(), 2, 4, 2, 32, 128, num_layer_norms=2)
        return FalconCausalLM(backbone, FalconCausalLMPreprocessor(tokenizer, sequence_length=32))
