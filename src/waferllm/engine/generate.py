"""The one generation loop every engine uses.

``generate_one(backend, tokenizer, prompt_token_ids, params)`` runs prefill, then decode
steps, sampling each token, until EOS (unless ``ignore_eos``), a stop token id, a stop
string (text truncated before it, like vLLM), ``max_tokens`` or the backend's context
limit. ``backend`` is anything with ``reset()``, ``prefill(ids, prompt_logits) -> logits``
(every prompt token's [T, V] when ``prompt_logits``, else at least the last one's) and
``decode(token_id) -> logits [V]`` -- the dense numpy forward or the wafer engine. A
backend with ``use_sampler(sampler)`` (speculative decoding) gets the request's sampler
after ``reset``: it may hand the sampler a draft's guess to verify against the logits it
returns (``Sampler.propose``).
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


def prompt_logprobs(logits: np.ndarray, prompt: Sequence[int], k: int) -> list[dict[int, float] | None]:
    out: list[dict[int, float] | None] = [None]
    for i in range(1, len(prompt)):
        out.append(top_logprobs(log_softmax(logits[i - 1]), k, extra=int(prompt[i])))
    return out


_PROMPT_KINDS = ("a string, a list of token ids, a chat message list, {'prompt': str}, {'prompt_token_ids': [...]}, "
                 "or a list of these")


def _is_id(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _is_token_ids(x) -> bool:
    """A non-empty list/tuple/1-D array of integers (vLLM's ``prompt_token_ids``)."""
    if isinstance(x, np.ndarray):
        return x.ndim == 1 and x.size > 0 and np.issubdtype(x.dtype, np.integer)
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(_is_id(t) for t in x)


def _is_conversation(x) -> bool:
    return isinstance(x, (list, tuple)) and len(x) > 0 and isinstance(x[0], dict) and "role" in x[0]


def _check_prompt(p, where: str = "prompt"):
    """One prompt in one of the accepted forms (else a RequestError naming them)."""
    if isinstance(p, str) or _is_token_ids(p) or _is_conversation(p):
        return list(p) if isinstance(p, (tuple, np.ndarray)) else p
    if isinstance(p, dict):
        keys = set(p)
        if keys == {"prompt_token_ids"} and _is_token_ids(p["prompt_token_ids"]):
            return p
        if keys == {"prompt"} and isinstance(p["prompt"], str):
            return p
        if "role" in p:
            raise RequestError(f"{where}: a chat message must come in a list of messages, e.g. [{p!r:.60}]")
        raise RequestError(f"{where}: a prompt dict must be {{'prompt': str}} or {{'prompt_token_ids': [int, ...]}}, "
                           f"got keys {sorted(map(str, keys))}")
    if isinstance(p, (list, tuple)) and not p:
        raise RequestError(f"{where} is empty")
    if isinstance(p, (list, tuple)) and any(_is_id(t) for t in p):
        bad = next(t for t in p if not _is_id(t))
        raise RequestError(f"{where}: token ids must all be integers, got {bad!r}")
    raise RequestError(f"{where} must be {_PROMPT_KINDS}; got {type(p).__name__}")


def as_prompt_list(prompts) -> list:
    """One prompt or a list of prompts -> a list of prompts.

    A prompt is text, token ids (a list of ints, as vLLM), ``{"prompt": text}`` or
    ``{"prompt_token_ids": ids}`` (vLLM's TextPrompt / TokensPrompt), or a chat
    conversation (a list of ``{"role", "content"}`` messages)."""
    if isinstance(prompts, np.ndarray) and prompts.ndim == 2:
        prompts = [list(row) for row in prompts]
    if isinstance(prompts, (str, dict)) or _is_token_ids(prompts) or _is_conversation(prompts) or (
            isinstance(prompts, (list, tuple)) and any(_is_id(t) for t in prompts)):
        return [_check_prompt(prompts)]
    if isinstance(prompts, (list, tuple)):
        if not prompts:
            raise RequestError("no prompts given")
        return [_check_prompt(p, f"prompt {i}") for i, p in enumerate(prompts)]
    raise RequestError(f"prompts must be {_PROMPT_KINDS}; got {type(prompts).__name__}")


def as_params_list(sampling_params, n: int) -> list[SamplingParams]:
    """One SamplingParams (or a dict of its fields, or None) for every prompt, or one per prompt."""
    if isinstance(sampling_params, (list, tuple)):
        if len(sampling_params) != n:
            raise RequestError(f"{len(sampling_params)} SamplingParams for {n} prompts: give one, or one per prompt")
        return [SamplingParams.coerce(p) for p in sampling_params]
    return [SamplingParams.coerce(sampling_params)] * n


def check_token_ids(ids, vocab_size: int | None) -> list[int]:
    """Token ids as ints, each in ``[0, vocab_size)``."""
    out = [int(t) for t in ids]
    if not out:
        raise RequestError("the prompt is empty (no tokens)")
    if vocab_size is not None:
        bad = [t for t in out if not 0 <= t < vocab_size]
        if bad:
            raise RequestError(f"token id {bad[0]} is outside the vocabulary [0, {vocab_size})"
                               + (f" ({len(bad)} ids in all)" if len(bad) > 1 else ""))
    return out


def encode_prompt(tokenizer, prompt, chat: bool = False, vocab_size: int | None = None) -> tuple[str | None, list[int]]:
    """The prompt text (after the chat template when ``chat`` or a message list) and its ids.

    A chat template writes its own special tokens (e.g. BOS), so none are added then.
    Token-id prompts are used as they are (their text is None, as in vLLM)."""
    prompt = _check_prompt(prompt)
    if isinstance(prompt, dict):
        prompt = prompt.get("prompt", prompt.get("prompt_token_ids"))
    if _is_token_ids(prompt):
        if chat:
            raise RequestError("chat=True needs text or chat messages; token-id prompts are used as they are "
                               "(apply the chat template before tokenizing, or pass the messages)")
        return None, check_token_ids(prompt, vocab_size)
    if chat or not isinstance(prompt, str):
        if isinstance(prompt, str) and not prompt:
            raise RequestError("the prompt is empty")
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return text, check_token_ids(tokenizer.encode(text, add_special_tokens=False), vocab_size)
    if not prompt:
        raise RequestError("the prompt is empty")
    return prompt, check_token_ids(tokenizer.encode(prompt, add_special_tokens=True), vocab_size)


def as_conversations(messages) -> list[list[dict]]:
    """``chat()``'s input: one conversation (a list of messages) or a list of conversations."""
    if _is_conversation(messages) or (isinstance(messages, (list, tuple)) and messages
                                      and all(isinstance(m, dict) for m in messages)):
        return [list(messages)]  # each message is checked when the template renders
    if isinstance(messages, (list, tuple)) and messages and all(_is_conversation(c) for c in messages):
        return [list(c) for c in messages]
    if isinstance(messages, str):
        raise RequestError("chat() takes messages ([{'role': 'user', 'content': ...}]); use generate() for plain text")
    raise RequestError("chat() takes a conversation (a list of {'role', 'content'} messages) or a list of "
                       f"conversations; got {type(messages).__name__}")


class PromptFrontend:
    """``generate()`` and ``chat()`` shared by the engines (vLLM's shapes); a subclass has
    ``tokenizer``, ``config`` and ``generate_ids(ids, params, on_token, prompt)``."""

    def encode_prompt(self, prompt, chat: bool = False) -> tuple[str | None, list[int]]:
        return encode_prompt(self.tokenizer, prompt, chat, vocab_size=self.config.vocab_size)

    def generate(self, prompts, sampling_params=None, chat: bool = False,
                 on_token: OnToken | None = None) -> list[RequestOutput]:
        """Generate for a prompt or a list of prompts (an engine may run several as a batch).
        ``sampling_params``: a SamplingParams (or a dict of its fields) for all, or
        a list of them, one per prompt. Every request is checked before the first one runs."""
        prompts = as_prompt_list(prompts)
        plist = as_params_list(sampling_params, len(prompts))
        encoded = [self.encode_prompt(p, chat=chat) for p in prompts]
        for (_, ids), params in zip(encoded, plist):
            self.check_request(ids, params)
        return self.run_requests(encoded, plist, on_token)

    def run_requests(self, encoded: list, plist: list, on_token: OnToken | None = None) -> list[RequestOutput]:
        """Run checked requests ((text, ids) each, with their params): one after another."""
        return [self.generate_ids(ids, params, on_token=on_token, prompt=text)
                for (text, ids), params in zip(encoded, plist)]

    def chat(self, messages, sampling_params=None, chat_template: str | None = None,
             add_generation_prompt: bool = True, on_token: OnToken | None = None) -> list[RequestOutput]:
        """Generate a reply to a conversation (a list of ``{"role", "content"}`` messages) or to
        each of a list of conversations, with the model's chat template (or ``chat_template``)."""
        from waferllm.models.chat import render_chat

        convs = as_conversations(messages)
        plist = as_params_list(sampling_params, len(convs))
        tok = self.tokenizer
        encoded = []
        for conv in convs:
            if chat_template is None:
                text = tok.apply_chat_template(conv, add_generation_prompt=add_generation_prompt)
            else:
                text = render_chat(chat_template, conv, add_generation_prompt, bos_token=tok.bos_token,
                                   eos_token=tok.eos_token)
            encoded.append((text, check_token_ids(tok.encode(text, add_special_tokens=False), self.config.vocab_size)))
        for (_, ids), params in zip(encoded, plist):
            self.check_request(ids, params)
        return self.run_requests(encoded, plist, on_token)

    def check_request(self, prompt_token_ids, params: SamplingParams) -> None:
        """Refuse a request that cannot run (before running any)."""


def check_lengths(n_prompt: int, max_tokens: int, max_len: int, model_name: str, context: int,
                  knob: str = "max_model_len") -> None:
    """Refuse a prompt + max_tokens beyond ``max_len``, saying what would fit."""
    if n_prompt >= max_len:
        raise RequestError(f"the prompt has {n_prompt} tokens; {knob} is {max_len}, which leaves no room to generate "
                           + (f"(raise {knob}: {model_name} allows up to {context})" if max_len < context
                              else f"({model_name}'s context is {context} tokens: shorten the prompt)"))
    if n_prompt + max_tokens > max_len:
        room = max_len - n_prompt
        raise RequestError(
            f"prompt ({n_prompt} tokens) + max_tokens ({max_tokens}) = {n_prompt + max_tokens} exceeds {knob} {max_len}: "
            f"lower max_tokens to at most {room}"
            + (f", or raise {knob} (up to {context}, {model_name}'s context)" if max_len < context else
               f" ({model_name}'s context is {context} tokens)"))


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


class SequenceState:
    """One request's sampling and stopping, token by token: its sampler, incremental text
    and stop checks. The sequential loop (:func:`generate_one`) and the batch scheduler
    (``engine.scheduler``) both feed it logits, so a request ends alike in either."""

    def __init__(self, tokenizer, prompt_ids: list[int], params: SamplingParams, max_len: int | None):
        if params.stop and tokenizer is None:
            raise RequestError("stop strings need a tokenizer")
        self.params = params
        self.prompt_ids = prompt_ids
        self.max_len = max_len
        self.eos = set() if (params.ignore_eos or tokenizer is None) else set(
            getattr(tokenizer, "eos_token_ids", []) or [])
        self.stop_ids = set(params.stop_token_ids or [])
        self.sampler = Sampler(params)
        self.detok = _Detokenizer(tokenizer, params.stop or [])
        self.token_ids: list[int] = []
        self.logprobs: list[dict[int, float]] | None = [] if params.logprobs is not None else None
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def accept(self, logits: np.ndarray) -> tuple[int, str]:
        """Sample the next token from ``logits`` [V]; returns it and the text it releases
        (stop-string prefixes and incomplete characters are held back until settled)."""
        params = self.params
        tok = self.sampler.sample(logits)
        if self.logprobs is not None:
            self.logprobs.append(self.sampler.logprobs(logits, tok, params.logprobs))
        self.token_ids.append(tok)
        finish, self.stop_reason = _stopped(tok, self.detok.add(tok), self.detok, params, self.stop_ids, self.eos)
        if finish is None and len(self.token_ids) >= params.max_tokens:
            finish = "length"
        if finish is None and self.max_len is not None and len(self.prompt_ids) + len(self.token_ids) >= self.max_len:
            finish = "length"
        self.finish_reason = finish
        return tok, self.detok.take(final=finish is not None)

    def output(self, prompt: str | None, prompt_logprobs=None, metrics: dict | None = None) -> RequestOutput:
        return RequestOutput(prompt=prompt, prompt_token_ids=self.prompt_ids, text=self.detok.text,
                             token_ids=self.token_ids, logprobs=self.logprobs, prompt_logprobs=prompt_logprobs,
                             finish_reason=self.finish_reason or "abort", stop_reason=self.stop_reason,
                             metrics=metrics or {})


def generate_one(backend, tokenizer, prompt_token_ids: Sequence[int], params: SamplingParams | None = None,
                 on_token: OnToken | None = None, prompt: str | None = None) -> RequestOutput:
    """Generate one completion. ``on_token(token_id, text_delta)`` is called once per generated token."""
    params = params or SamplingParams()
    prompt_ids = [int(t) for t in prompt_token_ids]
    if not prompt_ids:
        raise RequestError("the prompt is empty (no tokens)")
    max_len = getattr(backend, "max_seq_len", None)
    if max_len is not None and len(prompt_ids) >= max_len:
        raise RequestError(f"the prompt has {len(prompt_ids)} tokens, which leaves no room to generate in a context of "
                           f"{max_len} tokens")
    seq = SequenceState(tokenizer, prompt_ids, params, max_len)

    t0, c0 = time.perf_counter(), time.process_time()
    backend.reset()
    if callable(getattr(backend, "use_sampler", None)):
        backend.use_sampler(seq.sampler)
    logits_all = np.asarray(backend.prefill(prompt_ids, prompt_logits=params.prompt_logprobs is not None))
    t_prefill, c_prefill = time.perf_counter(), time.process_time()
    prompt_lps = prompt_logprobs(logits_all, prompt_ids, params.prompt_logprobs) if params.prompt_logprobs is not None else None
    logits = logits_all[-1]
    del logits_all

    t_first = c_first = None
    while True:
        tok, delta = seq.accept(logits)
        if t_first is None:
            t_first, c_first = time.perf_counter(), time.process_time()
        if on_token is not None:
            on_token(tok, delta)
        if seq.finished:
            break
        logits = np.asarray(backend.decode(tok)).reshape(-1)
    t_end, c_end = time.perf_counter(), time.process_time()

    metrics = host_metrics(len(prompt_ids), len(seq.token_ids), t0, t_prefill, t_first or t_end, t_end)
    # this process's CPU seconds in each phase: on a shared host, steadier than wall time
    metrics["prefill_cpu_s"], metrics["decode_cpu_s"] = c_prefill - c0, c_end - (c_first or c_end)
    extra = getattr(backend, "request_metrics", None)
    if callable(extra):
        metrics["backend"] = extra()
    return seq.output(prompt, prompt_lps, metrics)


def host_metrics(n_prompt: int, n_gen: int, t0: float, t_prefill: float, t_first: float, t_end: float) -> dict:
    """A request's host-side figures from its timestamps (perf_counter seconds)."""
    prefill_s, decode_s = t_prefill - t0, t_end - t_first
    return {
        "prompt_tokens": n_prompt,
        "generated_tokens": n_gen,
        "prefill_time_s": prefill_s,
        "time_to_first_token_s": t_first - t0,
        "decode_time_s": decode_s,
        "total_time_s": t_end - t0,
        "prefill_tokens_per_s": n_prompt / prefill_s if prefill_s > 0 else None,
        "decode_tokens_per_s": (n_gen - 1) / decode_s if n_gen > 1 and decode_s > 0 else None,
    }
