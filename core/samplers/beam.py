"""Beam search: the most likely whole sequence, not the most likely next token."""

from dataclasses import dataclass

import torch

from core.models.generation import DecodeResult, prefill_prompts
from core.samplers.base import Sampler


@dataclass
class BeamSearchResult(DecodeResult):
    """``completions``/``finish_reasons`` hold each row's best beam, so ``generate`` needs
    nothing special. With ``return_all_beams``, ``beams[i]`` lists row i's beams best first
    as ``(token_ids, log_probability, finish_reason)`` (KerasHub returns all beams with
    their scores too); otherwise ``beams`` is None.
    """

    beams: list | None = None


class BeamSampler(Sampler):
    """Keeps the ``num_beams`` sequences with the highest summed log-probability.

    Each prompt is prefilled once and its cache repeated into ``num_beams`` rows.
    Each step keeps the best ``num_beams`` of (beams x vocab) continuations per
    prompt and reorders the cache rows to match. A beam that emits a stop token or
    reaches its row's limit is finished: it keeps its score and still competes, so
    a short likely sequence can beat a long one. Scores use the
    temperature-scaled distribution.
    """

    name = "beam"

    def __init__(self, num_beams=5, return_all_beams=False, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(num_beams, int) or num_beams < 1:
            raise ValueError(f"num_beams must be a positive integer, got {num_beams!r}.")
        self.num_beams = num_beams
        self.return_all_beams = return_all_beams

    @torch.inference_mode()
    def search(self, backbone, prompts, limits, stop_token_ids=(), pad_token_id=0, generator=None):
        """Beam search for every prompt (lists of ids, of any lengths), up to ``limits[i]`` new tokens."""
        device = backbone.device
        batch, beams = len(prompts), self.num_beams
        max_steps = max(limits)
        if max_steps <= 0:
            return self._result([[[]] for _ in prompts], [[0.0]] * batch, [["length"]] * batch)
        rows = batch * beams
        width = max(len(p) for p in prompts)
        cache_length = max(len(p) + limit for p, limit in zip(prompts, limits))
        prompt_lengths = torch.tensor([len(p) for p in prompts], device=device)
        stop_ids = torch.tensor(list(stop_token_ids), dtype=torch.long, device=device)
        prompt_of_row = torch.arange(batch, device=device).repeat_interleave(beams)  # [rows]
        lengths = prompt_lengths[prompt_of_row]
        limit = torch.tensor(limits, device=device)[prompt_of_row]

        cache, hidden = prefill_prompts(backbone, prompts, cache_length, pad_token_id)  # [batch, width, hidden]
        last = hidden[torch.arange(batch, device=device), prompt_lengths - 1]  # [batch, hidden]
        logits = backbone.token_embedding.reverse(last)[prompt_of_row]  # [rows, vocab]
        cache.select_rows(prompt_of_row)
        vocab = logits.shape[-1]

        # At first every beam of a prompt is the same sequence: only beam 0 may expand.
        scores = torch.full((batch, beams), float("-inf"), device=device)
        scores[:, 0] = 0.0
        scores = scores.flatten()  # [rows]
        generated = torch.full((rows, max_steps), pad_token_id, dtype=torch.long, device=device)
        counts = torch.zeros(rows, dtype=torch.long, device=device)
        stopped = torch.zeros(rows, dtype=torch.bool, device=device)
        finished = limit <= 0
        # A finished beam has one continuation: itself (a pad that costs nothing).
        frozen = torch.full((1, vocab), float("-inf"), device=device)
        frozen[0, pad_token_id] = 0.0
        first_row = (torch.arange(batch, device=device) * beams)[:, None]  # [batch, 1]

        for step in range(max_steps):
            log_probs = torch.log_softmax(logits.float() / self.temperature, dim=-1)  # [rows, vocab]
            log_probs = torch.where(finished[:, None], frozen, log_probs)
            candidates = (scores[:, None] + log_probs).view(batch, beams * vocab)
            top_scores, index = candidates.topk(beams, dim=-1)  # [batch, beams]
            source = (first_row + index // vocab).flatten()  # [rows]: the beam each new beam extends
            scores = top_scores.flatten()
            generated, counts = generated[source], counts[source]
            stopped, finished = stopped[source], finished[source]
            growing = ~finished
            next_tokens = torch.where(growing, (index % vocab).flatten(), pad_token_id)  # [rows]
            generated[:, step] = next_tokens
            counts += growing
            hit_stop = growing & torch.isin(next_tokens, stop_ids)
            stopped |= hit_stop
            finished = finished | hit_stop | (counts >= limit)
            if bool(finished.all()):
                break
            cache.select_rows(source)
            positions = torch.clamp(lengths + step, max=cache_length - 1)
            key_length = min(width + step + 1, cache_length)
            hidden = backbone.decode(next_tokens[:, None], positions, cache, key_length)
            logits = backbone.token_embedding.reverse(hidden[:, 0])

        counts_list, generated_list = counts.tolist(), generated.tolist()
        completions = [generated_list[r][: counts_list[r]] for r in range(rows)]
        reasons = ["stop" if s else "length" for s in stopped.tolist()]
        scores_list = scores.tolist()

        def per_prompt(values):
            return [values[i * beams : (i + 1) * beams] for i in range(batch)]

        return self._result(per_prompt(completions), per_prompt(scores_list), per_prompt(reasons))

    def _result(self, completions, scores, reasons):
        """Per prompt lists of beams -> the best beam of each, and all of them if asked."""
        best, all_beams = [], []
        for beam_ids, beam_scores, beam_reasons in zip(completions, scores, reasons):
            # Beams still at -inf never held a sequence (more beams than continuations).
            ranked = sorted(
                (b for b in range(len(beam_scores)) if beam_scores[b] > float("-inf")),
                key=lambda b: -beam_scores[b],
            )
            best.append(ranked[0])
            all_beams.append([(beam_ids[b], beam_scores[b], beam_reasons[b]) for b in ranked])
        return BeamSearchResult(
            completions=[ids[b] for ids, b in zip(completions, best)],
            finish_reasons=[r[b] for r, b in zip(reasons, best)],
            beams=all_beams if self.return_all_beams else None,
        )

    def get_config(self):
        config = {"num_beams": self.num_beams, "return_all_beams": self.return_all_beams}
        return {**super().get_config(), **config}
