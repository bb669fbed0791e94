"""The serving load client behind ``waferllm bench serve``: streamed completions against an
OpenAI-compatible server, host-measured and predicted-wafer latency and throughput.

Requests arrive as a Poisson process at ``request_rate`` per second (``inf``: all at once),
at most ``concurrency`` in flight. Each streams ``/v1/completions`` with
``stream_options.include_usage``; the host figures are timed on the client (TTFT to the
first text, ITL between text chunks, TPOT = (E2EL - TTFT) / (tokens - 1), E2EL to the end
of the stream), the wafer figures come from the final usage chunk's ``usage.wafer`` (what
the engine predicts the wafer would take). Wafer throughput is the output tokens over the
wafer's busy time during the run: the difference of the server's
``waferllm:wafer_clock_seconds`` scraped from ``/metrics`` before and after (a server without
it gets no wafer throughput; nothing is estimated).
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from dataclasses import dataclass, field

import numpy as np

from waferllm.errors import RequestError

#: prompts of varied length and topic; a run draws from them with its seed
PROMPTS = (
    "The wafer-scale engine is",
    "Write a short story about a robot who learns to paint.",
    "Explain why the sky is blue in two sentences.",
    "List three uses of a 2D mesh of processors:",
    "Once upon a time, in a city made of glass,",
    "The capital of France is",
    "Summarise the benefits of on-chip memory for inference.",
    "Translate to French: the cat sleeps on the warm chair.",
    "def fibonacci(n):",
    "A haiku about silicon:",
    "The three laws of thermodynamics are",
    "Give a recipe for a simple tomato soup.",
)

PERCENTILES = (50, 90, 99)


@dataclass
class Result:
    """One request, as the client saw it."""

    ok: bool = False
    error: str | None = None
    start: float = 0.0
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)
    e2e: float | None = None
    prompt_tokens: int = 0
    output_tokens: int = 0
    wafer: dict | None = None


def _error_text(status: int, body: bytes) -> str:
    try:
        msg = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        msg = body[:200].decode("utf-8", "replace")
    return f"HTTP {status}: {msg}"


async def _one(client, url: str, payload: dict, t_origin: float) -> Result:
    r = Result(start=time.perf_counter() - t_origin)
    t0 = time.perf_counter()
    last = None
    try:
        async with client.stream("POST", url, json=payload) as resp:
            if resp.status_code != 200:
                r.error = _error_text(resp.status_code, await resp.aread())
                return r
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    r.error = f"stream error: {chunk['error'].get('message')}"
                    return r
                now = time.perf_counter()
                if any(c.get("text") for c in chunk.get("choices", [])):
                    if r.ttft is None:
                        r.ttft = now - t0
                    else:
                        r.itl.append(now - last)
                    last = now
                if chunk.get("usage"):
                    u = chunk["usage"]
                    r.prompt_tokens, r.output_tokens = u.get("prompt_tokens", 0), u.get("completion_tokens", 0)
                    r.wafer = u.get("wafer")
    except Exception as exc:  # noqa: BLE001 - a failed request is a result (connection refused, reset, timeout)
        r.error = f"{type(exc).__name__}: {exc}"
        return r
    r.e2e = time.perf_counter() - t0
    r.ok = r.wafer is not None or r.output_tokens > 0
    if not r.ok:
        r.error = "the stream ended without a usage chunk"
    return r


WAFER_CLOCK = "waferllm:wafer_clock_seconds"


async def _wafer_clock(client, base_url: str) -> float | None:
    """The server's wafer clock (seconds), or None when it reports none."""
    from prometheus_client.parser import text_string_to_metric_families

    root = base_url[:-3] if base_url.endswith("/v1") else base_url
    try:
        resp = await client.get(root + "/metrics")
        if resp.status_code != 200:
            return None
        for fam in text_string_to_metric_families(resp.text):
            for sample in fam.samples:
                if sample.name == WAFER_CLOCK:
                    return float(sample.value)
    except Exception:  # noqa: BLE001 - no metrics, or not Prometheus text: no wafer throughput
        return None
    return None


async def _run(base_url: str, model: str, prompts: list[str], max_tokens: int, concurrency: int, rate: float,
               seed: int, ignore_eos: bool, temperature: float, timeout_s: float):
    """(results, host duration, wafer busy seconds or None)."""
    import httpx

    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0 / rate, len(prompts)) if math.isfinite(rate) else np.zeros(len(prompts))
    sem = asyncio.Semaphore(concurrency)
    url = base_url.rstrip("/") + "/completions"
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout_s, connect=10.0), limits=limits) as client:
        clock0 = await _wafer_clock(client, base_url)
        t_origin = time.perf_counter()

        async def one(i: int, prompt: str) -> Result:
            async with sem:
                payload = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": True,
                           "stream_options": {"include_usage": True}, "temperature": temperature,
                           "seed": seed + i, "ignore_eos": ignore_eos}
                return await _one(client, url, payload, t_origin)

        tasks = []
        for i, (prompt, gap) in enumerate(zip(prompts, gaps)):
            if gap > 0:
                await asyncio.sleep(float(gap))
            tasks.append(asyncio.create_task(one(i, prompt)))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - t_origin
        clock1 = await _wafer_clock(client, base_url)
        busy = clock1 - clock0 if clock0 is not None and clock1 is not None else None
        return list(results), duration, busy


def _stats(values) -> dict | None:
    v = np.asarray([x for x in values if x is not None], dtype=float)
    if v.size == 0:
        return None
    return {"mean": float(v.mean()), **{f"p{p}": float(np.percentile(v, p)) for p in PERCENTILES}}


