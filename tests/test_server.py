"""`waferllm serve`: a real uvicorn server on 127.0.0.1, driven by the official openai client.

One server (module-scoped) runs the embedded SmolLM2 on small fixed grids with a short
context; every expected figure (token counts, token ids, counters) is computed here
independently: from the tokenizer, or from the same prompt run alone.
"""

from __future__ import annotations

import asyncio
import json
import math
import socket
import threading
import time

import httpx
import openai
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from waferllm import LLM
from waferllm.interfaces.server import ServingEngine, create_app

pytestmark = pytest.mark.timeout(180)

NAME = "smol-test"
MAX_LEN = 64
PROMPTS = ["The wafer-scale engine is", "Once upon a time", "The capital of France is", "def add(a, b):"]
SEQS, WAITING = 8, 16  # 16 concurrent streams fit: they all arrive before a step admits any
M = 5  # tokens per request where the length does not matter
GREEDY = {"temperature": 0}
IDS = {"return_tokens_as_token_ids": True, "ignore_eos": True}  # vLLM's extras: exact ids, fixed lengths


class _Uvicorn:
    """uvicorn in a thread on a free port of 127.0.0.1, stopped with should_exit."""

    def __init__(self, app, lifespan: str = "on"):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan=lifespan,
                                                    timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()
        assert not self.thread.is_alive(), "the server did not stop"


@pytest.fixture(scope="module")
def llm(smollm):
    return LLM(smollm, wafer="wse2", prefill_grid=8, decode_grid=8, max_model_len=MAX_LEN, band=False,
               wafer_overrides={"sram_bytes_per_pe": 400_000}, max_num_seqs=SEQS)


@pytest.fixture(scope="module")
def server(llm):
    engine = ServingEngine(llm, max_num_seqs=SEQS, max_waiting=WAITING)
    with _Uvicorn(create_app(engine, NAME, request_timeout_s=60)) as main:
        # the same engine behind a second app with a short timeout (the engine is the main app's)
        with _Uvicorn(create_app(engine, NAME, request_timeout_s=0.3), lifespan="off") as short:
            main.short, main.engine = short, engine
            main.client = openai.OpenAI(base_url=main.url + "/v1", api_key="none", max_retries=0, timeout=60)
            yield main


def _ids(logprobs_tokens) -> list[int]:
    return [int(t.split(":", 1)[1]) for t in logprobs_tokens]


_SOLO: dict = {}


def solo(server, prompt: str, max_tokens: int = M) -> list[int]:
    """The prompt's greedy tokens with nothing else in flight (cached)."""
    if (prompt, max_tokens) not in _SOLO:
        r = server.client.completions.create(model=NAME, prompt=prompt, max_tokens=max_tokens, logprobs=0,
                                             extra_body=IDS, **GREEDY)
        _SOLO[(prompt, max_tokens)] = _ids(r.choices[0].logprobs.tokens)
    return _SOLO[(prompt, max_tokens)]


def _metrics(url: str) -> dict:
    """{(sample name, labels without model_name): value} from /metrics, parsed by prometheus_client."""
    out = {}
    for fam in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for s in fam.samples:
            labels = tuple(sorted((k, v) for k, v in s.labels.items() if k != "model_name"))
            out[(s.name, labels)] = s.value
    return out


