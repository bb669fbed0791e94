"""The OpenAI-compatible HTTP API over a :class:`ServingEngine` (FastAPI).

    app = create_app(ServingEngine(llm, max_waiting=64), "SmolLM2", request_timeout_s=600)

Endpoints: ``/v1/completions``, ``/v1/chat/completions`` (JSON, or SSE ``data: {...}``
chunks ending in ``data: [DONE]``), ``/v1/models``, ``/tokenize``, ``/detokenize`` (vLLM's
shapes), ``/health`` and ``/metrics`` (Prometheus text).

Every response's ``usage`` carries the predicted wafer figures of the request under
``usage.wafer`` and a top-level ``time_info`` (predicted wafer seconds), as a wafer-scale
vendor's API reports them. A request with ``n`` choices runs as ``n`` engine requests;
with a ``seed``, choice ``i`` samples with ``seed + i``.

A request ends when it finishes, when its client goes away (its engine requests are
aborted, freeing their KV), or at the server's request timeout (aborted: a 408, or an
error event in a stream). No traceback reaches a client: a bad request is a 4xx in
OpenAI's error JSON, anything unexpected a 500 with one line.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from contextlib import aclosing, asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from waferllm.errors import WaferLLMError
from waferllm.interfaces.server.metrics import CONTENT_TYPE, ServerMetrics
from waferllm.interfaces.server.protocol import (ParsedRequest, api_error, chat_logprobs, chat_messages,
                                                 completion_logprobs, error_body, error_status, parse_chat,
                                                 parse_completion, time_info, wafer_usage)
from waferllm.interfaces.server.worker import ServingEngine

log = logging.getLogger("waferllm.server")
MAX_BODY_BYTES = 16 << 20   # a request body larger than this is refused (413) before it is parsed
DISCONNECT_POLL_S = 0.5     # how often a waiting handler checks that its client is still there


class _ClientGone(Exception):
    pass


def _dumps(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), default=float).encode("utf-8")


def _json_response(obj, status: int = 200) -> Response:
    return Response(_dumps(obj), status_code=status, media_type="application/json")


async def _read_json(request: Request) -> dict:
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise api_error(f"the request body is larger than {MAX_BODY_BYTES >> 20} MiB", status=413,
                            code="body_too_large")
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks) or b"null")
    except (ValueError, UnicodeDecodeError) as exc:
        raise api_error(f"Malformed JSON in the request body: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise api_error("the request body must be a JSON object", code="invalid_json")
    return body


def create_app(engine: ServingEngine, served_model_name: str, request_timeout_s: float | None = None) -> FastAPI:
    """The app; its lifespan starts the engine's worker thread and stops it at shutdown."""
    llm = engine.llm
    tok = llm.tokenizer
    metrics = ServerMetrics(served_model_name, engine.scheduler, wafer_clock=lambda: llm.backend.ledger.seconds)

    @asynccontextmanager
    async def lifespan(_app):
        engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(engine.stop)

    app = FastAPI(title="waferllm", summary="OpenAI-compatible serving on a simulated wafer", lifespan=lifespan,
                  docs_url=None, redoc_url=None)
    app.state.engine, app.state.metrics, app.state.started = engine, metrics, time.time()

    # ------------------------------------------------------------------ errors
    @app.exception_handler(WaferLLMError)
    async def _wafer_error(_req, exc: WaferLLMError):
        status = error_status(exc)
        return _json_response(error_body(exc, status), status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_req, exc: StarletteHTTPException):
        err = api_error(str(exc.detail), status=exc.status_code,
                        code={404: "not_found", 405: "method_not_allowed"}.get(exc.status_code))
        return _json_response(error_body(err, exc.status_code), exc.status_code)

    @app.exception_handler(Exception)
    async def _internal(_req, exc: Exception):
        log.exception("internal error")  # the traceback goes to the server's log, never to the client
        err = WaferLLMError(f"internal error ({type(exc).__name__}: {exc})")
        return _json_response(error_body(err, 500), 500)

    def check_model(name: str | None) -> None:
        if name is not None and name != served_model_name:
            raise api_error(f"The model `{name}` does not exist. This server serves `{served_model_name}` "
                            "(GET /v1/models).", "model", status=404, code="model_not_found")

    # ------------------------------------------------------------------ info
    @app.get("/health")
    async def health():
        if not engine.alive:
            raise api_error("the engine is not running", status=503, code="engine_not_running", type_="server_error")
        return Response(status_code=200)

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models():
        return _json_response({"object": "list", "data": [{
            "id": served_model_name, "object": "model", "created": int(app.state.started), "owned_by": "waferllm",
            "root": llm.config.name, "parent": None, "max_model_len": llm.max_model_len}]})

    @app.post("/tokenize")
    async def tokenize(request: Request):
        body = await _read_json(request)
        check_model(body.get("model"))
        unknown = set(body) - {"model", "prompt", "messages", "add_special_tokens", "add_generation_prompt",
                               "return_token_strs"}
        if unknown:
            raise api_error(f"Unrecognized request argument supplied: {sorted(unknown)[0]}", sorted(unknown)[0])
        if ("prompt" in body) == ("messages" in body):
            raise api_error("give either prompt (text) or messages (a chat)", "prompt")
        if "messages" in body:
            text = tok.apply_chat_template(chat_messages(body["messages"]),
                                           add_generation_prompt=_flag(body, "add_generation_prompt", True))
            special = _flag(body, "add_special_tokens", False)  # the template writes its own
        else:
            text, special = body["prompt"], _flag(body, "add_special_tokens", True)
            if not isinstance(text, str):
                raise api_error("prompt must be a string", "prompt")
        ids = tok.encode(text, add_special_tokens=special)
        strs = ([tok.id_to_token(t) for t in ids] if _flag(body, "return_token_strs", False) else None)
        return _json_response({"count": len(ids), "max_model_len": llm.max_model_len, "tokens": ids,
                               "token_strs": strs})

    @app.post("/detokenize")
    async def detokenize(request: Request):
        body = await _read_json(request)
        check_model(body.get("model"))
        ids = body.get("tokens")
        vocab = llm.config.vocab_size
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab
                                                for t in ids):
            raise api_error(f"tokens must be a list of token ids in [0, {vocab})", "tokens")
        return _json_response({"prompt": tok.decode(ids)})

    # ------------------------------------------------------------------ generation
    @app.post("/v1/completions")
    async def completions(request: Request):
        arrival = time.perf_counter()
        return await _generate(request, parse_completion(await _read_json(request)), arrival)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        arrival = time.perf_counter()
        return await _generate(request, parse_chat(await _read_json(request)), arrival)

    async def _generate(request: Request, req: ParsedRequest, arrival: float):
        check_model(req.model)
        encoded = [llm.encode_prompt(p, chat=req.chat) for p in req.prompts]
        jobs = []  # choice index = prompt index * n + j
        for text, ids in encoded:
            for j in range(req.n):
                params = req.params(len(ids), llm.max_model_len, j)
                llm.check_request(ids, params)  # the engine's own words for a prompt over the context
                jobs.append((ids, params, text))
        rid = f"{'chatcmpl' if req.chat else 'cmpl'}-{uuid.uuid4().hex}"
        queue: asyncio.Queue = asyncio.Queue()
        timers = [metrics.timer(len(ids), arrival) for ids, _, _ in jobs]
        rids = engine.submit(jobs, queue, rid, request_timeout_s)
        resp = _Response(req, rid, int(time.time()), served_model_name, tok, sum(len(ids) for _, ids in encoded),
                         len(jobs))

        def cleanup() -> None:
            engine.abort(rids)  # nothing for requests that finished
            for t in timers:
                t.abort()

        if req.stream:
            return StreamingResponse(_stream(request, queue, timers, resp, cleanup), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            async with aclosing(_events(request, queue, len(jobs))) as events:
                async for idx, item in events:
                    if isinstance(item, BaseException):
                        raise item
                    _observe(timers[idx], item)
                    resp.add(idx, item)
        except _ClientGone:
            return Response(status_code=499)  # nobody reads it: the requests were aborted
        finally:
            cleanup()
        return _json_response(resp.full())

    async def _stream(request, queue, timers, resp: "_Response", cleanup):
        try:
            for chunk in resp.opening():
                yield _sse(chunk)
            failed = False
            async with aclosing(_events(request, queue, len(timers))) as events:
                async for idx, item in events:
                    if isinstance(item, BaseException):
                        status = error_status(item) if isinstance(item, WaferLLMError) else 500
                        yield _sse(error_body(item, status))
                        failed = True
                        break
                    _observe(timers[idx], item)
                    chunk = resp.add(idx, item)
                    if chunk is not None:
                        yield _sse(chunk)
            if resp.req.include_usage and not failed:
                yield _sse(resp.usage_chunk())
            yield b"data: [DONE]\n\n"
        except _ClientGone:
            pass
        finally:
            cleanup()  # also when the client disconnects: the stream is cancelled here

    return app


def _flag(body: dict, name: str, default: bool) -> bool:
    v = body.get(name, default)
    if not isinstance(v, bool):
        raise api_error(f"{name} must be true or false", name)
    return v


def _sse(obj) -> bytes:
    return b"data: " + _dumps(obj) + b"\n\n"


def _observe(timer, ev) -> None:
    timer.tokens(len(ev.token_ids))
    if ev.finished:
        out = ev.output
        timer.finish(out.finish_reason, (out.metrics or {}).get("wafer"), len(out.token_ids))


async def _events(request: Request, queue: asyncio.Queue, n: int):
    """``(index, TokenEvent | error)`` until all ``n`` requests have finished (or one failed);
    checks every DISCONNECT_POLL_S that the client is still there (raises _ClientGone)."""
    pending = n
    getter = None
    try:
        while pending:
            if getter is None:
                getter = asyncio.ensure_future(queue.get())
            done, _ = await asyncio.wait({getter}, timeout=DISCONNECT_POLL_S)
            if not done:
                if await request.is_disconnected():
                    raise _ClientGone()
                continue
            idx, item = getter.result()
            getter = None
            if isinstance(item, BaseException) or item.finished:
                pending -= 1
            yield idx, item
    finally:
        if getter is not None:
            getter.cancel()


class _Response:
    """Builds one HTTP request's response from its engine requests' events (both shapes, both modes)."""

    def __init__(self, req: ParsedRequest, rid: str, created: int, model: str, tok, prompt_tokens: int, n: int):
        self.req, self.rid, self.created, self.model, self.tok = req, rid, created, model, tok
        self.prompt_tokens = prompt_tokens
        self.texts = [""] * n
        self.outputs: list = [None] * n

    def _head(self, obj: str) -> dict:
        return {"id": self.rid, "object": obj, "created": self.created, "model": self.model}

    def _logprobs(self, token_ids, lps, offset: int):
        if self.req.logprobs is None or lps is None:
            return None
        if self.req.chat:
            return chat_logprobs(self.tok, token_ids, lps, self.req.logprobs, self.req.tokens_as_ids)
        return completion_logprobs(self.tok, token_ids, lps, offset, self.req.tokens_as_ids)

    # ---------------------------------------------------------------- streaming
    def opening(self) -> list[dict]:
        if not self.req.chat:
            return []
        return [self._chunk(i, {"role": "assistant", "content": ""}, None, None) for i in range(len(self.texts))]

    def _chunk(self, idx: int, delta, logprobs, finish) -> dict:
        if self.req.chat:
            choice = {"index": idx, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            out = {**self._head("chat.completion.chunk"), "choices": [choice]}
        else:
            choice = {"index": idx, "text": delta, "logprobs": logprobs, "finish_reason": finish}
            out = {**self._head("text_completion"), "choices": [choice]}
        if self.req.include_usage:
            out["usage"] = None
        return out

    def add(self, idx: int, ev) -> dict | None:
        """Record an event; the stream chunk it makes (None when it adds nothing to say)."""
        offset = len(self.texts[idx])
        self.texts[idx] += ev.text
        finish = None
        if ev.finished:
            self.outputs[idx] = ev.output
            finish = ev.output.finish_reason
        lps = self._logprobs(list(ev.token_ids), ev.logprobs, offset)
        if not (ev.text or finish or lps):
            return None
        delta = {"content": ev.text} if self.req.chat else ev.text
        chunk = self._chunk(idx, delta, lps, finish)
        if finish is not None and not self.req.chat:
            chunk["choices"][0]["stop_reason"] = ev.output.stop_reason
        return chunk

    def _wafer(self) -> list[dict]:
        return [(o.metrics or {}).get("wafer", {}) for o in self.outputs]

    def usage(self) -> dict:
        done = sum(len(o.token_ids) for o in self.outputs)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": done,
                "total_tokens": self.prompt_tokens + done, "wafer": wafer_usage(self._wafer())}

    def usage_chunk(self) -> dict:
        usage = self.usage()
        head = self._head("chat.completion.chunk" if self.req.chat else "text_completion")
        return {**head, "choices": [], "usage": usage, "time_info": time_info(usage["wafer"], self.created)}

    # ---------------------------------------------------------------- whole
    def full(self) -> dict:
        choices = []
        for i, o in enumerate(self.outputs):
            lps = self._logprobs(list(o.token_ids), o.logprobs, 0)
            if self.req.chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": o.text}, "logprobs": lps,
                                "finish_reason": o.finish_reason, "stop_reason": o.stop_reason})
            else:
                choices.append({"index": i, "text": o.text, "logprobs": lps, "finish_reason": o.finish_reason,
                                "stop_reason": o.stop_reason})
        usage = self.usage()
        return {**self._head("chat.completion" if self.req.chat else "text_completion"), "choices": choices,
                "usage": usage, "time_info": time_info(usage["wafer"], self.created)}
