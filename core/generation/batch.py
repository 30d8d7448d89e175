"""The running batch: the rows being decoded and what each has produced so far."""

import torch

from lmq.core.generation.input_batch import StepInput
from lmq.core.generation.results import Completion, FinishedRow


class Batch:
    """The decoding rows, as the sampler sees them.

    A request takes ``rows_per_prompt`` neighbouring rows: one, or one per beam (beam
    search) or per candidate (contrastive search). Row i lives in cache slot i (the
    ``KVCacheManager`` keeps it so). Every per-row tensor lives in ``rows``, first
    dimension the row, so ``select`` moves them all with the cache rows:

    - ``request``: the request a row decodes for; ``sequence`` [rows, max_length + 1]:
      prompt and completion so far (one spare slot past the end);
    - ``start``/``length``/``end``: prompt length, tokens so far, prompt + token limit;
    - ``token``: the newest token, which the next step runs; ``done``/``stopped``:
      finished, and by a stop; ``stop_ids`` [rows, stops]: its stop tokens (-1 pads);
      ``has_stop_strings``: whether its request has stop strings (only those rows' text is decoded);
    - what the sampler keeps per row (``score`` for beams, ``history`` for contrastive).

    Stop tokens, token limits, stop strings and streaming are handled here, once, for
    every sampler; a request whose rows have all finished leaves with ``drop_finished``,
    and a cancelled one with ``drop``.
    """

    def __init__(self, model, runner, cache_manager, sampler, max_length, stream=None, on_finish=None):
        """``max_length``: the most positions a request needs; ``on_finish(request, completion)``
        receives each result; ``stream(request, token)`` (or None) each new token."""
        self.model = model
        self.runner = runner
        self.cache_manager = cache_manager
        self.sampler = sampler
        self.max_length = max_length
        self.stop_width = 0  # the most stop tokens a row has (``stop_ids``' columns)
        self.stop_strings = {}  # request in flight -> its StopStrings, when it has some
        self.stream = stream
        self.on_finish = on_finish
        self.generators = {}  # request in flight -> its torch.Generator, when seeded
        self.adapter_slots = {}  # request in flight -> its adapter's slot (the model's), when it names one
        self.seeded = False
        self.rows_per_prompt = cache_manager.rows_per_request
        self.rows = {}
        self.size = 0  # rows being decoded
        self.width = 0  # above every row's position: how many cache slots a step reads
        self.shared_prompt = 0  # leading prompt tokens every row holds alike (``_shared_prompt``)
        self.logits = None  # [rows, vocab]: each row's next-token logits, until a sampler takes them

    @property
    def check_each_token(self):
        """Python work per token, only when asked for (streaming, or a row with stop strings);
        a search that picks its sequence at the end (beam) gets those once it has picked."""
        return (self.stream is not None or bool(self.stop_strings)) and self.sampler.commits_each_step

    # -- rows join -------------------------------------------------------------------

    def admit(self, requests):
        """Requests the scheduler admitted: a random stream for each seeded one; one with
        nothing to generate finishes at once."""
        for request in requests:
            if request.stop_strings is not None:
                self.stop_strings[request.id] = request.stop_strings
            if request.adapter is not None:
                self.adapter_slots[request.id] = self.model.adapter_slot(request.adapter)
            if request.limit <= 0:  # the empty completion, of log-probability 0
                self._complete(request.id, [FinishedRow([], "length", 0.0)])
            elif request.seed is not None:
                self.seeded = True
                generator = torch.Generator(device=self.model.device)
                self.generators[request.id] = generator.manual_seed(int(request.seed))

    def join(self, ready, logits):
        """The ``ready`` requests (``Prefill`` records, prompts in the cache) decode from now
        on, after the others; ``logits`` [ready, vocab] are their prompts' next-token logits."""
        device, group = self.model.device, self.rows_per_prompt
        requests = [p.request for p in ready]
        self.cache_manager.start_decoding([r.id for r in requests])
        lengths = torch.tensor([len(r.prompt) for r in requests], device=device)
        width = max(len(r.prompt) for r in requests)
        # [ready, width, hidden]: the prompts' hidden states, for a sampler that keeps them (zeros
        # where a prompt's KV came from the prefix cache, which such a sampler turns off)
        hidden = None
        if self.sampler.reads_prompt_states:
            last = ready[0].hidden[-1][1]
            hidden = last.new_zeros(len(ready), width, last.shape[-1])
            for i, prefill in enumerate(ready):
                for start, states in prefill.hidden:
                    hidden[i, start : start + len(states)] = states
        each = torch.arange(len(ready), device=device).repeat_interleave(group)
        sequence = torch.zeros(len(requests), self.max_length + 1, dtype=torch.long)
        for row, request in enumerate(requests):
            sequence[row, : len(request.prompt)] = torch.tensor(request.prompt, dtype=torch.long)
        self._widen_stops(max(len(r.stop_token_ids) for r in requests))
        stops = [list(r.stop_token_ids) + [-1] * (self.stop_width - len(r.stop_token_ids)) for r in requests]
        joined = {
            "request": torch.tensor([r.id for r in requests], device=device)[each],
            "sequence": sequence.to(device)[each],
            "start": lengths[each],
            "length": lengths[each],
            "end": (lengths + torch.tensor([r.limit for r in requests], device=device))[each],
            "token": torch.zeros(len(each), dtype=torch.long, device=device),
            "done": torch.zeros(len(each), dtype=torch.bool, device=device),
            "stopped": torch.zeros(len(each), dtype=torch.bool, device=device),
            "stop_ids": torch.tensor(stops, dtype=torch.long, device=device).view(len(requests), -1)[each],
            "has_stop_strings": torch.tensor([r.stop_strings is not None for r in requests], device=device)[each],
            "adapter": torch.tensor([self.adapter_slots.get(r.id, -1) for r in requests], device=device)[each],
        }
        self.sampler.admit(self, joined, hidden)
        if self.rows:
            joined = {name: torch.cat([self.rows[name], value]) for name, value in joined.items()}
        self.rows = joined
        self.shared_prompt = _shared_prompt(joined)
        # Rows join between steps, when the rows in flight hold their next logits.
        self.logits = logits[each] if self.size == 0 else torch.cat([self.logits, logits[each]])
        self.size += len(each)
        self.width = max(self.width, width)

    def _widen_stops(self, width):
        """Room for ``width`` stop tokens a row (-1 pads), the rows in flight's padded out."""
        if width > self.stop_width and self.rows:
            self.rows["stop_ids"] = torch.nn.functional.pad(self.rows["stop_ids"], (0, width - self.stop_width), value=-1)
        self.stop_width = max(self.stop_width, width)

    # -- one step --------------------------------------------------------------------

    @property
    def decode_rows(self):
        """How many rows the next forward pass runs a token of (none while they hold logits)."""
        return self.size if self.logits is None else 0

    def step_input(self, chunks):
        """The next forward pass: every row's newest token at its position, then ``chunks``
        ((cache row, start, token ids, request) of each prompt chunk)."""
        if self.decode_rows:
            tokens, positions, slots = self.rows["token"], self.rows["length"] - 1, self.rows["adapter"]
        else:
            tokens = positions = slots = torch.zeros(0, dtype=torch.long, device=self.model.device)
        adapters = None
        if self.adapter_slots:  # a request in flight names an adapter: each token says its own
            adapters = slots, [self.adapter_slots.get(request, -1) for *_, request in chunks]
        pooled = self.cache_manager.pooled_rows() if self.decode_rows else None
        pool = None if pooled is None else self.cache_manager.prefix_cache.storage
        return StepInput.of(tokens, positions, self.width, chunks, self.model.device, adapters, self.shared_prompt,
                            pooled, pool)

    def row_generators(self):
        """Each row's random generator (its request's), or None when unseeded."""
        if not self.seeded:
            return None
        return [self.generators.get(request) for request in self.rows["request"].tolist()]

    def take_logits(self):
        """The rows' next-token logits [rows, vocab], for the sampler to choose from."""
        logits, self.logits = self.logits, None
        return logits

    def select(self, index):
        """Keeps, repeats or reorders rows (``index``: row numbers), cache rows with them (rows
        taken from these hold at least their ``shared_prompt`` alike)."""
        self.rows = {name: value[index] for name, value in self.rows.items()}
        self.cache_manager.select_rows(index)
        if self.logits is not None:
            self.logits = self.logits[index]
        self.size = len(index)

    def append(self, tokens, completed=None):
        """Each row's new token [rows]; a finished row ignores its own. ``completed`` [rows] (or None):
        rows that end with this token as with a stop token (their grammar is complete), the token kept."""
        rows = self.rows
        fresh = ~rows["done"]
        rows["sequence"].scatter_(1, rows["length"][:, None], tokens[:, None])
        rows["length"] += fresh
        hit_stop = fresh & (tokens[:, None] == rows["stop_ids"]).any(dim=1)
        if completed is not None:
            hit_stop |= fresh & completed
        rows["stopped"] |= hit_stop
        rows["done"] |= hit_stop | (rows["length"] >= rows["end"])
        rows["token"] = tokens
        self.width = min(self.width + 1, self.cache_manager.length)
        if self.check_each_token:
            self._check_each_token(fresh)

    def _check_each_token(self, fresh):
        """Streaming and stop strings: Python work per token, for the requests that ask for it
        (every one when streaming, else those with stop strings)."""
        group, rows = self.rows_per_prompt, self.rows
        first = slice(None, None, group)  # the rows of a request hold the same tokens
        checked = fresh if self.stream is not None else fresh & rows["has_stop_strings"]
        index = checked[first].nonzero()[:, 0]
        columns = [index] + [rows[name][first][index] for name in ("request", "token", "start", "length")]
        for row, request, token, start, length in zip(*(c.tolist() for c in columns)):
            if self.stream is not None:
                self.stream(request, token)
            stop_strings = self.stop_strings.get(request)
            if stop_strings is not None:
                tail = rows["sequence"][row * group, max(start, length - stop_strings.tail) : length]
                if stop_strings.found(tail.tolist()):
                    rows["done"][row * group : (row + 1) * group] = True
                    rows["stopped"][row * group : (row + 1) * group] = True

    def look_ahead(self, tokens):
        """Hidden states [rows, hidden] of ``tokens`` [rows] as each row's next token.

        The cache holds their keys afterwards, as after a step, but nothing is appended
        (contrastive search scores candidates this way).
        """
        length = self.cache_manager.length
        positions = self.rows["length"].clamp(max=length - 1)
        adapters = (self.rows["adapter"], []) if self.adapter_slots else None
        step = StepInput.of(tokens, positions, min(self.width + 1, length), (), self.model.device, adapters)
        return self.runner.run(self.cache_manager.cache, step)

    # -- rows leave ------------------------------------------------------------------

    def drop_finished(self):
        """Takes out the requests whose rows have all finished (the last decoding requests move
        into their slots, so the rows left still fill slots ``[0, size)``); returns the most
        positions a request still decoding needs, or None when none finished."""
        group = self.rows_per_prompt
        done = self.rows["done"] if group == 1 else self.rows["done"].view(-1, group).all(dim=1)
        finished = done.nonzero()[:, 0].tolist()
        if not finished:
            return None
        self._harvest(self.cache_manager.slots(finished))
        return self._leave(finished)

    def drop(self, requests):
        """Takes out the rows of ``requests`` (ids; a cancelled job's) without a result; returns
        what ``drop_finished`` does."""
        for request in requests:
            self.stop_strings.pop(request, None)
            self.generators.pop(request, None)
            self.adapter_slots.pop(request, None)
        if not self.size:
            return None
        first = self.rows["request"][:: self.rows_per_prompt]
        gone = torch.isin(first, torch.tensor(list(requests), device=first.device)).nonzero()[:, 0].tolist()
        return self._leave(gone) if gone else None

    def _leave(self, finished):
        """Requests of slot groups ``finished`` leave; the most positions one still decoding needs."""
        ends = self.rows["length"].view(-1, self.rows_per_prompt).amax(dim=1).tolist()  # no row has keys past its length
        index = self.cache_manager.slots(self.cache_manager.leave(finished, ends))
        self.rows = {name: value[index] for name, value in self.rows.items()}
        self.shared_prompt = _shared_prompt(self.rows)
        self.logits = None if self.logits is None else self.logits[index]
        self.size = len(index)
        self.width = int(self.rows["length"].max()) if self.size else 0  # long rows that left no longer widen reads
        return int(self.rows["end"].max()) if self.size else 0

    def _harvest(self, index):
        """The results of the requests whose rows are ``index`` (whole requests, in order)."""
        columns = ("request", "sequence", "start", "length", "stopped")
        request, sequence, start, length, stopped = (self.rows[name][index].tolist() for name in columns)
        score = self.rows["score"][index].tolist() if "score" in self.rows else [None] * len(index)
        finished = [
            FinishedRow(sequence[r][start[r] : length[r]], "stop" if stopped[r] else "length", score[r])
            for r in range(len(index))
        ]
        group = self.rows_per_prompt
        for first in range(0, len(index), group):
            self._complete(request[first], finished[first : first + group])

    def _complete(self, request, rows):
        completion = self.sampler.finish(rows)
        stop_strings = self.stop_strings.pop(request, None)
        if not self.sampler.commits_each_step:  # the search chose its sequence only now
            if stop_strings is not None:
                end = stop_strings.end(completion.token_ids)
                if end is not None:
                    completion = Completion(completion.token_ids[:end], "stop", completion.beams)
            if self.stream is not None:
                for token in completion.token_ids:
                    self.stream(request, token)
        self.generators.pop(request, None)
        self.adapter_slots.pop(request, None)
        self.on_finish(request, completion)


def _shared_prompt(rows):
    """How many leading prompt tokens every row of ``rows`` holds alike, under one adapter (0 for
    fewer than two rows): worked out as rows join or leave, not at every step."""
    if len(rows["start"]) < 2 or bool((rows["adapter"] != rows["adapter"][0]).any()):
        return 0
    shortest = int(rows["start"].min())
    prompts = rows["sequence"][:, :shortest]
    differs = (prompts != prompts[:1]).any(0)  # [shortest]: some row's token differs there
    return int(differs.nonzero()[0]) if bool(differs.any()) else shortest
