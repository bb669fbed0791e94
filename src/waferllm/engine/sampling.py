"""Sampling parameters (vLLM semantics) and the sampler that turns logits into tokens.

* ``temperature == 0`` -> greedy (argmax); otherwise logits / temperature.
* ``top_k`` -1 or 0 = off; otherwise keep the k most likely tokens.
* ``top_p`` < 1 keeps the smallest set of tokens whose probability mass reaches ``top_p``.
* ``seed`` makes sampling deterministic (one ``numpy.random.Generator`` per request).
* ``logprobs=K`` returns, per generated token, ``{token_id: logprob}`` for the K most
  likely tokens plus the sampled one (so K+1 entries at most), computed from the raw model
  logits (before temperature / top-k / top-p), like vLLM.
* Speculative decoding hands the sampler a draft model's guess for the next logits (drawn
  from the draft's distribution q, processed as the request asks); the sampler keeps it or
  draws another token by rejection sampling (:func:`accept_or_resample`), so the token is
  still distributed as sampling from the logits alone.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import numpy as np

from waferllm.errors import RequestError
from waferllm.models.reference import log_softmax

_SAMPLING_EPS = 1e-5


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def is_int(x) -> bool:
            return isinstance(x, (int, np.integer)) and not isinstance(x, bool)

        if not is_int(self.max_tokens) or self.max_tokens < 1:
            raise RequestError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) \
                or not math.isfinite(self.temperature) or self.temperature < 0:
            raise RequestError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not is_int(self.top_k) or (self.top_k < 1 and self.top_k not in (-1, 0)):
            raise RequestError(f"top_k must be -1 or 0 (disabled) or at least 1, got {self.top_k!r}")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)) or not (0.0 < self.top_p <= 1.0):
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (not is_int(self.seed) or self.seed < 0):
            raise RequestError(f"seed must be None or an integer >= 0, got {self.seed!r}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.stop is not None and not isinstance(self.stop, (list, tuple)):
            raise RequestError(f"stop must be a string or a list of strings, got {self.stop!r}")
        self.stop = list(self.stop or [])
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise RequestError(f"stop strings must be non-empty strings, got {s!r}")
        if self.stop_token_ids is not None and not isinstance(self.stop_token_ids, (list, tuple)):
            raise RequestError(f"stop_token_ids must be a list of token ids, got {self.stop_token_ids!r}")
        self.stop_token_ids = list(self.stop_token_ids or [])
        for t in self.stop_token_ids:
            if not is_int(t) or t < 0:
                raise RequestError(f"stop_token_ids must be non-negative integers, got {t!r}")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (not is_int(v) or v < 0):
                raise RequestError(f"{name} must be None or an integer >= 0, got {v!r}")
        for name in ("ignore_eos", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise RequestError(f"{name} must be True or False, got {getattr(self, name)!r}")
        self.temperature = float(self.temperature)
        self.top_p = float(self.top_p)

    @classmethod
    def coerce(cls, value) -> "SamplingParams":
        """A SamplingParams from one, from a dict of its fields (``{"max_tokens": 8}``), or None
        (the defaults); anything else is refused with a RequestError."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            known = [f.name for f in fields(cls)]
            unknown = sorted(str(k) for k in value if k not in known)
            if unknown:
                raise RequestError(f"unknown sampling parameter(s) {', '.join(unknown)}; known: {', '.join(known)}")
            return cls(**value)
        raise RequestError(f"sampling_params must be a SamplingParams, a dict of its fields, a list of them, or None; "
                           f"got {type(value).__name__}")

    @property
    def greedy(self) -> bool:
        return self.temperature < _SAMPLING_EPS

    def to_dict(self) -> dict:
        return asdict(self)


def top_logprobs(logprobs: np.ndarray, k: int, extra: int | None = None) -> dict[int, float]:
    """``{token_id: logprob}`` for the k largest entries of a [V] log-prob vector, plus ``extra``."""
    out: dict[int, float] = {}
    if extra is not None:
        out[int(extra)] = float(logprobs[extra])
    if k > 0:
        k = min(k, logprobs.shape[-1])
        idx = np.argpartition(-logprobs, k - 1)[:k]
        idx = idx[np.lexsort((idx, -logprobs[idx]))]  # by logprob descending, then id
        for i in idx:
            out.setdefault(int(i), float(logprobs[i]))
    return out


