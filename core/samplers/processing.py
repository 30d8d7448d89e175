"""Per-row logits processing: penalties, logit bias, min-p, and the log-probabilities a row reports.

OpenAI's and vLLM's sampling fields change a row's logits before its token sampler
chooses. They are applied here, once, to the rows that ask for them, in the same
step as the other rows (``PerRequestSampler.choose``), by vLLM's formulas:

- ``logit_bias``: added to the raw logits of its tokens;
- ``presence_penalty``, ``frequency_penalty``: over the tokens the row has generated,
  ``logits -= presence * (count > 0) + frequency * count``;
- ``min_p``: tokens whose probability (after temperature) is below ``min_p`` times the
  most likely token's are taken out;
- ``response_format`` (structured outputs, ``lmq.core.grammar``): tokens the row's grammar
  does not allow next are taken out (after the bias and penalties, before min-p); the
  grammar advances with each chosen token (``accept``) and the row ends once it is complete.

A row's reported log-probabilities are ``log_softmax(processed logits / temperature)``:
after the logit bias, the penalties and the temperature, before any truncation (top-k,
top-p, min-p), so the chosen token's is that of the distribution it was drawn from
before the sampler cut it down. A greedy row's temperature is 1: its raw logits. A row with a
``response_format`` reports them over the tokens its grammar allowed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import llguidance
import torch

from lmq.core.grammar import format_grammar, grammar_tokenizer


@dataclass(frozen=True)
class RowProcessing:
    """One request's processing; the default asks for nothing."""

    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict = field(default_factory=dict)  # token id -> bias
    min_p: float = 0.0
    logprobs: int | None = None  # None: none reported; k: the chosen token's and the k most likely tokens'
    response_format: dict | None = None  # lmq.core.domain.formats.ResponseFormat's form; None or "text": free

    @property
    def constrained(self) -> bool:
        return self.response_format is not None and self.response_format.get("type") != "text"

    @property
    def changes_logits(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias or self.min_p or self.constrained)

    @property
    def asks_anything(self) -> bool:
        return self.changes_logits or self.logprobs is not None


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability and the ``top`` most likely (token id, log-probability)."""

    token_id: int
    logprob: float
    top: list


class BatchProcessing:
    """Every request's ``RowProcessing`` as columns, applied to the rows of a step together.

    Per request: penalties and min-p as columns indexed by request id, logit biases as
    (request, token, bias) triples. What each row reported is kept by request until read.
    """

    def __init__(self, processing: list[RowProcessing | None], vocabulary_size: int, tokenizer=None):
        """``tokenizer``: the model's, needed when a row has a ``response_format``; a ValueError names
        a format the grammar engine cannot compile."""
        processing = [p or RowProcessing() for p in processing]
        for request, each in enumerate(processing):
            too_large = [token for token in each.logit_bias if not 0 <= int(token) < vocabulary_size]
            if too_large:
                raise ValueError(
                    f"Prompt {request}'s logit_bias names token {too_large[0]}, outside the vocabulary "
                    f"(0 to {vocabulary_size - 1})."
                )

        def column(name):
            return torch.tensor([float(getattr(p, name)) for p in processing])

        self.presence, self.frequency, self.min_p = column("presence_penalty"), column("frequency_penalty"), column("min_p")
        self.penalized = (self.presence != 0) | (self.frequency != 0)
        biases = [(request, int(token), float(bias)) for request, p in enumerate(processing) for token, bias in p.logit_bias.items()]
        self.bias_request, self.bias_token, self.bias_value = (
            torch.tensor([entry[i] for entry in biases], dtype=dtype)
            for i, dtype in ((0, torch.long), (1, torch.long), (2, torch.float32))
        )
        self.top = torch.tensor([-1 if p.logprobs is None else p.logprobs for p in processing])
        self.changes_logits = any(p.changes_logits for p in processing)
        self.reported: dict[int, list[TokenLogprob]] = {}
        self.grammars = GrammarRows(processing, tokenizer, vocabulary_size) if any(p.constrained for p in processing) else None

    def to(self, device):
        for name in ("presence", "frequency", "min_p", "penalized", "bias_request", "bias_token", "bias_value", "top"):
            setattr(self, name, getattr(self, name).to(device))

    def process(self, rows, logits, temperature):
        """(adjusted, to sample from): the step's logits [rows, vocab] after each row's logit bias
        and penalties, then also min-p's cut; the same tensor when no row asks for any.
        ``rows`` is the batch's per-row tensors; ``temperature`` [rows] each row's."""
        if not self.changes_logits:
            return logits, logits
        requests = rows["request"]
        logits = logits.float().clone()
        if len(self.bias_request):
            row_of_request = torch.full((len(self.top),), -1, dtype=torch.long, device=logits.device)
            row_of_request[requests] = torch.arange(len(requests), device=logits.device)
            bias_rows = row_of_request[self.bias_request]
            present = bias_rows >= 0
            logits.index_put_((bias_rows[present], self.bias_token[present]), self.bias_value[present], accumulate=True)
        penalized = self.penalized[requests].nonzero()[:, 0]
        if len(penalized):
            counts = generated_counts(rows, penalized, logits.shape[-1])
            presence = self.presence[requests[penalized]][:, None]
            frequency = self.frequency[requests[penalized]][:, None]
            logits[penalized] -= presence * (counts > 0) + frequency * counts
        if self.grammars is not None:
            self.grammars.mask(rows, logits)
        min_p = self.min_p[requests]
        cut = (min_p > 0).nonzero()[:, 0]
        if not len(cut):
            return logits, logits
        probabilities = torch.softmax(logits[cut] / temperature[cut, None], dim=-1)
        floor = min_p[cut, None] * probabilities.max(dim=-1, keepdim=True).values
        truncated = logits.clone()
        truncated[cut] = logits[cut].masked_fill(probabilities < floor, float("-inf"))
        return logits, truncated

    def record(self, requests, logits, temperature, tokens):
        """Keeps, for the rows whose requests ask, the chosen tokens' log-probabilities and the top ones'.
        ``logits`` are the adjusted logits, before min-p's cut (see the module's docstring)."""
        top = self.top[requests]
        asking = (top >= 0).nonzero()[:, 0]
        if not len(asking):
            return
        logprobs = torch.log_softmax(logits[asking].float() / temperature[asking, None], dim=-1)
        chosen = logprobs.gather(1, tokens[asking][:, None])[:, 0]
        width = int(top[asking].max())
        top_values, top_ids = logprobs.topk(width, dim=-1) if width else (logprobs[:, :0], logprobs[:, :0].long())
        for request, k, token, value, ids, values in zip(
            requests[asking].tolist(), top[asking].tolist(), tokens[asking].tolist(),
            chosen.tolist(), top_ids.tolist(), top_values.tolist(),
        ):
            self.reported.setdefault(request, []).append(TokenLogprob(token, value, list(zip(ids[:k], values[:k]))))

    def accept(self, rows, tokens):
        """Advances the rows' grammars by their chosen ``tokens`` [rows]."""
        if self.grammars is not None:
            self.grammars.accept(rows, tokens)

    @property
    def completed(self):
        """[rows] whether each row's grammar completed with the step's token; None when no row has one."""
        return None if self.grammars is None else self.grammars.completed

    def take(self, request: int) -> list[TokenLogprob] | None:
        """What request ``request`` reported (None when it asked for nothing), forgotten once read
        with its grammar state."""
        if self.grammars is not None:
            self.grammars.matchers.pop(request, None)
        if int(self.top[request]) < 0:
            return None
        return self.reported.pop(request, [])