def _wait_idle(url: str, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        m = _metrics(url)
        if m[("waferllm:num_requests_running", ())] == 0 and m[("waferllm:num_requests_waiting", ())] == 0:
            return m
        assert time.monotonic() < deadline, f"requests still in flight: {m}"
        time.sleep(0.1)


# ---------------------------------------------------------------------------- endpoints


def test_models_health_tokenize(server, llm):
    models = server.client.models.list().data
    assert [m.id for m in models] == [NAME] and models[0].model_extra["max_model_len"] == MAX_LEN
    assert httpx.get(server.url + "/health").status_code == 200
    text = "Wafer-scale inference, tokenized."
    r = httpx.post(server.url + "/tokenize", json={"model": NAME, "prompt": text}).json()
    assert r["tokens"] == llm.tokenizer.encode(text) and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == MAX_LEN
    msgs = [{"role": "user", "content": "Hi"}]
    r = httpx.post(server.url + "/tokenize", json={"messages": msgs}).json()
    assert r["tokens"] == llm.encode_prompt(msgs, chat=True)[1]
    d = httpx.post(server.url + "/detokenize", json={"tokens": llm.tokenizer.encode(text, add_special_tokens=False)})
    assert d.json() == {"prompt": text}


def test_completion_usage_and_wafer_timings(server, llm):
    prompt = PROMPTS[0]
    r = server.client.completions.create(model=NAME, prompt=prompt, max_tokens=M, logprobs=0, extra_body=IDS,
                                         **GREEDY)
    ids = _SOLO[(prompt, M)] = _ids(r.choices[0].logprobs.tokens)  # nothing else in flight: a solo run
    assert r.choices[0].text == llm.tokenizer.decode(ids) and len(ids) == M
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(llm.tokenizer.encode(prompt))
    assert (r.usage.completion_tokens, r.usage.total_tokens) == (M, r.usage.prompt_tokens + M)
    w, t = r.usage.model_extra["wafer"], r.model_extra["time_info"]
    assert 0 <= w["queue_s"] < w["ttft_s"] < w["e2e_s"] and 0 < w["tpot_s"] and w["energy_j"] > 0
    assert w["decode_tokens_per_s"] == pytest.approx(1 / w["tpot_s"])
    assert w["e2e_s"] == pytest.approx(w["ttft_s"] + (M - 1) * w["tpot_s"])  # the first token, then M - 1 gaps
    assert t["total_time"] == pytest.approx(w["e2e_s"])  # from the arrival, the queue included
    assert t["queue_time"] + t["prompt_time"] + t["completion_time"] == pytest.approx(t["total_time"])


def test_streamed_chat_with_usage_and_logprobs(server, llm):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a wafer?"}]
    stream = server.client.chat.completions.create(
        model=NAME, messages=msgs, max_completion_tokens=5, stream=True, stream_options={"include_usage": True},
        logprobs=True, top_logprobs=2, extra_body=IDS, **GREEDY)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    body, usage = chunks[1:-1], chunks[-1]
    assert usage.choices == [] and all(c.usage is None for c in chunks[:-1])
    text = "".join(c.choices[0].delta.content or "" for c in body)
    entries = [e for c in body if c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    ids = _ids(e.token for e in entries)
    assert text == llm.tokenizer.decode(ids) and len(ids) == 5 == usage.usage.completion_tokens
    assert usage.usage.prompt_tokens == len(llm.encode_prompt(msgs, chat=True)[1])
    assert body[-1].choices[0].finish_reason == "length"
    for e in entries:  # greedy: the chosen token is the most likely one, listed first
        assert len(e.top_logprobs) == 2 and e.top_logprobs[0].token == e.token
        assert e.logprob == e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob
    assert usage.usage.model_extra["wafer"]["ttft_s"] > 0 and usage.model_extra["time_info"]["total_time"] > 0


def test_completion_logprobs(server, llm):
    r = server.client.completions.create(model=NAME, prompt=PROMPTS[2], max_tokens=4, logprobs=3, **GREEDY)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert "".join(lp.tokens) == r.choices[0].text and lp.text_offset == [0] + [
        sum(len(t) for t in lp.tokens[:i]) for i in range(1, 4)]
    for tok, chosen, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert 3 <= len(top) <= 4 and top[tok] == chosen == max(top.values())
        assert sum(math.exp(v) for v in top.values()) <= 1 + 1e-6


def test_stop_string(server, llm):
    ids = solo(server, PROMPTS[1])
    full = llm.tokenizer.decode(ids)
    stop = llm.tokenizer.decode(ids[:4])[len(llm.tokenizer.decode(ids[:2])):]  # tokens 3-4, cut there
    assert stop.strip() and stop in full
    r = server.client.completions.create(model=NAME, prompt=PROMPTS[1], max_tokens=M, stop=[stop], **GREEDY)
    c = r.choices[0]
    assert c.text == full[:full.index(stop)] and c.finish_reason == "stop" and c.model_extra["stop_reason"] == stop


def test_n_choices_use_seed_plus_i(server):
    kw = dict(model=NAME, prompt=PROMPTS[3], max_tokens=3, temperature=1.0, top_p=0.9)
    both = server.client.completions.create(n=2, seed=11, **kw)
    assert [c.index for c in both.choices] == [0, 1]
    for i in (0, 1):
        alone = server.client.completions.create(seed=11 + i, **kw)
        assert both.choices[i].text == alone.choices[0].text


# ---------------------------------------------------------------------------- refusals

BAD = [
    ({"model": "no-such-model", "prompt": "x"}, 404, "model", "model_not_found"),
    ({"model": NAME, "prompt": "x", "max_tokens": -1}, 400, "max_tokens", None),
    ({"model": NAME, "prompt": "x", "max_tokens": 0}, 400, "max_tokens", None),
    ({"model": NAME, "prompt": "x", "presence_penalty": 0.5}, 400, "presence_penalty", "unsupported_parameter"),
    ({"model": NAME, "prompt": "x", "logit_bias": {"1": 5}}, 400, "logit_bias", "unsupported_parameter"),
    ({"model": NAME, "prompt": "x", "echo": True}, 400, "echo", "unsupported_parameter"),
    ({"model": NAME, "prompt": "x", "best_of": 3}, 400, "best_of", "unsupported_parameter"),
    ({"model": NAME, "prompt": "x", "frobnicate": 1}, 400, "frobnicate", "unrecognized_argument"),
    ({"model": NAME, "prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options", None),
    ({"model": NAME, "prompt": "x", "temperature": "hot"}, 400, "temperature", None),
]


@pytest.mark.parametrize("body,status,param,code", BAD, ids=[b[2] for b in BAD])
def test_bad_completion_requests(server, body, status, param, code):
    r = httpx.post(server.url + "/v1/completions", json=body)
    err = r.json()["error"]
    assert r.status_code == status and err["param"] == param and err["code"] == code
    assert err["type"] == "invalid_request_error" and err["message"]


def test_bad_requests_through_the_client(server, llm):
    c = server.client
    with pytest.raises(openai.NotFoundError, match="The model `gpt-4` does not exist"):
        c.completions.create(model="gpt-4", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="tools is not supported"):
        c.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "x"}], max_tokens=2,
                                  tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])
    long = "wafer " * 80
    n = len(llm.tokenizer.encode(long))
    assert n >= MAX_LEN
    with pytest.raises(openai.BadRequestError, match=f"the prompt has {n} tokens; max_model_len is {MAX_LEN}"):
        c.completions.create(model=NAME, prompt=long, max_tokens=2)
    n = len(llm.tokenizer.encode(PROMPTS[0]))
    with pytest.raises(openai.BadRequestError, match=f"lower max_tokens to at most {MAX_LEN - n}"):
        c.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=MAX_LEN)
    r = httpx.post(server.url + "/v1/chat/completions", content=b'{"model": "x", "messages": [',
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": NAME, "messages": [{"role": "tool"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].role"


# ---------------------------------------------------------------------------- load, queue, aborts


async def _stream_ids(client, prompt: str, max_tokens: int):
    """A streamed greedy completion's token ids, or the error that refused it."""
    try:
        stream = await client.completions.create(model=NAME, prompt=prompt, max_tokens=max_tokens, stream=True,
                                                 logprobs=0, extra_body=IDS, **GREEDY)
        ids = []
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].logprobs:
                ids += _ids(chunk.choices[0].logprobs.tokens)
        return ids
    except openai.APIStatusError as exc:
        return exc


