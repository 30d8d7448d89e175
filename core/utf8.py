"""JSON text is UTF-8 (RFC 8259 §8.1): the one check of request bodies, uploaded Batch files and
the CLI's input files.

Python's ``json.loads`` of bytes guesses UTF-16 or UTF-32 from where NUL bytes fall, so a UTF-16
body, or a line of a UTF-16 file, would parse and run. Here bytes must be UTF-8 and hold no NUL
byte (JSON never has a raw one; UTF-16 and UTF-32 text of ASCII is full of them), so what passes
can only be read as UTF-8. Standard library only.
"""

from __future__ import annotations

import codecs

RULE = "JSON and JSONL must be UTF-8 (RFC 8259 §8.1); UTF-16 and other encodings are refused"


class NotUtf8(ValueError):
    """Bytes that are not UTF-8 text; ``offset`` is the first bad byte's."""

    def __init__(self, what: str, offset: int, problem: str):
        super().__init__(f"{what} is not UTF-8: {problem} at byte {offset}; {RULE}")
        self.offset = offset


class Utf8Check:
    """Checks bytes that arrive in pieces (a streamed body or upload), holding at most 3 bytes back."""

    def __init__(self, what: str):
        self.what = what
        self.seen = 0  # bytes fed so far
        self._decoder = codecs.getincrementaldecoder("utf-8")()

    def feed(self, data: bytes, final: bool = False) -> None:
        """NotUtf8 at the first byte that cannot be UTF-8 text, or at a NUL byte."""
        pending = len(self._decoder.getstate()[0])
        nul = data.find(b"\x00")
        try:
            self._decoder.decode(data if nul < 0 else data[:nul], final=final and nul < 0)
        except UnicodeDecodeError as error:
            raise NotUtf8(self.what, self.seen - pending + error.start, f"byte 0x{error.object[error.start]:02x}") from None
        if nul >= 0:
            raise NotUtf8(self.what, self.seen + nul, "a NUL byte (as in UTF-16 or UTF-32 text)")
        self.seen += len(data)


def utf8_text(data: bytes, what: str) -> str:
    """`data` as text, or NotUtf8 naming `what` and the first bad byte."""
    Utf8Check(what).feed(data, final=True)
    return data.decode("utf-8")
