"""MiniGPTTokenizer: UTF-8 bytes as tokens, after three special tokens. No vocabulary to train."""

import json
import pathlib

from lmq.plugins import Tokenizer, preset_files

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")  # ids 0, 1, 2; byte b is id b + 3


class MiniGPTTokenizer(Tokenizer):
    start_token = "<s>"
    end_token = "</s>"
    pad_token = "<pad>"

    def __init__(self, sequence_length=None, **kwargs):
        super().__init__(**kwargs)
        self.sequence_length = sequence_length

    def vocabulary_size(self):
        return len(SPECIAL_TOKENS) + 256

    def token_to_id(self, token):
        if token in SPECIAL_TOKENS:
            return SPECIAL_TOKENS.index(token)
        encoded = token.encode("utf-8")
        return encoded[0] + len(SPECIAL_TOKENS) if len(encoded) == 1 else None

    def id_to_token(self, token_id):
        token_id = int(token_id)
        if token_id < len(SPECIAL_TOKENS):
            return SPECIAL_TOKENS[token_id]
        return bytes([token_id - len(SPECIAL_TOKENS)]).decode("utf-8", errors="replace")

    def _encode(self, texts):
        return [[byte + len(SPECIAL_TOKENS) for byte in text.encode("utf-8")] for text in texts]

    def _decode(self, ids):
        data = bytes(i - len(SPECIAL_TOKENS) for i in ids if i >= len(SPECIAL_TOKENS))
        return data.decode("utf-8", errors="replace")

    def get_config(self):
        return {**self.base_config(), "sequence_length": self.sequence_length}

    # The assets say which ids the special tokens have, so that a preset is explicit about them.

    def save_assets(self, directory):
        (pathlib.Path(directory) / "special_tokens.json").write_text(json.dumps(list(SPECIAL_TOKENS)))

    def load_assets(self, directory):
        # preset_files reads only inside the preset (no symlink out) and names the file in its errors.
        files = preset_files(directory)
        if files.read_json("special_tokens.json", kind=list) != list(SPECIAL_TOKENS):
            raise files.error("special_tokens.json", f"expected the special tokens {list(SPECIAL_TOKENS)}.")
