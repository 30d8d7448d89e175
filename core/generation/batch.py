"""The decode engine's state: every row in flight, in one object."""

from dataclasses import dataclass, field

import torch

from lmq.core.generation.results import Completion, DecodeResult, FinishedRow

PREFILL_CHUNK = 256  # prompt tokens prefilled between two decode steps (chunked prefill)


@dataclass
class Joining:
    """A request being prefilled: its prompt is in the cache up to ``done``."""

    request: int
    prompt: list
    limit: int
    group: int  # its slot group: cache slots [group * rows_per_prompt, (group + 1) * rows_per_prompt)
    done: int = 0
    hidden: list = field(default_factory=list)  # the prompt's hidden states, chunk by chunk

    @property
    def need(self):
        return len(self.prompt) + self.limit


class Batch:
    """The requests being decoded: their rows, the cache, and what each row has done so far.

    A request (one prompt) takes ``rows_per_prompt`` neighbouring rows: one, or one
    per beam (beam search) or per candidate (contrastive search). Row i lives in cache
    slot i; the rows being decoded fill slots ``[0, size)``, and the requests being
    prefilled (``joining``) the slot groups above them. Every per-row tensor lives in
    ``rows``, first dimension the row, so ``select`` moves them all with the cache rows:

    - ``request``: the request a row decodes for; ``sequence`` [rows, max_length + 1]:
      prompt and completion so far (one spare slot past the end);
    - ``start``/``length``/``end``: prompt length, tokens so far, prompt + token limit;
    - ``token``: the newest token; ``done``/``stopped``: finished, and by a stop;
    - what the sampler keeps per row (``score`` for beams, ``history`` for contrastive).

    Requests join with ``add`` (slots are reserved) and ``prefill`` (their prompts go
    into the cache, in chunks of ``prefill_chunk`` tokens when the model allows, and
    requests whose prompt is in start decoding); requests whose rows have all finished
    leave with ``drop_finished``, the last rows moving into their slots (a copy of a few
    rows, not of the cache). ``lmq.core.generation.engine.decode`` drives the steps.
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
        max_rows=None,
        max_cache_tokens=None,
        prefill_chunk=PREFILL_CHUNK,
    ):
        """``seeds``: request -> seed, so that each request samples from its own random
        stream (its output then depends on its prompt and seed, not on its neighbours);
        ``on_finish(request, completion)`` receives each result as its request finishes;
        ``room``: (positions, prompt length) the longest request of the job needs;
        ``max_rows`` requests and ``max_cache_tokens`` KV-cache positions are the most the
        cache is sized for (by default: as the first requests need)."""
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
        self.rows_per_prompt = sampler.rows_per_prompt(model.backbone.token_embedding.embeddings.shape[0])
        self.rows = {}
        self.size = 0  # rows being decoded
        self.joining = []  # Joining records, oldest first
        self.cache = None
        self.cache_groups = self.cache_length = 0  # what the cache holds: slot groups, positions per slot
        self.max_length, self.prompt_width = room  # per-row bookkeeping is sized for the whole job
        self.max_rows, self.max_cache_tokens = max_rows, max_cache_tokens
        self.prefill_chunk = prefill_chunk if getattr(model, "chunked_prefill", False) else None
        self.width = 0  # above every row's length: how many cache slots a step reads
        self.longest = 0  # the most positions a request in flight needs
        self.logits = None  # [rows, vocab]: each row's next-token logits, until a sampler takes them
        self.completions = {}  # request -> Completion

    @property
    def in_flight(self):
        """How many requests are being decoded or prefilled."""
        return self.size // self.rows_per_prompt + len(self.joining)

    @property
    def busy(self):
        return bool(self.size or self.joining)

    def fits(self, more, longest):
        """Whether ``more`` requests can join, the longest of all then needing ``longest`` positions."""
        requests = self.in_flight + more
        if requests == 1:
            return True
        if self.max_rows is not None and requests > self.max_rows:
            return False
        return self.max_cache_tokens is None or requests * self.rows_per_prompt * longest <= self.max_cache_tokens

    # -- rows join -------------------------------------------------------------------

    def add(self, prompts, limits, requests):
        """Reserves cache slots for ``prompts`` (lists of ids), new requests of up to
        ``limits[i]`` tokens each; ``prefill`` then runs them in.

        ``requests`` are their ids (results are keyed by them); a request with nothing
        to generate finishes at once.
        """
        joining = []
        for prompt, limit, request in zip(prompts, limits, requests):
            if limit <= 0:  # the empty completion, of log-probability 0
                self._complete(request, [FinishedRow([], "length", 0.0)])
            else:
                joining.append(Joining(request, list(prompt), limit, group=self.in_flight + len(joining)))
        if not joining:
            return
        longest = max(self.longest, max(j.need for j in joining))
        if max(j.need for j in joining) > self.max_length or max(len(j.prompt) for j in joining) > self.prompt_width:
            raise ValueError(
                f"A joining request needs {max(j.need for j in joining)} cache positions; this batch was "
                f"sized for {self.max_length} and {self.prompt_width}-token prompts."
            )
        self._reserve(self.in_flight + len(joining), longest)
        self.joining += joining
        self.longest = longest
        if self.seeds is not None:
            for j in joining:
                generator = torch.Generator(device=self.model.device)
                self.generators[j.request] = generator.manual_seed(int(self.seeds[j.request]))

    def _reserve(self, groups, length):
        """A cache with room for ``groups`` requests of ``length`` positions, the rows in flight kept.

        A new cache is as long as the requests in flight need (grown by half again when
        outgrown, so a long-tailed job reallocates a few times) and has as many slot groups
        as the budget holds at that length.
        """
        if self.cache is not None and groups <= self.cache_groups and length <= self.cache_length:
            return
        if self.cache is not None and length > self.cache_length:
            length = max(length, self.cache_length * 3 // 2)
        length = min(max(length, self.cache_length), self.max_length)
        most = self.max_rows or groups
        if self.max_cache_tokens is not None:
            most = min(most, self.max_cache_tokens // (self.rows_per_prompt * length))
        size = max(groups, most, self.cache_groups if length == self.cache_length else 0)
        cache = self.model.new_cache(size * self.rows_per_prompt, length, self.prompt_width)
        if self.cache is not None:
            cache.take(self.cache, self.in_flight * self.rows_per_prompt)
        self.cache, self.cache_groups, self.cache_length = cache, size, length

    def prefill(self):
        """Runs up to ``prefill_chunk`` prompt tokens of the joining requests into the cache,
        oldest first (all of a prompt at once when the model prefills no chunks); the
        requests whose prompts are in join the decoding rows with their next logits."""
        budget = self.prefill_chunk
        work = []  # (request, start, stop)
        for joining in self.joining:
            if budget is not None and budget <= 0:
                break
            stop = len(joining.prompt) if budget is None else min(len(joining.prompt), joining.done + budget)
            work.append((joining, joining.done, stop))
            if budget is not None:
                budget -= stop - joining.done
        device = self.model.device
        for start in sorted({start for _, start, _ in work}):
            chunk = [(j, stop) for j, s, stop in work if s == start]
            slots = torch.tensor([j.group * self.rows_per_prompt for j, _ in chunk], device=device)
            tokens = [j.prompt[start:stop] for j, stop in chunk]
            requests = [j.request for j, _ in chunk]
            extra = {"start": start} if start else {}
            hidden = self.model.prefill(self.cache, tokens, slots, requests, **extra)
            for i, (joining, stop) in enumerate(chunk):
                joining.hidden.append(hidden[i, : stop - start])
                joining.done = stop
        ready = [j for j in self.joining if j.done == len(j.prompt)]
        if ready:
            self._start_decoding(ready)

    def _start_decoding(self, ready):
        """The ``ready`` requests (prompts prefilled) become decoding rows, after the others."""
        device, group = self.model.device, self.rows_per_prompt
        self.joining = [j for j in self.joining if j.done < len(j.prompt)]
        lengths = torch.tensor([len(j.prompt) for j in ready], device=device)
        width = max(len(j.prompt) for j in ready)
        hidden = torch.stack(
            [torch.nn.functional.pad(torch.cat(j.hidden), (0, 0, 0, width - len(j.prompt))) for j in ready]
        )
        logits = self.model.logits(hidden[torch.arange(len(ready), device=device), lengths - 1])
        if group > 1:  # every row of a request starts from its prompt, prefilled into its first slot
            first = torch.tensor([j.group * group for j in ready], device=device)
            within = torch.arange(1, group, device=device)
            self.cache.move_rows(first.repeat_interleave(group - 1), (first[:, None] + within).flatten())
        each = torch.arange(len(ready), device=device).repeat_interleave(group)
        sequence = [j.prompt + [0] * (self.max_length + 1 - len(j.prompt)) for j in ready]
        joined = {
            "request": torch.tensor([j.request for j in ready], device=device)[each],
            "sequence": torch.tensor(sequence, dtype=torch.long, device=device)[each],
            "start": lengths[each],
            "length": lengths[each],
            "end": (lengths + torch.tensor([j.limit for j in ready], device=device))[each],
            "token": torch.zeros(len(each), dtype=torch.long, device=device),
            "done": torch.zeros(len(each), dtype=torch.bool, device=device),
            "stopped": torch.zeros(len(each), dtype=torch.bool, device=device),
        }
        self.sampler.admit(self, joined, hidden)
        decoding = self.size // group
        self._pack(list(range(decoding)) + [j.group for j in ready])
        if self.rows:
            joined = {name: torch.cat([self.rows[name], value]) for name, value in joined.items()}
        self.rows = joined
        # Rows join between steps, when the rows in flight hold their next logits.
        self.logits = logits[each] if self.size == 0 else torch.cat([self.logits, logits[each]])
        self.size += len(each)
        self.width = max(self.width, width)

    def _pack(self, decoding):
        """Moves cache slot groups so that the decoding requests, whose groups are ``decoding``
        in their new order, fill groups ``[0, len(decoding))`` and the joining ones the next."""
        source, target = [], []
        for to, of in enumerate(decoding):
            if of != to:
                source.append(of)
                target.append(to)
        first, last = len(decoding), len(decoding) + len(self.joining)
        free = iter(sorted(set(range(first, last)) - {j.group for j in self.joining}))
        for joining in self.joining:
            if not first <= joining.group < last:
                source.append(joining.group)
                joining.group = next(free)
                target.append(joining.group)
        if source:
            self.cache.move_rows(self._slots(source), self._slots(target))

    def _slots(self, groups):
        """The cache slots of slot groups ``groups``."""
        groups = torch.tensor(groups, dtype=torch.long, device=self.model.device)
        within = torch.arange(self.rows_per_prompt, device=groups.device)
        return (groups[:, None] * self.rows_per_prompt + within).flatten()

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
        self.width = min(self.width + 1, self.cache_length)
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
        positions = self.rows["length"].clamp(max=self.cache_length - 1)
        return self.model.step(self.cache, tokens, positions, min(self.width + 1, self.cache_length))

    # -- rows leave ------------------------------------------------------------------

    def drop_finished(self):
        """Takes out the requests whose rows have all finished: the last decoding requests
        move into their slots, so the rows left still fill slots ``[0, size)``."""
        group = self.rows_per_prompt
        done = self.rows["done"] if group == 1 else self.rows["done"].view(-1, group).all(dim=1)
        finished = done.nonzero()[:, 0].tolist()
        if not finished:
            return
        self._harvest(self._slots(finished))
        kept = len(done) - len(finished)
        gone = set(finished)
        movers = iter([g for g in range(kept, len(done)) if g not in gone])
        order = [g if g not in gone else next(movers) for g in range(kept)]
        self._pack(order)
        index = self._slots(order)
        self.rows = {name: value[index] for name, value in self.rows.items()}
        self.logits = None if self.logits is None else self.logits[index]
        self.size = len(index)
        lengths = self.rows["length"].max() if kept else 0
        self.width = int(lengths)  # long rows that left no longer widen the reads
        ends = [j.need for j in self.joining] + ([int(self.rows["end"].max())] if kept else [])
        self.longest = max(ends, default=0)

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
