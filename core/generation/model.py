"""The model side of the decode engine: the few calls it makes on a network.

The engine never touches a backbone itself. It asks a model for a cache (of row
slots, see ``lmq.core.layers.cache``), has it prefill prompts into slots, runs one token
per row, and turns hidden states into logits; the cache moves rows between slots
with ``move_rows`` and ``select_rows``, and a larger one takes a smaller one's rows
with ``take``. Any network that provides these calls decodes through the same loop;
one that also prefills from a ``start`` position (``chunked_prefill``) gets long
prompts prefilled in chunks between decode steps.
"""

import torch


def length_groups(prompts, max_padding=0.25):
    """Prompt indices in groups of similar length: each group pads at most ``max_padding`` more tokens."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    groups, group, tokens = [], [], 0
    for i in order:
        length = len(prompts[i])  # the longest so far: the group pads to it
        if group and length * (len(group) + 1) > (1 + max_padding) * (tokens + length):
            groups.append(group)
            group, tokens = [], 0
        group.append(i)
        tokens += length
    return groups + [group]


class DecoderOnlyModel:
    """A ``DecoderOnlyBackbone`` (Llama, Mistral, Phi-3, Falcon) as the engine drives it."""

    chunked_prefill = True  # ``prefill`` may continue prompts from a position

    def __init__(self, backbone, pad_token_id=0):
        self.backbone = backbone
        self.pad_token_id = pad_token_id
        self.device = backbone.device

    def new_cache(self, rows, max_length, prompt_width):
        """A KV cache of ``rows`` slots of ``max_length`` positions (rolling under a short window)."""
        return self.backbone.new_cache(rows, max_length, prompt_width=prompt_width)

    def prefill(self, cache, prompts, rows, requests, start=0):
        """Writes ``prompts`` (lists of ids) into cache slots ``rows`` from position ``start``;
        returns their hidden states [prompts, width, hidden] (past the end of a prompt they
        mean nothing).

        Prompts are right-padded and run in groups of similar length, so a ragged batch
        computes little padding. ``requests`` (the prompts' request ids) is for models
        that hold more per request, such as an encoder's input; a decoder needs only the prompt.
        """
        width = max(len(p) for p in prompts)
        hidden = None
        for group in length_groups(prompts):
            group_width = max(len(prompts[i]) for i in group)
            padded = [list(prompts[i]) + [self.pad_token_id] * (group_width - len(prompts[i])) for i in group]
            token_ids = torch.tensor(padded, dtype=torch.long, device=self.device)
            group_hidden = self.backbone.prefill(token_ids, cache, rows[group], start)
            if hidden is None:
                hidden = group_hidden.new_zeros(len(prompts), width, group_hidden.shape[-1])
            hidden[group, :group_width] = group_hidden
        return hidden

    def step(self, cache, tokens, positions, key_length):
        """One token per row [rows] at ``positions`` [rows] -> hidden states [rows, hidden].

        ``key_length`` (a Python int above every position) bounds the cache slots read.
        """
        return self.backbone.decode(tokens[:, None], positions, cache, key_length)[:, 0]

    def logits(self, hidden):
        """Hidden states [..., hidden] -> next-token logits [..., vocab]."""
        return self.backbone.token_embedding.reverse(hidden)