def test_concurrent_streams_equal_solo_runs(server):
    want = {p: solo(server, p) for p in PROMPTS}
    before = _metrics(server.url)

    async def load():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0,
                                      timeout=120) as client:
            out = []
            for _ in range(2):  # two rounds of 16 concurrent streams
                prompts = [PROMPTS[i % len(PROMPTS)] for i in range(16)]
                got = await asyncio.gather(*[_stream_ids(client, p, M) for p in prompts])
                out += list(zip(prompts, got))
            return out

    results = asyncio.run(asyncio.wait_for(load(), 120))
    assert len(results) == 32  # none lost, none refused (16 fit the queue), each as if alone
    for prompt, got in results:
        assert got == want[prompt], (prompt, got)
    after = _wait_idle(server.url)
    key = ("waferllm:request_success_total", (("finished_reason", "length"),))
    assert after[key] - before[key] == 32


def test_queue_full_is_429_and_disconnects_abort(server):
    """More streams than the batch and the queue hold: the rest get a 429; then every client
    hangs up and the engine drops their requests (nothing left running or waiting)."""
    before = _wait_idle(server.url)
    total = SEQS + WAITING + 4
    body = {"model": NAME, "prompt": PROMPTS[0], "max_tokens": 40, "stream": True, "ignore_eos": True}

    async def flood():
        async with httpx.AsyncClient(base_url=server.url, timeout=60,
                                     limits=httpx.Limits(max_connections=total)) as client:
            async def open_one():
                req = client.build_request("POST", "/v1/completions", json=body)
                return await client.send(req, stream=True)

            # the first starts a step (its prefill); the rest queue behind it and are all dropped,
            # aborted, before the next step admits any
            resps = [await open_one()]
            resps += await asyncio.gather(*[open_one() for _ in range(total - 1)])
            codes = [r.status_code for r in resps]
            errors = [json.loads(await r.aread())["error"] for r in resps if r.status_code != 200]
            for r in resps:
                await r.aclose()  # hang up: the server aborts what it was running or queueing
            return codes, errors

    codes, errors = asyncio.run(asyncio.wait_for(flood(), 60))
    assert set(codes) <= {200, 429} and codes.count(429) >= total - SEQS - WAITING
    assert all(e["code"] == "queue_full" and e["type"] == "rate_limit_error" for e in errors)
    after = _wait_idle(server.url)
    key = ("waferllm:request_success_total", (("finished_reason", "abort"),))
    assert after.get(key, 0) - before.get(key, 0) == codes.count(200)
    gen = ("waferllm:generation_tokens_total", ())
    assert after[gen] - before[gen] < codes.count(200) * 40  # aborted, not run to the end


