"""OpenAI request validation and the shapes of responses and errors.

Requests are checked field by field here, before anything reaches the engine, so every
mistake is a 4xx in OpenAI's error JSON ``{"error": {"message", "type", "param", "code"}}``
naming the field. Errors travel as ``waferllm.errors.RequestError`` with the HTTP status
in ``context`` (``http_status``, ``param``, ``code``, ``type``): the one exception hierarchy.

Known OpenAI fields the engine cannot honour (tools, penalties, logit bias, echo, suffix,
best_of > n, JSON response formats) are refused rather than silently ignored; a field
neither OpenAI nor vLLM defines is refused with OpenAI's own wording.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from waferllm.engine.sampling import SamplingParams
from waferllm.engine.scheduler import QueueFullError
from waferllm.errors import RequestError, WaferLLMError

MAX_N = 128          # OpenAI's limit on ``n``
MAX_LOGPROBS = 20    # top_logprobs per token (OpenAI's chat limit; completions allow 5, vLLM more)


def api_error(message: str, param: str | None = None, status: int = 400, code: str | None = None,
              type_: str = "invalid_request_error") -> RequestError:
    return RequestError(message, http_status=status, param=param, code=code, type=type_)


def error_status(exc: WaferLLMError) -> int:
    """The HTTP status of an error: a bad request is 4xx, anything the engine raised on its own 500."""
    status = exc.context.get("http_status")
    if status is not None:
        return int(status)
    if isinstance(exc, QueueFullError):
        return 429
    return 400 if isinstance(exc, RequestError) else 500


def error_body(exc: BaseException, status: int) -> dict:
    ctx = getattr(exc, "context", {}) or {}
    default_type = {404: "invalid_request_error", 408: "timeout_error", 429: "rate_limit_error"}.get(
        status, "invalid_request_error" if status < 500 else "server_error")
    code = ctx.get("code") or {429: "queue_full", 408: "request_timeout"}.get(status)
    return {"error": {"message": str(exc), "type": ctx.get("type") or default_type, "param": ctx.get("param"),
                      "code": code}}


# ---------------------------------------------------------------------------- field checks


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int(body: dict, name: str, lo: int | None = None, hi: int | None = None, default=None):
    v = body.get(name)
    if v is None:
        return default
    if not _is_int(v) or (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = (f" between {lo} and {hi}" if lo is not None and hi is not None
               else f" >= {lo}" if lo is not None else "")
        raise api_error(f"{name} must be an integer{rng}, got {v!r}", name)
    return v


def _num(body: dict, name: str, lo: float, hi: float, default: float, open_lo: bool = False) -> float:
    v = body.get(name)
    if v is None:
        return default
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if not ok or v > hi or v < lo or (open_lo and v == lo):
        raise api_error(f"{name} must be a number in {'(' if open_lo else '['}{lo}, {hi}], got {v!r}", name)
    return float(v)


def _bool(body: dict, name: str, default: bool) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise api_error(f"{name} must be true or false, got {v!r}", name)
    return v


def _stop(body: dict):
    v = body.get("stop")
    if v is None or isinstance(v, str) and v:
        return v
    if isinstance(v, list) and all(isinstance(s, str) and s for s in v):
        return v
    raise api_error(f"stop must be a non-empty string or a list of non-empty strings, got {v!r}", "stop")


def _int_list(body: dict, name: str):
    v = body.get(name)
    if v is None:
        return None
    if not isinstance(v, list) or not all(_is_int(t) and t >= 0 for t in v):
        raise api_error(f"{name} must be a list of non-negative integers, got {v!r:.80}", name)
    return v


# fields a client may send that change nothing here (or are checked to have their no-op value)
_NOOP = {"model", "user", "stream", "stream_options", "n", "metadata", "store", "service_tier"}
#: vLLM's extra sampling fields that SamplingParams has
_VLLM_EXTRAS = {"top_k", "ignore_eos", "stop_token_ids", "include_stop_str_in_output", "return_tokens_as_token_ids"}
_COMMON = {"temperature", "top_p", "max_tokens", "stop", "seed", "presence_penalty", "frequency_penalty",
           "logit_bias"} | _NOOP | _VLLM_EXTRAS
COMPLETION_FIELDS = _COMMON | {"prompt", "logprobs", "echo", "suffix", "best_of"}
CHAT_FIELDS = _COMMON | {"messages", "logprobs", "top_logprobs", "max_completion_tokens", "tools", "tool_choice",
                         "functions", "function_call", "parallel_tool_calls", "response_format"}


def _refuse_unsupported(body: dict, allowed: set[str]) -> None:
    for name in body:
        if name not in allowed:
            raise api_error(f"Unrecognized request argument supplied: {name}", name, code="unrecognized_argument")
    for name in ("presence_penalty", "frequency_penalty"):
        v = body.get(name)
        if v not in (None, 0, 0.0) or isinstance(v, bool):
            raise api_error(f"{name} is not supported (only 0): the engine applies no penalties", name,
                            code="unsupported_parameter")
    if body.get("logit_bias") not in (None, {}):
        raise api_error("logit_bias is not supported", "logit_bias", code="unsupported_parameter")
    if body.get("echo") not in (None, False):
        raise api_error("echo is not supported: the response holds the completion only", "echo",
                        code="unsupported_parameter")
    if body.get("suffix") not in (None, ""):
        raise api_error("suffix (insertion) is not supported", "suffix", code="unsupported_parameter")
    for name in ("tools", "functions", "function_call"):
        if body.get(name) not in (None, []):
            raise api_error(f"{name} is not supported: the model is served for plain text", name,
                            code="unsupported_parameter")
    if body.get("tool_choice") not in (None, "none"):
        raise api_error("tool_choice is not supported (only \"none\"): no tools are served", "tool_choice",
                        code="unsupported_parameter")
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise api_error("response_format is not supported (only {\"type\": \"text\"})", "response_format",
                        code="unsupported_parameter")
    _bool(body, "parallel_tool_calls", True)
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise api_error(f"user must be a string, got {body['user']!r:.40}", "user")


# ---------------------------------------------------------------------------- parsed requests


@dataclass
class ParsedRequest:
    """What a completion or chat request asks for, checked. ``prompts``: per prompt, text
    (completion), token ids, or a conversation (chat); each runs ``n`` times."""

    model: str | None
    prompts: list
    n: int
    stream: bool
    include_usage: bool
    max_tokens: int | None          # None: 16 for a completion (OpenAI's default), the context's rest in chat
    sampling: dict                  # SamplingParams fields other than max_tokens and seed
    seed: int | None
    logprobs: int | None            # top-K per token; None: no logprobs
    chat: bool
    tokens_as_ids: bool = False     # vLLM's return_tokens_as_token_ids: logprob tokens as "token_id:{id}"

    def params(self, n_prompt: int, max_model_len: int, choice: int) -> SamplingParams:
        """The SamplingParams of choice ``choice`` (seed + choice when a seed is given)."""
        max_tokens = self.max_tokens
        if max_tokens is None:
            room = max(1, max_model_len - n_prompt)
            max_tokens = room if self.chat else min(16, room)
        seed = None if self.seed is None else self.seed + choice
        try:
            return SamplingParams(max_tokens=max_tokens, seed=seed, logprobs=self.logprobs, **self.sampling)
        except RequestError as exc:  # the dataclass names the field first
            name = str(exc).split(" ", 1)[0]
            raise api_error(str(exc), name if name in COMPLETION_FIELDS | CHAT_FIELDS else None) from None


def _common(body: dict, allowed: set[str], chat: bool) -> dict:
    _refuse_unsupported(body, allowed)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise api_error(f"model must be a string, got {model!r:.40}", "model")
    n = _int(body, "n", 1, MAX_N, 1)
    stream = _bool(body, "stream", False)
    opts = body.get("stream_options")
    include_usage = False
    if opts is not None:
        if not stream:
            raise api_error("The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                            "stream_options")
        if not isinstance(opts, dict) or set(opts) - {"include_usage"}:
            raise api_error(f"stream_options must be an object with include_usage, got {opts!r:.60}", "stream_options")
        include_usage = _bool(opts, "include_usage", False)
    max_tokens = _int(body, "max_tokens", 1, None, None)
    if chat and body.get("max_completion_tokens") is not None:
        max_tokens = _int(body, "max_completion_tokens", 1, None, None)
    sampling = {
        "temperature": _num(body, "temperature", 0.0, 2.0, 1.0),
        "top_p": _num(body, "top_p", 0.0, 1.0, 1.0, open_lo=True),
        "stop": _stop(body),
        "top_k": _int(body, "top_k", -1, None, -1),
        "ignore_eos": _bool(body, "ignore_eos", False),
        "stop_token_ids": _int_list(body, "stop_token_ids"),
        "include_stop_str_in_output": _bool(body, "include_stop_str_in_output", False),
    }
    seed = _int(body, "seed", 0, None, None)
    return dict(model=model, n=n, stream=stream, include_usage=include_usage, max_tokens=max_tokens,
                sampling=sampling, seed=seed, tokens_as_ids=_bool(body, "return_tokens_as_token_ids", False))


def parse_completion(body: dict) -> ParsedRequest:
    common = _common(body, COMPLETION_FIELDS, chat=False)
    best_of = _int(body, "best_of", 1, MAX_N, None)
    if best_of is not None and best_of != common["n"]:
        raise api_error(f"best_of {best_of} != n {common['n']} is not supported: every candidate is returned",
                        "best_of", code="unsupported_parameter")
    logprobs = _int(body, "logprobs", 0, MAX_LOGPROBS, None)
    return ParsedRequest(prompts=_completion_prompts(body.get("prompt")), logprobs=logprobs, chat=False, **common)


def _completion_prompts(p) -> list:
    """OpenAI's prompt: a string, a list of strings, token ids, or a list of token-id lists."""
    if isinstance(p, str):
        return [p]
    if isinstance(p, list) and p:
        if all(isinstance(x, str) for x in p):
            return list(p)
        if all(_is_int(x) for x in p):
            return [p]
        if all(isinstance(x, list) and x and all(_is_int(t) for t in x) for x in p):
            return list(p)
    if p is None:
        raise api_error("prompt is required", "prompt")
    raise api_error("prompt must be a string, a list of strings, a list of token ids or a list of token-id lists",
                    "prompt")


