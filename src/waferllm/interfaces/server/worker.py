"""The bridge between the batching scheduler (one thread) and the HTTP handlers (asyncio).

The scheduler's ``step()`` is synchronous numpy work, so one worker thread owns it: it
sleeps on a condition while nothing is unfinished and otherwise steps, handing each
``TokenEvent`` to the asyncio queue of the HTTP request it belongs to with
``loop.call_soon_threadsafe`` (the only way into another thread's event loop). Handlers
only add and abort requests, both thread-safe in the scheduler.

The worker also enforces each request's deadline, so a request whose handler vanished
(a client gone before its stream started) still ends: by finishing, or by its timeout.
Each request's queue holds at most its own tokens, and the scheduler refuses more than
``max_waiting`` waiting requests, so memory stays bounded.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass

from waferllm.errors import RequestError, WaferLLMError

log = logging.getLogger("waferllm.server")


@dataclass
class _Sink:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    index: int                 # the choice this engine request is, within its HTTP request
    deadline: float | None     # time.monotonic() after which the request is aborted
    timeout_s: float | None


class ServingEngine:
    """A :class:`~waferllm.engine.scheduler.Scheduler` on ``llm`` driven by one worker thread.

    ``submit`` adds engine requests and returns their ids; their events arrive on the given
    asyncio queue as ``(index, TokenEvent)``, or ``(index, error)`` when the request timed
    out or the engine failed (a WaferLLMError; no more items follow for that index)."""

    def __init__(self, llm, max_num_seqs: int | None = None, max_waiting: int = 64):
        from waferllm.engine.scheduler import Scheduler

        self.llm = llm
        # max_num_seqs None: the batch the LLM's KV pool was planned for
        self.scheduler = Scheduler(llm, max_num_seqs=max_num_seqs, max_waiting=max_waiting)
        self.max_num_seqs, self.max_waiting = self.scheduler.max_num_seqs, max_waiting
        self._cv = threading.Condition()
        self._sinks: dict[str, _Sink] = {}
        self._stop = False
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> None:
        if self._thread is None:
            self._stop = False
            self._thread = threading.Thread(target=self._run, name="waferllm-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the worker (after its current step) and abort whatever is left."""
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        with self._cv:
            left = list(self._sinks)
        self.abort(left)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ---------------------------------------------------------------- requests
    def submit(self, requests: list[tuple[list[int], object, str | None]], queue: asyncio.Queue,
               base_id: str, timeout_s: float | None = None) -> list[str]:
        """Add ``(prompt_token_ids, params, prompt)`` requests as one group (``base_id-i``): all
        or none (a refusal, e.g. the queue full, aborts the ones already added)."""
        if not self.alive:
            raise RequestError("the engine is not running", http_status=503, code="engine_not_running",
                               type="server_error")
        loop = asyncio.get_running_loop()
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        rids: list[str] = []
        try:
            for i, (ids, params, prompt) in enumerate(requests):
                rid = f"{base_id}-{i}"
                with self._cv:  # registered first: the worker may emit events before add_request returns
                    self._sinks[rid] = _Sink(loop, queue, i, deadline, timeout_s)
                rids.append(rid)
                self.scheduler.add_request(ids, params, prompt=prompt, request_id=rid)
        except BaseException:
            self.abort(rids)
            raise
        with self._cv:
            self._cv.notify()
        return rids

    def abort(self, rids) -> None:
        """Drop these requests (their KV is freed at the next step); unknown or finished ids are ignored."""
        for rid in rids:
            with self._cv:
                known = self._sinks.pop(rid, None) is not None
            if known:
                self.scheduler.abort(rid)

    # ---------------------------------------------------------------- the worker
    def _run(self) -> None:
        sched = self.scheduler
        while True:
            with self._cv:
                while not self._stop and not sched.has_unfinished():
                    self._cv.wait(timeout=1.0)
                if self._stop:
                    return
            self._expire()
            try:
                events = sched.step()
            except Exception as exc:  # noqa: BLE001 - every request in flight gets the error, the server lives on
                log.exception("engine step failed; aborting the requests in flight")
                err = exc if isinstance(exc, WaferLLMError) else WaferLLMError(
                    f"internal error in the engine ({type(exc).__name__}: {exc})", http_status=500)
                self._fail_all(err)
                with self._cv:  # a step that keeps failing must not spin the core
                    self._cv.wait(timeout=0.5)
                continue
            for ev in events:
                self._dispatch(ev)

    def _dispatch(self, ev) -> None:
        with self._cv:
            sink = self._sinks.get(ev.request_id)
            if sink is not None and ev.finished:
                del self._sinks[ev.request_id]
        if sink is not None:
            self._deliver(ev.request_id, sink, ev)

    def _deliver(self, rid: str, sink: _Sink, item) -> None:
        try:
            sink.loop.call_soon_threadsafe(sink.queue.put_nowait, (sink.index, item))
        except RuntimeError:  # the event loop closed (the server is shutting down): nobody listens
            self.abort([rid])

    def _expire(self) -> None:
        now = time.monotonic()
        with self._cv:
            late = [(rid, s) for rid, s in self._sinks.items() if s.deadline is not None and now >= s.deadline]
        for rid, sink in late:
            self.abort([rid])
            self._deliver(rid, sink, RequestError(f"the request timed out after {sink.timeout_s:g} s (the server's "
                                                  "--request-timeout) and was aborted", http_status=408,
                                                  code="request_timeout", type="timeout_error"))

    def _fail_all(self, err: WaferLLMError) -> None:
        with self._cv:
            sinks = list(self._sinks.items())
        for rid, sink in sinks:
            self.abort([rid])
            self._deliver(rid, sink, err)
