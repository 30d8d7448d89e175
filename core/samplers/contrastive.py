"""Contrastive search (Su et al. 2022): likely tokens that do not repeat what came before."""

import torch

from core.models.generation import DecodeResult, prefill_prompts
from core.samplers.base import Sampler


class ContrastiveSampler(Sampler):
    """Picks, among the ``k`` most likely tokens, the one with the best

        (1 - alpha) * p(token) - alpha * max cosine(h(token), h(previous token) for each previous token)

    where h is the backbone's final hidden state (after the last norm), as in
    KerasHub, and the previous tokens are the row's prompt and completion so far.
    Each step runs all ``k`` candidates one step (the cache holds ``k`` rows per
    prompt); the chosen one's logits, hidden state and cache row carry on.
    ``alpha=0`` is greedy search.
    """

    name = "contrastive"

    def __init__(self, k=5, alpha=0.6, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}.")
        if not 0 <= alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1], got {alpha!r}.")
        self.k = k
        self.alpha = alpha

    @torch.inference_mode()
    def search(self, backbone, prompts, limits, stop_token_ids=(), pad_token_id=0, generator=None):
        """Contrastive search for each prompt (lists of ids, any lengths), up to ``limits[i]`` new tokens."""
        device = backbone.device
        batch = len(prompts)
        max_steps = max(limits)
        if max_steps <= 0:
            return DecodeResult([[] for _ in prompts], ["length"] * batch)
        width = max(len(p) for p in prompts)
        cache_length = max(len(p) + limit for p, limit in zip(prompts, limits))
        lengths = torch.tensor([len(p) for p in prompts], device=device)
        limit = torch.tensor(limits, device=device)
        stop_ids = torch.tensor(list(stop_token_ids), dtype=torch.long, device=device)
        rows = torch.arange(batch, device=device)

        cache, hidden = prefill_prompts(backbone, prompts, cache_length, pad_token_id)  # [batch, width, hidden]
        logits = backbone.token_embedding.reverse(hidden[rows, lengths - 1])  # [batch, vocab]
        k = min(self.k, logits.shape[-1])
        # Unit hidden states of every token so far, by position; cosine is then a dot product.
        history = torch.zeros(batch, cache_length, hidden.shape[-1], device=device)  # [batch, slots, hidden]
        history[:, :width] = torch.nn.functional.normalize(hidden.float(), dim=-1)
        slots = torch.arange(cache_length, device=device)
        cache.select_rows(rows.repeat_interleave(k))  # k rows per prompt, one per candidate

        generated = torch.full((batch, max_steps), pad_token_id, dtype=torch.long, device=device)
        counts = torch.zeros(batch, dtype=torch.long, device=device)
        stopped = torch.zeros(batch, dtype=torch.bool, device=device)
        done = limit <= 0
        for step in range(max_steps):
            probabilities, candidates = self.compute_probabilities(logits).topk(k, dim=-1)  # [batch, k]
            positions = torch.clamp(lengths + step, max=cache_length - 1)  # [batch]
            key_length = min(width + step + 1, cache_length)
            candidate_hidden = backbone.decode(
                candidates.reshape(-1, 1), positions.repeat_interleave(k), cache, key_length
            )[:, 0]  # [batch * k, hidden]
            candidate_logits = backbone.token_embedding.reverse(candidate_hidden)  # [batch * k, vocab]
            unit = torch.nn.functional.normalize(candidate_hidden.float(), dim=-1).view(batch, k, -1)
            similarity = unit @ history.transpose(1, 2)  # [batch, k, slots]
            seen = slots < positions[:, None]  # [batch, slots]: the prompt and the tokens chosen so far
            degeneration = similarity.masked_fill(~seen[:, None, :], -1.0).max(dim=-1).values  # [batch, k]
            scores = (1 - self.alpha) * probabilities - self.alpha * degeneration  # [batch, k]
            best = scores.argmax(dim=-1)  # [batch]

            next_tokens = torch.where(done, pad_token_id, candidates[rows, best])
            generated[:, step] = next_tokens
            counts += ~done
            hit_stop = ~done & torch.isin(next_tokens, stop_ids)
            stopped |= hit_stop
            done = done | hit_stop | (counts >= limit)
            if bool(done.all()):
                break
            chosen = rows * k + best  # [batch]: the chosen candidate's cache row
            history[rows, positions] = unit[rows, best]
            logits = candidate_logits[chosen]
            cache.select_rows(chosen.repeat_interleave(k))

        counts_list, stopped_list, generated_list = counts.tolist(), stopped.tolist(), generated.tolist()
        return DecodeResult(
            completions=[generated_list[i][: counts_list[i]] for i in range(batch)],
            finish_reasons=["stop" if stopped_list[i] else "length" for i in range(batch)],
        )

    def get_config(self):
        return {**super().get_config(), "k": self.k, "alpha": self.alpha}