def parse_chat(body: dict) -> ParsedRequest:
    common = _common(body, CHAT_FIELDS, chat=True)
    want = _bool(body, "logprobs", False)
    top = _int(body, "top_logprobs", 0, MAX_LOGPROBS, None)
    if top is not None and not want:
        raise api_error("top_logprobs needs logprobs to be true", "top_logprobs")
    return ParsedRequest(prompts=[chat_messages(body.get("messages"))], logprobs=(top or 0) if want else None,
                         chat=True, **common)


_ROLES = ("system", "developer", "user", "assistant")


def chat_messages(messages, param: str = "messages") -> list[dict]:
    """OpenAI messages -> ``[{"role", "content": str}]`` for the chat template (text parts joined)."""
    if not isinstance(messages, list) or not messages:
        raise api_error(f"{param} must be a non-empty list of messages", param)
    out = []
    for i, m in enumerate(messages):
        where = f"{param}[{i}]"
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise api_error(f"{where} must be an object with a role and content", where)
        role = m["role"]
        if role not in _ROLES:
            raise api_error(f"{where}.role {role!r} is not supported (one of {', '.join(_ROLES)})", f"{where}.role")
        extra = set(m) - {"role", "content", "name"}
        if extra:
            raise api_error(f"{where}: {', '.join(sorted(extra))} not supported (tool calls are not served)", where)
        out.append({"role": "system" if role == "developer" else role, "content": _content(m.get("content"), where)})
    return out


