"""The plugin kit: checks that every architecture plugin, built-in or third-party, runs against itself.

A plugin's test suite subclasses ``CausalLMConformance`` and says how to build a tiny
model of its architecture (a task with a preprocessor)::

    from lmq.core.testing import CausalLMConformance

    class TestLlamaConformance(CausalLMConformance):
        def make_task(self):
            tokenizer = LlamaTokenizer(proto="vocabulary.spm")
            backbone = LlamaBackbone(tokenizer.vocabulary_size(), 2, 4, 32, 64, 2)
            return LlamaCausalLM(backbone, LlamaCausalLMPreprocessor(tokenizer, sequence_length=32))

pytest then runs each ``test_*`` check below. The kit imports no pytest: its checks
are plain asserts, so a failure says what the plugin got wrong.
"""

from lmq.core.testing.conformance import CausalLMConformance

__all__ = ["CausalLMConformance"]
