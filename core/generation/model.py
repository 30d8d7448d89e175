"""The model side of the decode engine: the few calls it makes on a network.

The engine never touches a backbone itself. It asks a model for a cache (of row
slots, see ``lmq.core.layers.cache``), runs each step's flattened tokens through it
(``forward``: decoding rows and prompt chunks in one pass), and turns hidden states
into logits; the cache moves rows between slots with ``move_rows`` and
``select_rows``, and a larger one takes a smaller one's rows with ``take``.

A model without ``forward`` (an encoder-decoder, whose prefill also encodes) gives
``prefill`` (padded prompts into cache rows, with the request ids it keeps more
for) and ``step`` (one token per row) instead, and the runner makes those two calls.
"""


class DecoderOnlyModel:
    """A ``DecoderOnlyBackbone`` (Llama, Mistral, Phi-3, Falcon) as the engine drives it, with the
    adapters loaded over it (an ``AdapterBank``, see ``lmq.core.adapters``) that requests may name."""

    chunked_prefill = True  # a prompt may go in over several steps

    def __init__(self, backbone, adapters=None):
        self.backbone = backbone
        self.device = backbone.device
        self.adapters = adapters

    def adapter_slot(self, name):
        """The slot of the adapter ``name``: what a step's ``adapter_slots`` give its tokens."""
        if self.adapters is None:
            raise ValueError(f"adapter {name!r}: this model serves no adapters")
        return self.adapters.slot(name)

    def new_cache(self, rows, max_length, prompt_width):
        """A KV cache of ``rows`` slots of ``max_length`` positions (rolling under a short window)."""
        return self.backbone.new_cache(rows, max_length, prompt_width=prompt_width)

    def forward(self, cache, step):
        """A ``StepInput``'s tokens -> hidden states [tokens, hidden]; their keys go into ``cache``.
        A token with an adapter gets its adapter's low-rank updates in every projection it adapts."""
        if step.adapter_slots is None:
            return self.backbone.forward_step(step, cache)
        with self.adapters.serving(step.adapter_slots):
            return self.backbone.forward_step(step, cache)

    def logits(self, hidden):
        """Hidden states [..., hidden] -> next-token logits [..., vocab]."""
        return self.backbone.token_embedding.reverse(hidden)
