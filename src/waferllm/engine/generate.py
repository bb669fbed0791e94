"""The one generation loop every engine uses.

``generate_one(backend, tokenizer, prompt_token_ids, params)`` runs prefill, then decode
steps, sampling each token, until EOS (unless ``ignore_eos``), a stop token id, a stop
string (text truncated before it, like vLLM), ``max_tokens`` or the backend's context
limit. ``backend`` is anything with ``reset()``, ``prefill(ids, prompt_logits) -> logits``
(every prompt token's [T, V] when ``prompt_logits``, else at least the last one's) and
``decode(token_id) -> logits [V]`` -- the dense numpy forward or the wafer engine.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import numpy as np

from waferllm.engine.outputs import RequestOutput
from waferllm.engine.sampling import Sampler, SamplingParams, log_softmax, top_logprobs
from waferllm.errors import RequestError

OnToken = Callable[[int, str], None]


class _Detokenizer:
    """Incremental text for a growing list of ids; holds back incomplete UTF-8 and possible stop-string prefixes."""

    def __init__(self, tokenizer, stop: Sequence[str]):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0
        self.holdback = max((len(s) for s in stop), default=1) - 1

    def add(self, token_id: int) -> int:
        """Append a token; return how many characters the text grew by."""
        self.ids.append(token_id)
        if self.tok is None:
            return 0
        new = self.tok.decode(self.ids, skip_special_tokens=True)
        grown = len(new) - len(self.text)
        self.text = new
        return grown

    def stable_end(self) -> int:
        end = len(self.text)
        while end > self.emitted and self.text[end - 1] == "\ufffd":
            end -= 1  # an incomplete multi-byte character: wait for the next token
        return max(self.emitted, end - self.holdback)

    def take(self, final: bool) -> str:
        end = len(self.text) if final else self.stable_end()
        delta = self.text[self.emitted:end]
        self.emitted = max(self.emitted, end)
        return delta


def _prompt_logprobs(logits: np.ndarray, prompt: Sequence[int], k: int) -> list[dict[int, float] | None]:
    out: list[dict[int, float] | None] = [None]
    for i in range(1, len(prompt)):
        out.append(top_logprobs(log_softmax(logits[i - 1]), k, extra=int(prompt[i])))
    return out


def as_prompt_list(prompts) -> list:
    """One prompt (a string or a chat message list) or a list of prompts -> a list."""
    if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], dict)):
        return [prompts]
    if not prompts:
        raise RequestError("no prompts given")
    return list(prompts)


def encode_prompt(tokenizer, prompt, chat: bool = False) -> tuple[str, list[int]]:
    """The prompt text (after the chat template when ``chat`` or a message list) and its ids.

    A chat template writes its own special tokens (e.g. BOS), so none are added then.
    """
    if chat or not isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return text, tokenizer.encode(text, add_special_tokens=False)
    if not prompt:
        raise RequestError("the prompt is empty")
    return prompt, tokenizer.encode(prompt, add_special_tokens=True)


def _stopped(tok: int, grown: int, detok: _Detokenizer, params: SamplingParams, stop_ids: set, eos: set):
    """(finish_reason, stop_reason) if ``tok`` (whose text grew by ``grown`` characters) ends
    the request by a stop token, EOS or a stop string, else (None, None); trims the text."""
    if tok in stop_ids:
        if grown > 0 and not params.include_stop_str_in_output:
            detok.text = detok.text[: len(detok.text) - grown]
        return "stop", tok
    if tok in eos:
        return "stop", None
    if params.stop:
        start = max(0, len(detok.text) - grown - max(len(s) for s in params.stop) + 1)
        hits = [(i, s) for i, s in ((detok.text.find(s, start), s) for s in params.stop) if i >= 0]
        if hits:
            i, s = min(hits)
            detok.text = detok.text[: i + len(s)] if params.include_stop_str_in_output else detok.text[:i]
            return "stop", s
    return None, None


def generate_one(backend, tokenizer, prompt_token_ids: Sequence[int], params: SamplingParams | None = None,
                 on_token: OnToken | None = None, prompt: str | None = None) -> RequestOutput:
    """Generate one completion. ``on_token(token_id, text_delta)`` is called once per generated token."""
    params = params or SamplingParams()
    prompt_ids = [int(t) for t in prompt_token_ids]
    if not prompt_ids:
        raise RequestError("the prompt is empty (no tokens)")
    if params.stop and tokenizer is None:
        raise RequestError("stop strings need a tokenizer")
    max_len = getattr(backend, "max_seq_len", None)
    if max_len is not None and len(prompt_ids) >= max_len:
        raise RequestError(f"prompt of {len(prompt_ids)} tokens leaves no room to generate (context {max_len})")
    eos = set() if (params.ignore_eos or tokenizer is None) else set(getattr(tokenizer, "eos_token_ids", []) or [])
    stop_ids = set(params.stop_token_ids or [])
    sampler = Sampler(params)
    detok = _Detokenizer(tokenizer, params.stop or [])

    t0 = time.perf_counter()
    backend.reset()
    logits_all = np.asarray(backend.prefill(prompt_ids, prompt_logits=params.prompt_logprobs is not None))
    t_prefill = time.perf_counter()
    prompt_lps = _prompt_logprobs(logits_all, prompt_ids, params.prompt_logprobs) if params.prompt_logprobs is not None else None
    logits = logits_all[-1]
    del logits_all

    token_ids: list[int] = []
    lps: list[dict[int, float]] | None = [] if params.logprobs is not None else None
    t_first = None
    while True:
        tok = sampler.sample(logits)
        if lps is not None:
            lps.append(sampler.logprobs(logits, tok, params.logprobs))
        token_ids.append(tok)
        if t_first is None:
            t_first = time.perf_counter()
        finish, stop_reason = _stopped(tok, detok.add(tok), detok, params, stop_ids, eos)
        if finish is None and len(token_ids) >= params.max_tokens:
            finish = "length"
        if finish is None and max_len is not None and len(prompt_ids) + len(token_ids) >= max_len:
            finish = "length"
        if on_token is not None:
            on_token(tok, detok.take(final=finish is not None))
        if finish is not None:
            break
        logits = np.asarray(backend.decode(tok)).reshape(-1)
    t_end = time.perf_counter()

    n_prompt, n_gen = len(prompt_ids), len(token_ids)
    prefill_s, decode_s = t_prefill - t0, t_end - (t_first or t_end)
    metrics = {
        "prompt_tokens": n_prompt,
        "generated_tokens": n_gen,
        "prefill_time_s": prefill_s,
        "time_to_first_token_s": (t_first or t_end) - t0,
        "decode_time_s": decode_s,
        "total_time_s": t_end - t0,
        "prefill_tokens_per_s": n_prompt / prefill_s if prefill_s > 0 else None,
        "decode_tokens_per_s": (n_gen - 1) / decode_s if n_gen > 1 and decode_s > 0 else None,
    }
    extra = getattr(backend, "request_metrics", None)
    if callable(extra):
        metrics["backend"] = extra()
    return RequestOutput(prompt=prompt, prompt_token_ids=prompt_ids, text=detok.text, token_ids=token_ids,
                         logprobs=lps, prompt_logprobs=prompt_lps, finish_reason=finish, stop_reason=stop_reason,
                         metrics=metrics)
