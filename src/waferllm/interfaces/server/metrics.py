"""Prometheus metrics with vLLM's names under a ``waferllm:`` prefix.

Each app has its own ``CollectorRegistry`` (two servers in one process, e.g. in tests, do
not share counts). Gauges read the scheduler (and the wafer's clock) when scraped. Host-measured latencies are
timed in the HTTP handler (from the request's arrival); the ``wafer_`` histograms hold what
the engine predicts the wafer would take for the same request.

Counting: prompt tokens when a request's prefill has run (its first token arrived; each of
``n`` choices prefills its prompt), generation tokens as they arrive, a request in
``request_success_total`` when it ends, with ``finished_reason`` stop, length or abort
(a client gone, a timeout, an engine error).
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

#: seconds, from a wafer's microseconds per token to a host's minutes per request
BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
           2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServerMetrics:
    def __init__(self, model_name: str, scheduler=None, wafer_clock=None):
        self.registry = r = CollectorRegistry()
        self.model_name = model_name
        lab = ["model_name"]

        def gauge(name, doc, fn):
            g = Gauge(f"waferllm:{name}", doc, lab, registry=r).labels(model_name)
            if scheduler is not None:
                g.set_function(fn)
            return g

        gauge("num_requests_running", "Requests in the running batch.", lambda: scheduler.num_running)
        gauge("num_requests_waiting", "Requests waiting to be admitted.", lambda: scheduler.num_waiting)
        gauge("kv_cache_usage_perc", "Fraction of the decode KV pool in use (1 = full).",
              lambda: scheduler.kv_cache_usage)
        if wafer_clock is not None:  # a load client's wafer makespan: the difference of two scrapes
            Gauge("waferllm:wafer_clock_seconds", "Predicted wafer busy time so far (the clock the wafer figures "
                  "are read on; it advances only while the wafer works).", lab,
                  registry=r).labels(model_name).set_function(wafer_clock)
        self.prompt_tokens = Counter("waferllm:prompt_tokens_total", "Prompt tokens prefilled.", lab,
                                     registry=r).labels(model_name)
        self.generation_tokens = Counter("waferllm:generation_tokens_total", "Tokens generated.", lab,
                                         registry=r).labels(model_name)
        self.success = Counter("waferllm:request_success_total", "Requests ended, by finished_reason.",
                               lab + ["finished_reason"], registry=r)

        def hist(name, doc):
            return Histogram(f"waferllm:{name}", doc, lab, buckets=BUCKETS, registry=r).labels(model_name)

        self.ttft = hist("time_to_first_token_seconds", "Host-measured time to the first token.")
        self.itl = hist("inter_token_latency_seconds", "Host-measured time between tokens.")
        self.e2e = hist("e2e_request_latency_seconds", "Host-measured time from arrival to the last token.")
        self.wafer_ttft = hist("wafer_time_to_first_token_seconds", "Predicted wafer time to the first token.")
        self.wafer_itl = hist("wafer_inter_token_latency_seconds", "Predicted wafer time between tokens (TPOT).")
        self.wafer_e2e = hist("wafer_e2e_request_latency_seconds", "Predicted wafer time of the whole request.")

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def timer(self, n_prompt_tokens: int, arrival: float | None = None) -> "RequestTimer":
        return RequestTimer(self, n_prompt_tokens, arrival)


class RequestTimer:
    """One engine request's host timings, recorded into the metrics as its events arrive."""

    def __init__(self, m: ServerMetrics, n_prompt: int, arrival: float | None = None):
        self.m, self.n_prompt = m, n_prompt
        self.t0 = time.perf_counter() if arrival is None else arrival
        self.first: float | None = None
        self.last: float | None = None
        self.done = False

    def tokens(self, n: int) -> None:
        if n <= 0:
            return
        now = time.perf_counter()
        if self.first is None:
            self.first = now
            self.m.prompt_tokens.inc(self.n_prompt)
            self.m.ttft.observe(now - self.t0)
            gaps = [0.0] * (n - 1)  # tokens that arrive with the first one
        else:
            gaps = [(now - self.last) / n] * n  # tokens that arrive together share the gap since the last
        for g in gaps:
            self.m.itl.observe(g)
        self.last = now
        self.m.generation_tokens.inc(n)

    def finish(self, finish_reason: str, wafer: dict | None, n_generated: int) -> None:
        if self.done:
            return
        self.done = True
        self.m.e2e.observe(time.perf_counter() - self.t0)
        self.m.success.labels(self.m.model_name, finish_reason).inc()
        wafer = wafer or {}
        if wafer.get("ttft_s") is not None:
            self.m.wafer_ttft.observe(wafer["ttft_s"])
        if wafer.get("tpot_s") is not None:
            for _ in range(max(0, n_generated - 1)):
                self.m.wafer_itl.observe(wafer["tpot_s"])
        if wafer.get("e2e_s") is not None:
            self.m.wafer_e2e.observe(wafer["e2e_s"])

    def abort(self) -> None:
        if not self.done:
            self.done = True
            self.m.success.labels(self.m.model_name, "abort").inc()
