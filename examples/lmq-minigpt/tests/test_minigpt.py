"""MiniGPT passes lmq's plugin kit, and its byte tokenizer round-trips any text."""

from lmq.testing import CausalLMConformance
from lmq_minigpt import MiniGPTBackbone, MiniGPTCausalLM, MiniGPTCausalLMPreprocessor, MiniGPTTokenizer


def tiny_minigpt():
    tokenizer = MiniGPTTokenizer()
    backbone = MiniGPTBackbone(tokenizer.vocabulary_size(), num_layers=2, num_heads=4, hidden_dim=32, intermediate_dim=64)
    return MiniGPTCausalLM(backbone, MiniGPTCausalLMPreprocessor(tokenizer, sequence_length=64))


class TestMiniGPTConformance(CausalLMConformance):
    def make_task(self):
        return tiny_minigpt()


def test_bytes_round_trip_and_special_tokens_are_whole():
    tokenizer = MiniGPTTokenizer()
    text = "naïve café ✓ <s>"
    assert tokenizer.detokenize(tokenizer.tokenize(text)) == text
    assert len(tokenizer.tokenize("é")) == 2  # one token per UTF-8 byte
    assert (tokenizer.start_token_id, tokenizer.end_token_id, tokenizer.pad_token_id) == (1, 2, 0)