def _content(content, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise api_error(f"{where}.content: only text parts are supported, got {kind!r}", f"{where}.content")
            texts.append(part["text"])
        return "".join(texts)
    raise api_error(f"{where}.content must be a string or a list of text parts", f"{where}.content")


# ---------------------------------------------------------------------------- response pieces


def _lp(v) -> float | None:
    """A logprob for JSON: -inf (a token the model rules out) becomes -9999.0, as vLLM does."""
    return None if v is None else max(float(v), -9999.0)


def token_str(tokenizer, token_id: int, as_id: bool = False) -> str:
    return f"token_id:{token_id}" if as_id else tokenizer.decode([token_id], skip_special_tokens=False)


def completion_logprobs(tokenizer, token_ids: list[int], lps: list[dict], offset: int = 0,
                        as_ids: bool = False) -> dict:
    """OpenAI's legacy completion logprobs: tokens, token_logprobs, top_logprobs, text_offset."""
    tokens = [token_str(tokenizer, t, as_ids) for t in token_ids]
    offsets, pos = [], offset
    for s in tokens:
        offsets.append(pos)
        pos += len(s)
    return {"tokens": tokens,
            "token_logprobs": [_lp(d.get(t)) for t, d in zip(token_ids, lps)],
            "top_logprobs": [{token_str(tokenizer, k, as_ids): _lp(v)
                              for k, v in sorted(d.items(), key=lambda kv: -kv[1])} for d in lps],
            "text_offset": offsets}


def chat_logprobs(tokenizer, token_ids: list[int], lps: list[dict], k: int, as_ids: bool = False) -> dict:
    """OpenAI's chat logprobs: ``{"content": [{"token", "logprob", "bytes", "top_logprobs"}]}``."""
    def entry(t: int, lp: float) -> dict:
        s = token_str(tokenizer, t, as_ids)
        return {"token": s, "logprob": _lp(lp), "bytes": list(s.encode("utf-8"))}

    content = []
    for t, d in zip(token_ids, lps):
        top = sorted(d.items(), key=lambda kv: -kv[1])[:k]
        content.append({**entry(t, d.get(t)), "top_logprobs": [entry(i, v) for i, v in top]})
    return {"content": content}


WAFER_KEYS = ("queue_s", "ttft_s", "tpot_s", "decode_tokens_per_s", "e2e_s", "energy_j")


def wafer_usage(per_choice: list[dict]) -> dict:
    """``usage.wafer``: the predicted wafer figures of the response. One choice: its own. Several:
    the first token of any (ttft), the last to finish (e2e), energy summed, TPOT the mean over
    decoded tokens, decode tokens/s the total rate; each choice's own under ``choices``."""
    figs = [{k: w.get(k) for k in WAFER_KEYS} for w in per_choice]
    if len(figs) == 1:
        return figs[0]

    def vals(k):
        return [f[k] for f in figs if f[k] is not None]

    out = {"queue_s": min(vals("queue_s"), default=None), "ttft_s": min(vals("ttft_s"), default=None),
           "e2e_s": max(vals("e2e_s"), default=None), "energy_j": sum(vals("energy_j")) if vals("energy_j") else None}
    rates = vals("decode_tokens_per_s")
    out["decode_tokens_per_s"] = sum(rates) if rates else None
    tp = [f["tpot_s"] for f in figs if f["tpot_s"] is not None]
    out["tpot_s"] = sum(tp) / len(tp) if tp else None
    out["choices"] = figs
    return out


def time_info(wafer: dict, created: int) -> dict:
    """A wafer-scale vendor's ``time_info`` (predicted wafer seconds): queue (arrival to the
    prefill), prompt (the prefill, to the first token), completion (the rest of the decode)
    and total (arrival to the last token; the engine's ``ttft_s`` and ``e2e_s`` count from
    the arrival, so they include the queue)."""
    q, ttft, e2e = (wafer.get(k) or 0.0 for k in ("queue_s", "ttft_s", "e2e_s"))
    return {"queue_time": q, "prompt_time": max(0.0, ttft - q), "completion_time": max(0.0, e2e - ttft),
            "total_time": e2e, "created": created}
