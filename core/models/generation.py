"""The token generation loop shared by every causal LM.

Prompts are right-padded and prefilled in groups of similar length; after
that each row decodes at its own position, writing one slot of a preallocated
KV cache per step. Rows stop on their own stop token, stop string or token
limit; the loop ends when every row has stopped.
"""

from dataclasses import dataclass

import torch


@dataclass
class Generation:
    """One prompt's result, with what the service reports about it."""

    text: str | None  # None when the task has no preprocessor
    token_ids: list  # the completion's ids (stop token included, when there is one)
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" or "length"


class StopStrings:
    """Multi-token stop sequences, matched on the decoded completion text."""

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

    def cut(self, text):
        """The text before the first stop string."""
        cuts = [text.find(stop) for stop in self.stops if stop in text]
        return text[: min(cuts)] if cuts else text


@dataclass
class DecodeResult:
    completions: list  # list of lists of ids
    finish_reasons: list


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


def prefill_prompts(backbone, prompts, cache_length, pad_token_id):
    """A new cache holding the prompts, and their hidden states [batch, width, hidden].

    Prompts are prefilled in groups of similar length, so a ragged batch computes
    little padding; hidden states past the end of a prompt mean nothing.
    """
    device = backbone.device
    width = max(len(p) for p in prompts)
    cache = backbone.new_cache(len(prompts), cache_length, prompt_width=width)
    hidden = None
    for group in length_groups(prompts):
        group_width = max(len(prompts[i]) for i in group)
        padded = [list(prompts[i]) + [pad_token_id] * (group_width - len(prompts[i])) for i in group]
        rows = torch.tensor(group, device=device)
        group_hidden = backbone.prefill(torch.tensor(padded, dtype=torch.long, device=device), cache, rows)
        if hidden is None:
            hidden = group_hidden.new_zeros(len(prompts), width, group_hidden.shape[-1])
        hidden[rows, :group_width] = group_hidden
    return cache, hidden


@torch.inference_mode()
def decode(
    backbone,
    prompts,
    limits,
    sampler,
    stop_token_ids=(),
    pad_token_id=0,
    generator=None,
    stop_strings=None,
    stream=None,
):
    """Generates up to ``limits[i]`` tokens after ``prompts[i]`` (lists of ids)."""
    if hasattr(sampler, "search"):  # beam, contrastive: they run their own loop
        result = sampler.search(backbone, prompts, limits, stop_token_ids, pad_token_id, generator)
        return _after_search(result, stop_strings, stream)
    device = backbone.device
    batch = len(prompts)
    width = max(len(p) for p in prompts)
    cache_length = max(len(p) + limit for p, limit in zip(prompts, limits))
    max_steps = max(limits)
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    limit = torch.tensor(limits, device=device)
    stop_ids = torch.tensor(list(stop_token_ids), dtype=torch.long, device=device)

    generated = torch.full((batch, max(max_steps, 1)), pad_token_id, dtype=torch.long, device=device)
    counts = torch.zeros(batch, dtype=torch.long, device=device)
    stopped = torch.zeros(batch, dtype=torch.bool, device=device)
    # ``live`` maps the rows still in the batch (and the cache) to prompt indices;
    # ``done`` marks live rows that finished but have not been dropped yet.
    live = torch.arange(batch, device=device)[limit > 0]
    if max_steps > 0 and len(live):
        cache, hidden = prefill_prompts(backbone, prompts, cache_length, pad_token_id)
        logits = backbone.token_embedding.reverse(hidden[live, lengths[live] - 1])  # [live, vocab]
        if len(live) < batch:
            cache.select_rows(live)
        done = torch.zeros(len(live), dtype=torch.bool, device=device)
    for step in range(max_steps if len(live) else 0):
        next_tokens = sampler.next_token(logits, generator)  # [live]
        fresh = ~done
        generated[live[fresh], step] = next_tokens[fresh]
        counts[live] += fresh
        hit_stop = fresh & torch.isin(next_tokens, stop_ids)
        stopped[live] |= hit_stop
        done = done | hit_stop | (counts[live] >= limit[live])
        if stream is not None or stop_strings is not None:
            done = _per_row_checks(
                step, live, next_tokens, done, stopped, generated, counts, stream, stop_strings
            )
        finished = int(done.sum())
        if finished == len(live):
            break
        if finished * 4 >= len(live):  # drop finished rows once they are a quarter of the batch
            keep = (~done).nonzero()[:, 0]
            cache.select_rows(keep)
            live, next_tokens, done = live[keep], next_tokens[keep], done[keep]
        positions = torch.clamp(lengths[live] + step, max=cache_length - 1)
        key_length = min(width + step + 1, cache_length)
        hidden = backbone.decode(next_tokens[:, None], positions, cache, key_length)
        logits = backbone.token_embedding.reverse(hidden[:, 0])

    counts_list, stopped_list = counts.tolist(), stopped.tolist()
    generated_list = generated.tolist()
    return DecodeResult(
        completions=[generated_list[i][: counts_list[i]] for i in range(batch)],
        finish_reasons=["stop" if stopped_list[i] else "length" for i in range(batch)],
    )


def _per_row_checks(step, live, next_tokens, done, stopped, generated, counts, stream, stop_strings):
    """Python work per row, paid only when a caller asked for streaming or stop strings."""
    rows, tokens = live.tolist(), next_tokens.tolist()
    count_list, done_list = counts.tolist(), done.tolist()
    for index, (row, token) in enumerate(zip(rows, tokens)):
        if count_list[row] != step + 1:
            continue  # the row had stopped before this step
        if stream is not None:
            stream(row, token)
        if stop_strings is not None and not bool(stopped[row]):
            if stop_strings.found(generated[row, : count_list[row]].tolist()):
                done_list[index] = True
                stopped[row] = True
    return torch.tensor(done_list, device=done.device)


def _after_search(result, stop_strings, stream):
    """Stop strings and streaming for samplers that choose whole sequences at the end.

    The completion is cut at the first token that completes a stop string, and
    ``stream`` receives the chosen tokens once the search is over.
    """
    for row, completion in enumerate(result.completions):
        if stop_strings is not None:
            end = next((n for n in range(1, len(completion) + 1) if stop_strings.found(completion[:n])), None)
            if end is not None:
                result.completions[row] = completion = completion[:end]
                result.finish_reasons[row] = "stop"
        if stream is not None:
            for token in completion:
                stream(row, token)
    return result