def test_request_timeout_aborts(server):
    before = _wait_idle(server.url)
    short = openai.OpenAI(base_url=server.short.url + "/v1", api_key="none", max_retries=0, timeout=30)
    with pytest.raises(openai.APIStatusError, match="timed out") as info:
        short.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=50, extra_body={"ignore_eos": True})
    assert info.value.status_code == 408
    with pytest.raises(openai.APIError, match="timed out"):
        for _ in short.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=50, stream=True,
                                          extra_body={"ignore_eos": True}):
            pass
    after = _wait_idle(server.url)
    gen = ("waferllm:generation_tokens_total", ())
    assert after[gen] - before[gen] < 100


def test_metrics_count_what_was_served(server, llm):
    before = _wait_idle(server.url)
    sent = received = wafer_s = 0
    for prompt, k in ((PROMPTS[0], 3), (PROMPTS[2], 5)):
        r = server.client.completions.create(model=NAME, prompt=prompt, max_tokens=k, extra_body=IDS, **GREEDY)
        sent += len(llm.tokenizer.encode(prompt))
        received += r.usage.completion_tokens
        wafer_s += r.usage.model_extra["wafer"]["e2e_s"]
        assert r.usage.completion_tokens == k
    after = _metrics(server.url)

    def delta(name, labels=()):
        return after.get((name, labels), 0) - before.get((name, labels), 0)

    assert delta("waferllm:prompt_tokens_total") == sent
    assert delta("waferllm:generation_tokens_total") == received == 8
    assert delta("waferllm:request_success_total", (("finished_reason", "length"),)) == 2
    for h in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "wafer_time_to_first_token_seconds",
              "wafer_e2e_request_latency_seconds"):
        assert delta(f"waferllm:{h}_count") == 2, h
    assert delta("waferllm:inter_token_latency_seconds_count") == received - 2
    assert delta("waferllm:wafer_inter_token_latency_seconds_count") == received - 2
    assert 0 <= after[("waferllm:kv_cache_usage_perc", ())] <= 1
    # one request at a time: the wafer was busy at least for each one's arrival-to-last-token
    assert delta("waferllm:wafer_clock_seconds") >= wafer_s * (1 - 1e-9)


# ---------------------------------------------------------------------------- the command line


def test_bench_serve_load_client(server, capsys):
    from waferllm.interfaces.cli import main

    argv = ["bench", "serve", "--base-url", server.url, "--num-prompts", "3", "--concurrency", "3", "--max-tokens",
            "3", "--seed", "1", "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["completed"], out["failed"], out["output_tokens"]) == (3, 0, 9)
    assert out["config"]["model"] == NAME  # asked from /v1/models
    h, w = out["host"], out["wafer"]
    assert 0 < h["ttft_ms"]["p50"] <= h["ttft_ms"]["p99"] <= h["e2el_ms"]["p99"]
    assert h["output_throughput"] == pytest.approx(9 / out["duration_s"])
    assert 0 < w["ttft_ms"]["p50"] <= w["e2el_ms"]["p50"] and w["busy_s"] > 0
    assert w["output_throughput"] == pytest.approx(9 / w["busy_s"])


def test_serve_refuses_before_loading_the_model(server, capsys):
    from waferllm.interfaces.cli import main

    port = int(server.url.rsplit(":", 1)[1])
    assert main(["serve", "--port", str(port)]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
    assert main(["serve", "--port", "0", "--max-num-seqs", "0"]) == 2
    assert "--max-num-seqs must be at least 1" in capsys.readouterr().err
    assert main(["serve", "--port", "0", "--prefill-grid", "0"]) == 2
    assert "--prefill-grid must be a positive integer" in capsys.readouterr().err
