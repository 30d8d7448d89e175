"""The decode engine's state: every row in flight, in one object."""

import torch

from core.generation.results import Completion, DecodeResult, FinishedRow


class Batch:
    """The requests being decoded: their rows, the cache, and what each row has done so far.

    A request (one prompt) takes ``rows_per_prompt`` neighbouring rows: one, or one
    per beam (beam search) or per candidate (contrastive search). Every per-row
    tensor lives in ``rows``, first dimension the row, so ``select`` moves them all
    together with the cache rows:

    - ``request``: the request a row decodes for; ``sequence`` [rows, max_length + 1]:
      prompt and completion so far (one spare slot past the end);
    - ``start``/``length``/``end``: prompt length, tokens so far, prompt + token limit;
    - ``token``: the newest token; ``done``/``stopped``: finished, and by a stop;
    - what the sampler keeps per row (``score`` for beams, ``history`` for contrastive).

    Rows leave with ``drop_finished`` (their request's result is kept) and join with
    ``add``; ``core.generation.engine.decode`` drives the steps.
    """

    def __init__(
        self,
        model,
        sampler,
        stop_token_ids=(),
        seeds=None,
        stop_strings=None,
        stream=None,
        on_finish=None,
        room=(0, 0),
    ):
        """``seeds``: request -> seed, so that each request samples from its own random
        stream (its output then depends on its prompt and seed, not on its neighbours);
        ``on_finish(request, completion)`` receives each result as its request finishes;
        ``room``: (positions, prompt length) the cache keeps for requests that join later;
        by default it fits the first requests only."""
        self.model = model
        self.sampler = sampler
        self.seeds = seeds
        self.generators = {}  # request in flight -> its torch.Generator, when seeded
        self.stop_strings = stop_strings
        self.stream = stream
        self.on_finish = on_finish
        self.stop_ids = torch.tensor(list(stop_token_ids), dtype=torch.long, device=model.device)
        # Python work per token, only when asked for; a search that picks its sequence at
        # the end (beam) gets stop strings and streaming once it has picked.
        self.check_each_token = (stream is not None or stop_strings is not None) and sampler.commits_each_step
        self.rows = {}
        self.size = 0
        self.cache = None
        self.max_length = self.prompt_width = 0  # what the cache holds: positions, prompt tokens
        self.width = 0  # above every row's length: how many cache slots a step reads
        self.room = room
        self.rows_per_prompt = 1
        self.logits = None  # [rows, vocab]: each row's next-token logits, until a sampler takes them
        self.completions = {}  # request -> Completion

    @property
    def in_flight(self):
        """How many requests are being decoded."""
        return self.size // self.rows_per_prompt

    # -- rows join -------------------------------------------------------------------

    def add(self, prompts, limits, requests):
        """Prefills ``prompts`` (lists of ids) as new requests of up to ``limits[i]`` tokens each.

        ``requests`` are their ids (results are keyed by them); a request with nothing
        to generate finishes at once.
        """
        for request, limit in zip(requests, limits):
            if limit <= 0:  # the empty completion, of log-probability 0
                self._complete(request, [FinishedRow([], "length", 0.0)])
        joining = [i for i, limit in enumerate(limits) if limit > 0]
        if not joining:
            return
        prompts = [list(prompts[i]) for i in joining]
        limits = [limits[i] for i in joining]
        device = self.model.device
        width = max(len(p) for p in prompts)
        longest = max(len(p) + limit for p, limit in zip(prompts, limits))
        if self.cache is None:
            self.max_length, self.prompt_width = max(self.room[0], longest), max(self.room[1], width)
            self.cache = self.model.new_cache(len(prompts), self.max_length, self.prompt_width)
        elif longest > self.max_length or width > self.prompt_width:
            raise ValueError(
                f"A joining request needs {longest} cache positions and a {width}-token prompt; this "
                f"batch's cache has room for {self.max_length} and {self.prompt_width}."
            )
        else:  # continuous batching: cache rows for requests that join a running batch
            self.cache.add_rows(len(prompts))
        if self.seeds is not None:
            for i in joining:
                generator = torch.Generator(device=device)
                self.generators[requests[i]] = generator.manual_seed(int(self.seeds[requests[i]]))
        rows = torch.arange(self.size, self.size + len(prompts), device=device)
        hidden = self.model.prefill(self.cache, prompts, rows, [requests[i] for i in joining])
        lengths = torch.tensor([len(p) for p in prompts], device=device)
        logits = self.model.logits(hidden[torch.arange(len(prompts), device=device), lengths - 1])
        if self.size == 0:
            self.rows_per_prompt = self.sampler.rows_per_prompt(logits.shape[-1])
        each = torch.arange(len(prompts), device=device).repeat_interleave(self.rows_per_prompt)
        sequence = [p + [0] * (self.max_length + 1 - len(p)) for p in prompts]
        joined = {
            "request": torch.tensor(requests, device=device)[joining][each],
            "sequence": torch.tensor(sequence, dtype=torch.long, device=device)[each],
            "start": lengths[each],
            "length": lengths[each],
            "end": (lengths + torch.tensor(limits, device=device))[each],
            "token": torch.zeros(len(each), dtype=torch.long, device=device),
            "done": torch.zeros(len(each), dtype=torch.bool, device=device),
            "stopped": torch.zeros(len(each), dtype=torch.bool, device=device),
        }
        self.sampler.admit(self, joined, hidden)
        if self.rows_per_prompt > 1:  # each request's rows side by side
            self.cache.select_rows(torch.cat([torch.arange(self.size, device=device), self.size + each]))
        if self.rows:
            joined = {name: torch.cat([self.rows[name], value]) for name, value in joined.items()}
        self.rows = joined
        # Rows join between steps, when the rows in flight hold their next logits.
        self.logits = logits[each] if self.size == 0 else torch.cat([self.logits, logits[each]])
        self.size += len(each)
        self.width = max(self.width, width)

    # -- one step --------------------------------------------------------------------

    def row_generators(self):
        """Each row's random generator (its request's), or None when unseeded."""
        if self.seeds is None:
            return None
        return [self.generators[request] for request in self.rows["request"].tolist()]

    def take_logits(self):
        """The rows' next-token logits [rows, vocab], for the sampler to choose from."""
        logits, self.logits = self.logits, None
        return logits

    def select(self, index):
        """Keeps, repeats or reorders rows (``index``: row numbers), cache rows with them."""
        self.rows = {name: value[index] for name, value in self.rows.items()}
        self.cache.select_rows(index)
        if self.logits is not None:
            self.logits = self.logits[index]
        self.size = len(index)

    def append(self, tokens):
        """Each row's new token [rows]; a finished row ignores its own."""
        rows = self.rows
        fresh = ~rows["done"]
        rows["sequence"].scatter_(1, rows["length"][:, None], tokens[:, None])
        rows["length"] += fresh
        hit_stop = fresh & torch.isin(tokens, self.stop_ids)
        rows["stopped"] |= hit_stop
        rows["done"] |= hit_stop | (rows["length"] >= rows["end"])
        rows["token"] = tokens
        self.width = min(self.width + 1, self.max_length)
        if self.check_each_token:
            self._check_each_token(fresh)

    def _check_each_token(self, fresh):
        """Streaming and stop strings: Python work per request and token."""
        group, rows = self.rows_per_prompt, self.rows
        first = slice(None, None, group)  # the rows of a request hold the same tokens
        columns = [fresh[first]] + [rows[name][first] for name in ("request", "token", "start", "length")]
        for index, (is_fresh, request, token, start, length) in enumerate(zip(*(c.tolist() for c in columns))):
            if not is_fresh:
                continue
            if self.stream is not None:
                self.stream(request, token)
            if self.stop_strings is not None:
                tail = rows["sequence"][index * group, max(start, length - self.stop_strings.tail) : length]
                if self.stop_strings.found(tail.tolist()):
                    rows["done"][index * group : (index + 1) * group] = True
                    rows["stopped"][index * group : (index + 1) * group] = True

    def step(self):
        """Runs every row's newest token through the model: the next logits."""
        positions = self.rows["length"] - 1
        hidden = self.model.step(self.cache, self.rows["token"], positions, self.width)
        self.logits = self.model.logits(hidden)

    def look_ahead(self, tokens):
        """Hidden states [rows, hidden] of ``tokens`` [rows] as each row's next token.

        The cache holds their keys afterwards, as after a step, but nothing is appended
        (contrastive search scores candidates this way).
        """
        positions = self.rows["length"].clamp(max=self.max_length - 1)
        return self.model.step(self.cache, tokens, positions, min(self.width + 1, self.max_length))

    # -- rows leave ------------------------------------------------------------------

    def drop_finished(self):
        """Takes out the requests whose rows have all finished, once they are a quarter
        of the batch (moving rows costs a copy of the cache) or all of it."""
        group = self.rows_per_prompt
        done = self.rows["done"] if group == 1 else self.rows["done"].view(-1, group).all(dim=1)
        finished = int(done.sum())
        if finished * 4 < len(done) and finished < len(done):
            return
        within = torch.arange(group, device=done.device)
        self._harvest(((done.nonzero() * group) + within).flatten())
        if finished == len(done):
            self.rows, self.size, self.cache, self.logits = {}, 0, None, None
        else:
            self.select(((~done).nonzero() * group + within).flatten())
            self.width = int(self.rows["length"].max())  # long rows that left no longer widen the reads

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
        if not self.sampler.commits_each_step:  # the search chose its sequence only now
            if self.stop_strings is not None:
                end = self.stop_strings.end(completion.token_ids)
                if end is not None:
                    completion = Completion(completion.token_ids[:end], "stop", completion.beams)
            if self.stream is not None:
                for token in completion.token_ids:
                    self.stream(request, token)
        self.completions[request] = completion
        self.generators.pop(request, None)
        if self.on_finish is not None:
            self.on_finish(request, completion)

    def result(self):
        return DecodeResult.of([self.completions[r] for r in sorted(self.completions)])
