"""Stop strings: multi-token stop sequences, matched on the decoded completion text."""


class StopStrings:
    """One request's stop strings and the tokenizer that decodes them."""

    def __init__(self, tokenizer, stops):
        self.tokenizer = tokenizer
        self.stops = [s for s in stops if s]
        self.special = set(tokenizer.special_token_ids)
        # A stop string that the newest token completes lies within this many last
        # tokens (a token is at least a byte, a character at most 4 bytes).
        self.tail = 4 * max((len(s) for s in self.stops), default=0) + 8

    def text(self, token_ids):
        return self.tokenizer.detokenize([t for t in token_ids if t not in self.special])

    def found(self, token_ids):
        """Whether the completion so far holds a stop string; called after every new
        token, so only the tail needs decoding."""
        text = self.text(token_ids[-self.tail :])
        return any(stop in text for stop in self.stops)

    def end(self, token_ids):
        """The number of tokens up to the first one that completes a stop string, or None."""
        return next((n for n in range(1, len(token_ids) + 1) if self.found(token_ids[:n])), None)

    def cut(self, text):
        """The text before the first stop string."""
        cuts = [text.find(stop) for stop in self.stops if stop in text]
        return text[: min(cuts)] if cuts else text