def summarise(results: list[Result], duration_s: float, wafer_busy_s: float | None) -> dict:
    """Host and predicted-wafer percentiles (milliseconds) and throughputs of a run."""
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    tpot = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.ttft is not None and r.output_tokens > 1]
    ms = (lambda xs: [x * 1e3 for x in xs])
    host = {"ttft_ms": _stats(ms(r.ttft for r in ok)), "tpot_ms": _stats(ms(tpot)),
            "itl_ms": _stats(ms(g for r in ok for g in r.itl)), "e2el_ms": _stats(ms(r.e2e for r in ok)),
            "request_throughput": len(ok) / duration_s if duration_s > 0 else None,
            "output_throughput": out_tokens / duration_s if duration_s > 0 else None}
    w = [r.wafer for r in ok if r.wafer]
    # the wafer's gap between tokens is the request's TPOT, once per token after the first
    itl = [r.wafer.get("tpot_s") for r in ok if r.wafer for _ in range(max(0, r.output_tokens - 1))]
    wafer = {"ttft_ms": _stats(ms(x.get("ttft_s") for x in w)), "tpot_ms": _stats(ms(x.get("tpot_s") for x in w)),
             "itl_ms": _stats(ms(x for x in itl if x is not None)),
             "e2el_ms": _stats(ms(x.get("e2e_s") for x in w)),  # from the arrival: includes the queue
             "energy_j": sum(x.get("energy_j") or 0.0 for x in w) or None}
    span = wafer_busy_s if wafer_busy_s and wafer_busy_s > 0 else None
    wafer.update(busy_s=span, request_throughput=len(w) / span if span else None,
                 output_throughput=sum(r.output_tokens for r in ok if r.wafer) / span if span else None)
    errors: dict[str, int] = {}
    for r in results:
        if not r.ok:
            errors[r.error] = errors.get(r.error, 0) + 1
    return {"completed": len(ok), "failed": len(results) - len(ok), "errors": errors, "duration_s": duration_s,
            "prompt_tokens": sum(r.prompt_tokens for r in ok), "output_tokens": out_tokens, "host": host,
            "wafer": wafer}


def run_load(base_url: str, model: str, num_prompts: int = 32, concurrency: int = 8, request_rate: float = math.inf,
             max_tokens: int = 32, seed: int = 0, ignore_eos: bool = True, temperature: float = 0.0,
             prompts: list[str] | None = None, timeout_s: float = 600.0) -> dict:
    """Run the load and summarise it (see :func:`summarise`); ``prompts`` default to :data:`PROMPTS`."""
    if num_prompts < 1 or concurrency < 1 or max_tokens < 1:
        raise RequestError("--num-prompts, --concurrency and --max-tokens must each be at least 1")
    if not request_rate > 0:
        raise RequestError(f"--request-rate must be a positive number of requests per second or inf, "
                           f"got {request_rate}")
    pool = list(prompts or PROMPTS)
    if not pool:
        raise RequestError("no prompts to send")
    rng = np.random.default_rng(seed)
    chosen = [pool[int(i)] for i in rng.integers(0, len(pool), num_prompts)]
    results, duration, busy = asyncio.run(_run(base_url, model, chosen, max_tokens, concurrency, request_rate, seed,
                                               ignore_eos, temperature, timeout_s))
    out = summarise(results, duration, busy)
    out["config"] = {"base_url": base_url, "model": model, "num_prompts": num_prompts, "concurrency": concurrency,
                     "request_rate": None if math.isinf(request_rate) else request_rate, "max_tokens": max_tokens,
                     "seed": seed, "ignore_eos": ignore_eos, "temperature": temperature}
    return out


def render(summary: dict, console) -> None:
    """The summary as a rich table (milliseconds) and a few lines of throughput."""
    from rich.table import Table

    c = summary["config"]
    rate = "inf" if c["request_rate"] is None else f"{c['request_rate']:g}/s"
    t = Table(title=f"{c['num_prompts']} requests to {c['model']}, concurrency {c['concurrency']}, rate {rate}, "
                    f"{c['max_tokens']} tokens each")
    for col in ("metric", "where", "mean", "p50", "p90", "p99"):
        t.add_column(col, justify="left" if col in ("metric", "where") else "right")
    for key, label in (("ttft_ms", "TTFT ms"), ("tpot_ms", "TPOT ms"), ("itl_ms", "ITL ms"), ("e2el_ms", "E2EL ms")):
        for where in ("host", "wafer"):
            s = summary[where][key]
            cells = ["-"] * 4 if s is None else [_fmt(s["mean"])] + [_fmt(s[f"p{p}"]) for p in PERCENTILES]
            t.add_row(label, where if where == "host" else "wafer (predicted)", *cells)
    console.print(t)
    h, w = summary["host"], summary["wafer"]
    console.print(f"completed {summary['completed']}, failed {summary['failed']}; host duration "
                  f"{summary['duration_s']:.2f} s; {summary['output_tokens']} output tokens", highlight=False)
    console.print(f"throughput host: {_fmt(h['request_throughput'])} req/s, {_fmt(h['output_throughput'])} output "
                  f"tok/s; wafer (predicted): {_fmt(w['request_throughput'])} req/s, "
                  f"{_fmt(w['output_throughput'])} output tok/s"
                  + (f" (wafer busy {w['busy_s'] * 1e3:.3g} ms)" if w["busy_s"] else " (the server reports no wafer "
                                                                                     "clock)"),
                  highlight=False)
    for err, n in summary["errors"].items():
        console.print(f"[red]{n} x {err}[/]", highlight=False)


def _fmt(v) -> str:
    if v is None:
        return "-"
    return f"{v:.3g}" if abs(v) < 100 else f"{v:,.0f}"