def apply_top_k_top_p(logits: np.ndarray, top_k: int, top_p: float) -> np.ndarray:
    """Return a copy of [V] logits with filtered tokens set to -inf."""
    x = np.array(logits, dtype=np.float64)
    V = x.shape[-1]
    if top_k > 0 and top_k < V:
        kth = np.partition(x, V - top_k)[V - top_k]  # the k-th largest value
        x[x < kth] = -np.inf
    if top_p < 1.0:
        order = np.argsort(-x, kind="stable")
        p = np.exp(x[order] - x[order[0]])
        p /= p.sum()
        cum = np.cumsum(p)
        # keep tokens until the mass *before* a token reaches top_p (the top token always stays)
        drop = (cum - p) >= top_p
        drop[0] = False
        x[order[drop]] = -np.inf
    return x


def draw(probs: np.ndarray, rng: np.random.Generator) -> int:
    """A token drawn from a [V] distribution (one uniform draw of ``rng``)."""
    cdf = np.cumsum(probs)
    r = rng.random() * cdf[-1]
    tok = min(int(np.searchsorted(cdf, r, side="right")), len(probs) - 1)
    while probs[tok] == 0.0 and tok > 0:  # guard against landing on a masked token at the edge
        tok -= 1
    return tok


def accept_or_resample(p: np.ndarray, q: np.ndarray, guess: int, rng: np.random.Generator) -> int:
    """Speculative (rejection) sampling (Leviathan et al. 2023; Chen et al. 2023): ``guess``
    was drawn from the draft's distribution ``q``; keep it with probability min(1, p/q) at the
    guess, else draw from the residual normalize(max(0, p - q)). Whatever q is, the token is
    distributed as ``p``: a token x comes out kept with probability min(p(x), q(x)) and
    redrawn with probability p(x) - min(p(x), q(x))."""
    if rng.random() * q[guess] < p[guess]:  # u < p/q without dividing by a tiny q
        return int(guess)
    residual = np.maximum(p - q, 0.0)
    # p and q both sum to 1, so a rejection leaves some residual mass; rounding may not
    return draw(residual if residual.sum() > 0.0 else p, rng)


class Sampler:
    """Turns logits into a token for one request (owns the request's random generator)."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.rng = np.random.default_rng(params.seed)
        self.guess: tuple[int, np.ndarray] | None = None  # a draft's (token, q) for the next logits

    def probs(self, logits: np.ndarray) -> np.ndarray:
        """The distribution sampled from (after temperature, top-k, top-p), float64 [V]."""
        p = self.params
        x = apply_top_k_top_p(np.asarray(logits, dtype=np.float64) / max(p.temperature, _SAMPLING_EPS), p.top_k, p.top_p)
        x = np.exp(x - np.max(x))
        return x / x.sum()

    def draft(self, logits: np.ndarray) -> tuple[int, np.ndarray | None]:
        """A draft model's guess from its own logits: the argmax when greedy (q None), else a
        token drawn with the request's generator from the draft's processed distribution q,
        returned with q (what verifying the guess needs)."""
        logits = np.asarray(logits).reshape(-1)
        if self.params.greedy:
            return int(np.argmax(logits)), None
        q = self.probs(logits)
        return draw(q, self.rng), q

    def propose(self, guess: int | None, q: np.ndarray | None = None) -> None:
        """The next ``sample`` verifies ``guess`` (drawn from ``q``) instead of drawing freely;
        None: it draws freely."""
        self.guess = None if guess is None else (int(guess), q)

    def sample(self, logits: np.ndarray) -> int:
        logits = np.asarray(logits).reshape(-1)
        guess, self.guess = self.guess, None
        if self.params.greedy:  # a greedy guess is kept exactly when it is the argmax
            return int(np.argmax(logits))
        probs = self.probs(logits)
        if guess is not None and guess[1] is not None:
            return accept_or_resample(probs, guess[1], guess[0], self.rng)
        return draw(probs, self.rng)

    def logprobs(self, logits: np.ndarray, token_id: int, k: int) -> dict[int, float]:
        return top_logprobs(log_softmax(np.asarray(logits).reshape(-1)), k, extra=token_id)


def sample_greedy(logits: np.ndarray) -> int:
    return int(np.argmax(np.asarray(logits).reshape(-1)))


__all__ = ["SamplingParams", "Sampler", "top_logprobs", "log_softmax", "apply_top_k_top_p", "sample_greedy", "draw",
           "accept_or_resample"]