def generated_counts(rows, which, vocabulary_size):
    """How often each token occurs in the completions so far of rows ``which``: [len(which), vocab]."""
    sequence = rows["sequence"][which]
    positions = torch.arange(sequence.shape[1], device=sequence.device)[None, :]
    generated = (positions >= rows["start"][which][:, None]) & (positions < rows["length"][which][:, None])
    counts = torch.zeros(len(which), vocabulary_size, device=sequence.device)
    return counts.scatter_add_(1, sequence, generated.float())


class GrammarRows:
    """The grammar matchers of the requests with a ``response_format`` (llguidance's ``LLMatcher``).

    A request's matcher is copied from its grammar's compiled one when its row first decodes and
    dropped when its result is taken. Each step ``mask`` takes out of the constrained rows' logits
    what their grammars do not allow (llguidance computes the rows' bitmasks in parallel); a row
    whose grammar could end here may also choose one of its stop tokens. ``accept`` advances them
    and says which completed: those rows end as on a stop token.
    """

    def __init__(self, processing: list[RowProcessing], tokenizer, vocabulary_size: int):
        if tokenizer is None:
            raise ValueError("response_format needs the model's tokenizer (a preprocessor).")
        self.tokenizer = grammar_tokenizer(tokenizer)
        compiled = {}  # format as JSON -> its matcher at the start
        self.start_of_request = []
        for each in processing:
            key = json.dumps(each.response_format, sort_keys=True) if each.constrained else None
            if key is not None and key not in compiled:
                compiled[key] = llguidance.LLMatcher(self.tokenizer, format_grammar(each.response_format))
            self.start_of_request.append(compiled.get(key))
        self.constrained = torch.tensor([start is not None for start in self.start_of_request])
        self.matchers = {}  # request decoding -> its matcher
        self.executor = llguidance.LLExecutor()
        self.vocabulary_size = vocabulary_size
        self.words = (self.tokenizer.vocab_size + 31) // 32  # a row's bitmask, 32 tokens an int32
        self.bits = torch.arange(32, dtype=torch.int32)
        self.completed = None

    def _matcher(self, request: int):
        if request not in self.matchers:
            self.matchers[request] = self.start_of_request[request].deep_copy()
        return self.matchers[request]

    def mask(self, rows, logits):
        """Takes out, in place, the tokens each constrained row's grammar does not allow next."""
        which = self.constrained.to(logits.device)[rows["request"]].nonzero()[:, 0]
        if not len(which):
            return
        matchers = [self._matcher(request) for request in rows["request"][which].tolist()]
        bitmask = torch.zeros(len(which), self.words, dtype=torch.int32)
        self.executor.unsafe_compute_mask_ptr(
            [(matcher, i) for i, matcher in enumerate(matchers)], bitmask.data_ptr(), self.words * 4, len(which)
        )
        allowed = ((bitmask[:, :, None] >> self.bits) & 1).view(len(which), -1).bool()
        allowed = torch.nn.functional.pad(allowed, (0, max(0, self.vocabulary_size - allowed.shape[1])))
        allowed = allowed[:, : self.vocabulary_size].to(logits.device)
        allowed[:, self.tokenizer.eos_token] = False  # a row ends on its own stop tokens
        accepting = torch.tensor([matcher.is_accepting() for matcher in matchers], device=logits.device)
        stops = rows["stop_ids"][which]
        ending = accepting[:, None] & (stops >= 0)
        allowed[ending.nonzero()[:, 0], stops[ending]] = True
        logits[which] = logits[which].masked_fill(~allowed, float("-inf"))

    def accept(self, rows, tokens):
        """Advances each constrained row's grammar by its token (a stop token ends the row anyway);
        ``completed`` [rows] is then whether it is complete."""
        requests = rows["request"]
        which = self.constrained.to(requests.device)[requests].nonzero()[:, 0]
        self.completed = torch.zeros(len(requests), dtype=torch.bool, device=requests.device)
        stopping = (tokens[which, None] == rows["stop_ids"][which]).any(dim=1).tolist()
        for row, request, token, stop in zip(which.tolist(), requests[which].tolist(), tokens[which].tolist(), stopping):
            if stop:
                continue
            matcher = self.matchers[request]
            if not matcher.consume_token(token):
                raise RuntimeError(f"Prompt {request}'s grammar refused token {token}, which its mask allowed: {matcher.get_error()}")
            if matcher.is_stopped():
                self.completed[row] = True
