"""Continuous batching on the simulated wafer: requests join and leave between decode steps.

``Scheduler`` keeps a queue of waiting requests and a batch of running ones. Each
:meth:`Scheduler.step`:

1. admits waiting requests while the batch has room (``max_num_seqs``), the decode KV
   pool has room for each one's whole context (prompt + ``max_tokens``, reserved at
   admission as in vLLM's FCFS policy with a request's blocks reserved up front, so a
   running request is never evicted), and the prompts admitted together fit the prefill
   regions (their total length at most the prompt length the placement was sized for);
2. prefills the newcomers one after another, with one restore of the weights before and
   one transition after (``WaferModel.prefill_many``), and samples their first tokens;
3. runs one decode step for every running request (``WaferModel.decode_batch``: a skinny
   MeshGEMM per projection, micro-batches pipelined over the decode regions), samples,
   and retires the finished ones, whose KV caches are freed at once.

Time has two clocks. The host's (``perf_counter``) measures the simulation; the wafer's
is the ledger's critical path, which advances only when the wafer works. A request's
predicted figures are read on the wafer clock: it arrives at the wafer time when the
scheduler first sees it, its first token is picked at the end of its prefill, each later
token at the end of its micro-batch's LM head. A step's energy is shared equally by the
requests in it; a prefill block's by its newcomers in proportion to their prompts.

``add_request`` and ``abort`` may be called from any thread; ``step`` from one.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from waferllm.engine.generate import SequenceState, prompt_logprobs, host_metrics
from waferllm.engine.outputs import RequestOutput
from waferllm.engine.sampling import SamplingParams
from waferllm.errors import RequestError, SRAMOverflowError


class QueueFullError(RequestError):
    """The waiting queue is full: the request was not accepted (retry later)."""


@dataclass
class TokenEvent:
    """What one step produced for one request."""

    request_id: str
    token_ids: list[int]
    text: str
    logprobs: list[dict[int, float]] | None
    finished: bool
    output: RequestOutput | None = None  # the whole request, once finished


@dataclass
class _Request:
    id: str
    prompt: str | None
    seq: SequenceState
    need: int  # KV tokens reserved: prompt + max_tokens, within the context
    arrival_host: float
    arrival_cycles: float | None = None
    slot: int | None = None
    prefill_cycles: float = 0.0  # wafer time work on it began (its prefill, or its block's restore)
    token_cycles: list[float] = field(default_factory=list)
    energy_j: float = 0.0
    prompt_logprobs: list | None = None
    t_prefill: float | None = None
    t_first: float | None = None
    aborted: bool = False


def joins_block(running: int, block: int, block_tokens: int, prompt_tokens: int, max_num_seqs: int,
                prompt_budget: int) -> bool:
    """Whether the next waiting request (``prompt_tokens`` long) joins this step's prefill
    block: the batch has a free slot, and after the block's first request its prompts stay
    within the prompt length the prefill regions were planned for."""
    return running + block < max_num_seqs and (not block or block_tokens + prompt_tokens <= prompt_budget)


class Scheduler:
    """Continuous batching over an ``LLM`` (its ``backend``, a numeric ``WaferModel``)."""

    def __init__(self, llm, max_num_seqs: int | None = None, max_waiting: int = 64):
        self.llm = llm
        self.model = llm.backend
        run = llm.run
        self.max_num_seqs = int(max_num_seqs or run.max_num_seqs)
        if self.max_num_seqs < 1 or max_waiting < 0:
            raise RequestError(f"max_num_seqs must be >= 1 and max_waiting >= 0, got {max_num_seqs}, {max_waiting}")
        self.max_waiting = int(max_waiting)
        self.pool_tokens = run.kv_pool_tokens
        self.prompt_budget = run.prompt_len or run.max_seq_len
        self.rows = self.model.decode_stages[0].mesh.rows if self.model.decode_stages else 1
        self.waiting: deque[_Request] = deque()
        self.running: list[_Request] = []
        self._inbox: deque[_Request] = deque()
        self._aborts: set[str] = set()
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self.reserved = 0  # KV pool tokens held by running requests
        self.model.close_seq(0)  # the single-request slot's cache goes back to the pool

    # ---- from any thread ---------------------------------------------------------------
    def add_request(self, prompt_token_ids, params: SamplingParams | dict | None = None, prompt: str | None = None,
                    request_id: str | None = None) -> str:
        """Queue a request; returns its id. Checked now: a request that can never run (too
        long for the context, or for the KV pool) is refused with the reason."""
        params = SamplingParams.coerce(params)
        ids = [int(t) for t in prompt_token_ids]
        self.llm.check_request(ids, params)
        need = self._rounded(min(len(ids) + params.max_tokens, self.llm.max_model_len))
        if need > self._rounded(self.pool_tokens):
            raise RequestError(f"the request needs {need} KV tokens; the decode KV pool holds {self.pool_tokens} "
                               f"(max_num_seqs x max_model_len): lower max_tokens")
        req = _Request(id=request_id or f"req-{next(self._ids)}", prompt=prompt,
                       seq=SequenceState(self.llm.tokenizer, ids, params, self.llm.max_model_len), need=need,
                       arrival_host=time.perf_counter())
        with self._lock:
            if len(self.waiting) + len(self._inbox) >= self.max_waiting:
                raise QueueFullError(f"{len(self.waiting) + len(self._inbox)} requests are already waiting "
                                     f"(max_waiting {self.max_waiting}); retry later")
            self._inbox.append(req)
        return req.id

    def abort(self, request_id: str) -> None:
        """Drop a request (waiting or running) at the next step; its KV cache is freed."""
        with self._lock:
            self._aborts.add(request_id)

    # ---- state -------------------------------------------------------------------------
    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        with self._lock:
            return len(self.waiting) + len(self._inbox)

    @property
    def kv_cache_usage(self) -> float:
        """Fraction of the decode KV pool reserved by running requests."""
        return self.reserved / self._rounded(self.pool_tokens)

    def has_unfinished(self) -> bool:
        return bool(self.running) or self.num_waiting > 0

    def _rounded(self, tokens: int) -> int:
        """KV tokens a cache of ``tokens`` takes: whole slots on every PE row."""
        return -(-tokens // self.rows) * self.rows

    # ---- one step ----------------------------------------------------------------------
    def step(self) -> list[TokenEvent]:
        """Admit, prefill the newcomers, decode one token for every running request."""
        events = self._take_inbox()
        new = self._admit()
        if new:
            events += self._prefill(new)
        batch = [r for r in self.running if not r.seq.finished]
        if batch:
            events += self._decode(batch)
        return events

    def _take_inbox(self) -> list[TokenEvent]:
        now = self.model.ledger.cycles
        with self._lock:
            while self._inbox:
                req = self._inbox.popleft()
                req.arrival_cycles = now
                self.waiting.append(req)
            aborts, self._aborts = self._aborts, set()
        events = []
        if aborts:
            for req in [r for r in self.waiting if r.id in aborts]:
                self.waiting.remove(req)
                req.aborted = True
                events.append(self._finish(req))
            for req in [r for r in self.running if r.id in aborts]:
                req.aborted = True
                events.append(self._finish(req))
        return events

    def _admit(self) -> list[_Request]:
        new: list[_Request] = []
        prompt_tokens = 0
        while self.waiting:
            req = self.waiting[0]
            n = len(req.seq.prompt_ids)
            if not joins_block(len(self.running), len(new), prompt_tokens, n, self.max_num_seqs, self.prompt_budget):
                break  # the batch is full, or the next prefill block takes it
            if self.reserved + req.need > self._rounded(self.pool_tokens):
                break  # first come, first served: wait for running requests to leave
            try:
                req.slot = self.model.open_seq(req.need)
            except SRAMOverflowError:
                if self.running or new:
                    break
                raise
            self.waiting.popleft()
            self.reserved += req.need
            prompt_tokens += n
            new.append(req)
        return new

    def _prefill(self, new: list[_Request]) -> list[TokenEvent]:
        led, model = self.model.ledger, self.model
        mark = led.mark()
        t0 = time.perf_counter()
        logits = model.prefill_many([(r.slot, r.seq.prompt_ids, r.seq.params.prompt_logprobs is not None)
                                     for r in new])
        t1 = time.perf_counter()
        energy = self._energy(led.since(mark))
        total = sum(len(r.seq.prompt_ids) for r in new)
        self.running += new
        events = []
        for req, lg in zip(new, logits):
            lg = np.asarray(lg)
            k = req.seq.params.prompt_logprobs
            if k is not None:
                req.prompt_logprobs = prompt_logprobs(lg, req.seq.prompt_ids, k)
            req.prefill_cycles = model.prefill_began[req.slot]
            req.energy_j += energy * len(req.seq.prompt_ids) / total
            req.t_prefill = t1
            events.append(self._accept(req, lg[-1], model.token_cycles[req.slot]))
        return events

    def _decode(self, batch: list[_Request]) -> list[TokenEvent]:
        led, model = self.model.ledger, self.model
        mark = led.mark()
        logits = model.decode_batch([r.slot for r in batch], [r.seq.token_ids[-1] for r in batch])
        share = self._energy(led.since(mark)) / len(batch)
        events = []
        for req, lg in zip(batch, logits):
            req.energy_j += share
            events.append(self._accept(req, lg, model.token_cycles[req.slot]))
        return events

    def _accept(self, req: _Request, logits: np.ndarray, at_cycles: float) -> TokenEvent:
        tok, text = req.seq.accept(np.asarray(logits).reshape(-1))
        req.token_cycles.append(at_cycles)
        if req.t_first is None:
            req.t_first = time.perf_counter()
        lps = None if req.seq.logprobs is None else [req.seq.logprobs[-1]]
        if req.seq.finished:
            ev = self._finish(req)
            return TokenEvent(req.id, [tok], text, lps, True, ev.output)
        return TokenEvent(req.id, [tok], text, lps, False)

    def _finish(self, req: _Request) -> TokenEvent:
        """Retire a request: free its slot and pool share; its output with both clocks' figures."""
        if req in self.running:
            self.running.remove(req)
            self.reserved -= req.need
        if req.slot is not None:
            self.model.close_seq(req.slot)
            req.slot = None
        t_end = time.perf_counter()
        metrics = host_metrics(len(req.seq.prompt_ids), len(req.seq.token_ids), req.arrival_host,
                               req.t_prefill or t_end, req.t_first or t_end, t_end)
        metrics["wafer"] = self._wafer_metrics(req)
        out = req.seq.output(req.prompt, req.prompt_logprobs, metrics)
        if req.aborted:
            out.finish_reason = "abort"
        return TokenEvent(req.id, [], "", None, True, out)

    def _wafer_metrics(self, req: _Request) -> dict:
        secs = self.model.wafer.cycles_to_seconds
        arrival = req.arrival_cycles if req.arrival_cycles is not None else req.prefill_cycles
        times = req.token_cycles
        if not times:
            return {"queue_s": None, "ttft_s": None, "tpot_s": None, "decode_tokens_per_s": None, "e2e_s": None,
                    "energy_j": req.energy_j}
        tpot = secs(times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else None
        return {"queue_s": secs(req.prefill_cycles - arrival), "ttft_s": secs(times[0] - arrival), "tpot_s": tpot,
                "decode_tokens_per_s": 1.0 / tpot if tpot else None, "e2e_s": secs(times[-1] - arrival),
                "energy_j": req.energy_j}

    def _energy(self, delta: dict) -> float:
        return float(sum(self.model.ledger.energy_breakdown_j(delta).values()))

    # ---- offline use -------------------------------------------------------------------
    def run_to_completion(self, on_event=None) -> dict[str, RequestOutput]:
        """Step until every queued request has finished; returns their outputs by id."""
        done: dict[str, RequestOutput] = {}
        while self.has_unfinished():
            for ev in self.step():
                if on_event is not None:
                    on_event(ev)
                if ev.finished and ev.output is not None:
                    done[ev.request_id] = ev.output
        return done


# ---- shape-only: the same policy, predicted for any model ------------------------------------


def predict_batch(config, wafer, run, input_len: int, output_len: int, requests: int) -> dict:
    """``requests`` identical requests arriving together, served by the scheduler's policy on
    a dry (shape-only) model: admitted up to ``run.max_num_seqs`` at a time in prefill blocks
    of at most the planned prompt length, each block followed by one decode step of every
    running request, until each has ``output_len`` tokens. Returns per-request and aggregate
    predicted figures, from the program executed."""
    from waferllm.engine.wafer import WaferModel

    wm = WaferModel(config, None, wafer, run, mode="dry")
    wm.close_seq(0)
    secs = wm.wafer.cycles_to_seconds
    waiting = list(range(requests))
    running: dict[int, int] = {}  # slot -> tokens so far
    times: dict[int, list[float]] = {}
    start = wm.ledger.cycles
    full_steps: list[float] = []
    while waiting or running:
        block = []
        while waiting and joins_block(len(running), len(block), len(block) * input_len, input_len, run.max_num_seqs,
                                      run.prompt_len or run.max_seq_len):
            waiting.pop(0)
            block.append(wm.open_seq(input_len + output_len))
        if block:
            wm.prefill_many([(s, input_len, False) for s in block])
            for s in block:
                running[s], times[s] = 1, [wm.token_cycles[s]]
        active = [s for s, n in running.items() if n < output_len]
        if active:
            before = wm.ledger.cycles
            wm.decode_batch(active, [None] * len(active))
            if len(active) == min(requests, run.max_num_seqs) and not waiting:
                full_steps.append(wm.ledger.cycles - before)  # the batch in steady state
            for s in active:
                running[s] += 1
                times[s].append(wm.token_cycles[s])
        for s in [s for s, n in running.items() if n >= output_len]:
            wm.close_seq(s)
            del running[s]
    ttft = [secs(t[0] - start) for t in times.values()]
    tpot = [secs(t[-1] - t[0]) / (len(t) - 1) for t in times.values() if len(t) > 1]
    makespan = secs(wm.ledger.cycles - start)
    step = secs(sum(full_steps) / len(full_steps)) if full_steps else None
    batch = min(requests, run.max_num_seqs)
    return {"requests": requests, "max_num_seqs": run.max_num_seqs, "decode_regions": len(wm.decode_stages),
            "micro_batches": min(batch, len(wm.decode_stages)),
            "ttft_s_mean": sum(ttft) / len(ttft), "ttft_s_max": max(ttft),
            # first token to last, waiting for the others' prefills and the transition included
            "tpot_s_mean": sum(tpot) / len(tpot) if tpot else None,
            # a decode step with the whole batch in flight: each request's token rate, and all of them
            "decode_step_s": step, "decode_tokens_per_s_per_request": 1.0 / step if step else None,
            "decode_tokens_per_s": batch / step if step else None,
            "output_tokens_per_s": requests * output_len / makespan, "makespan_s": makespan,
            "energy_j_per_request": float(sum(wm.ledger.energy_breakdown_j().values())) / requests}
