"""A request to the decode engine, as plain data: what to complete and within which limits."""

from dataclasses import dataclass

from lmq.core.generation.stop_strings import StopStrings


@dataclass
class Request:
    """One prompt to complete. ``id`` keys its result and, for a per-request sampler
    (``PerRequestSampler``), its sampling parameters; nothing here changes while it runs."""

    id: int
    prompt: list  # token ids
    limit: int  # the most new tokens
    seed: int | None = None  # its own random stream (its samples then ignore its neighbours)
    stop_token_ids: tuple = ()
    stop_strings: StopStrings | None = None  # its own ``StopStrings``, or None: no text is decoded while it runs
    priority: int = 0  # lower is admitted first; equal priorities admit the shortest prompt first
    adapter: str | None = None  # the name of the adapter (over the model's base) its tokens apply, or None

    @property
    def need(self):
        """The cache positions it takes at most: prompt and completion."""
        return len(self.prompt) + self.limit
