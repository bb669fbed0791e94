"""Dense numpy reference forward of a LLaMA-family decoder, with a KV cache.

Written to be read (in the spirit of nanoGPT / llama2.c)::

    h = embed[tokens]
    for each layer:
        x = rmsnorm(h) * attn_norm
        q, k, v = x @ wq (+bq), x @ wk (+bk), x @ wv (+bv)      # split into heads
        q, k = rope(q), rope(k);  append k, v to the cache
        h = h + softmax(q k^T / sqrt(D) + causal mask) v @ wo    # GQA: each KV head serves G query heads
        x = rmsnorm(h) * ffn_norm
        h = h + (silu(x @ w_gate) * (x @ w_up)) @ w_down
    logits = rmsnorm(h) * final_norm @ lm_head
"""

from __future__ import annotations

import numpy as np

from waferllm.errors import RequestError
from waferllm.models.rope import apply_rope, rope_cos_sin
from waferllm.models.weights import LayerWeights, ModelWeights


def rmsnorm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    var = np.mean(np.square(x, dtype=np.float32), axis=-1, keepdims=True, dtype=np.float32)
    return (x / np.sqrt(var + np.float32(eps))).astype(x.dtype, copy=False) * weight


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    x = x - np.max(x, axis=axis, keepdims=True)
    e = np.exp(x)
    return e / np.sum(e, axis=axis, keepdims=True)


def log_softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    m = np.max(x, axis=axis, keepdims=True)
    return x - m - np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True))


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, q_pos0: int) -> np.ndarray:
    """Causal grouped-query attention.

    q: [Hq, T, D] for positions q_pos0..q_pos0+T-1; k, v: [Hkv, S, D] for positions 0..S-1.
    Returns [Hq, T, D].
    """
    Hq, T, D = q.shape
    Hkv, S, _ = k.shape
    G = Hq // Hkv
    qg = q.reshape(Hkv, G * T, D)  # query heads h = kv*G + g share KV head kv
    scores = (qg @ k.transpose(0, 2, 1)).reshape(Hkv, G, T, S) * np.float32(1.0 / np.sqrt(D))
    qpos = q_pos0 + np.arange(T)[:, None]
    mask = np.arange(S)[None, :] > qpos  # [T, S], True where the key is in the future
    if mask.any():
        scores = np.where(mask, np.float32(-np.inf), scores)
    p = softmax(scores, axis=-1).reshape(Hkv, G * T, S)
    return (p @ v).reshape(Hq, T, D)


class KVCache:
    """Per-layer K and V, [Hkv, S, D], grown in chunks."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, max_len: int, dtype=np.float32):
        self.max_len = max_len
        self.length = 0
        self._shape = (num_kv_heads, head_dim)
        self._dtype = dtype
        self._cap = 0
        self.k: list[np.ndarray] = [np.zeros((num_kv_heads, 0, head_dim), dtype) for _ in range(num_layers)]
        self.v: list[np.ndarray] = [np.zeros((num_kv_heads, 0, head_dim), dtype) for _ in range(num_layers)]

    def reset(self) -> None:
        self.length = 0

    def _grow(self, need: int) -> None:
        if need <= self._cap:
            return
        cap = min(self.max_len, max(need, 2 * self._cap, 256))
        H, D = self._shape
        for store in (self.k, self.v):
            for i, old in enumerate(store):
                new = np.zeros((H, cap, D), self._dtype)
                new[:, : self.length] = old[:, : self.length]
                store[i] = new
        self._cap = cap

    def append(self, layer: int, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Write k, v [Hkv, T, D] at positions length..length+T-1; return the views [Hkv, length+T, D]."""
        T = k.shape[1]
        end = self.length + T
        self._grow(end)
        self.k[layer][:, self.length:end] = k
        self.v[layer][:, self.length:end] = v
        return self.k[layer][:, :end], self.v[layer][:, :end]

    def advance(self, T: int) -> None:
        self.length += T


class ReferenceModel:
    """Dense numpy forward (float32 by default) with a KV cache.

    ``prefill(ids)`` runs the ids at positions ``len .. len+T-1`` after what the cache holds
    and returns logits [T, V]; ``decode(id)`` runs one token and returns logits [V].
    ``preload=False`` keeps layers lazy (built from the file on each access when the
    weights' layer cache is small), for models larger than memory.
    """

    def __init__(self, weights: ModelWeights, dtype=np.float32, max_seq_len: int | None = None, preload: bool = True):
        self.weights = weights
        self.config = c = weights.config
        self.dtype = np.dtype(dtype)
        self.max_seq_len = int(max_seq_len or c.max_position_embeddings)
        self.cache = KVCache(c.num_layers, c.num_kv_heads, c.head_dim, self.max_seq_len, self.dtype)
        self._cast = self.dtype != np.float32
        # preload: materialise (dequantise) every layer now, so timings measure the forward only
        if self._cast:
            self._layers = [self._convert(layer) for layer in weights.layers]
        elif preload:
            self._layers = list(weights.layers)
        else:
            self._layers = None
        self._embed = weights.embed.astype(self.dtype) if self._cast else weights.embed
        self._lm_head = weights.lm_head.astype(self.dtype) if self._cast else weights.lm_head
        self._final_norm = weights.final_norm.astype(self.dtype)

    def _convert(self, layer: LayerWeights) -> LayerWeights:
        return LayerWeights(**{k: (v.astype(self.dtype) if v is not None else None) for k, v in layer.__dict__.items()})

    def layer(self, i: int) -> LayerWeights:
        return self._layers[i] if self._layers is not None else self.weights.layers[i]

    # ----------------------------------------------------------------- API
    @property
    def position(self) -> int:
        """Number of tokens in the KV cache (the position of the next token)."""
        return self.cache.length

    def reset(self) -> None:
        self.cache.reset()

    def prefill(self, token_ids) -> np.ndarray:
        ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
        if ids.size == 0:
            raise RequestError("prefill needs at least one token")
        return self.forward(ids)

    def decode(self, token_id: int) -> np.ndarray:
        return self.forward(np.asarray([int(token_id)], dtype=np.int64))[0]

    # ------------------------------------------------------------- forward
    def forward(self, ids: np.ndarray) -> np.ndarray:
        c = self.config
        T, pos0 = ids.shape[0], self.cache.length
        if pos0 + T > self.max_seq_len:
            raise RequestError(f"sequence of {pos0 + T} tokens exceeds the model's maximum of {self.max_seq_len}")
        if ids.min() < 0 or ids.max() >= c.vocab_size:
            raise RequestError(f"token id out of range [0, {c.vocab_size})")
        cos, sin = rope_cos_sin(c, np.arange(pos0, pos0 + T), dtype=self.dtype)
        h = self._embed[ids].astype(self.dtype)  # [T, E]
        for i in range(c.num_layers):
            h = self.forward_layer(i, h, cos, sin, pos0)
        self.cache.advance(T)
        h = rmsnorm(h, self._final_norm, c.rms_norm_eps)
        return (h @ self._lm_head).astype(np.float32, copy=False)

    def forward_layer(self, i: int, h: np.ndarray, cos: np.ndarray, sin: np.ndarray, pos0: int) -> np.ndarray:
        """One transformer block on hidden states h [T, E]; appends to layer i's KV cache."""
        c, w = self.config, self.layer(i)
        T, D = h.shape[0], c.head_dim
        x = rmsnorm(h, w.attn_norm, c.rms_norm_eps)
        q, k, v = x @ w.wq, x @ w.wk, x @ w.wv
        if w.bq is not None:
            q, k, v = q + w.bq, k + w.bk, v + w.bv
        q = q.reshape(T, c.num_heads, D).transpose(1, 0, 2)  # [Hq, T, D]
        k = k.reshape(T, c.num_kv_heads, D).transpose(1, 0, 2)  # [Hkv, T, D]
        v = v.reshape(T, c.num_kv_heads, D).transpose(1, 0, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        K, V = self.cache.append(i, k, v)
        o = attention(q, K, V, pos0)  # [Hq, T, D]
        h = h + o.transpose(1, 0, 2).reshape(T, c.q_dim) @ w.wo
        x = rmsnorm(h, w.ffn_norm, c.rms_norm_eps)
        return h + (silu(x @ w.w_gate) * (x @ w.w_up)) @ w.w_down

    def logits_for(self, token_ids) -> np.ndarray:
        """Fresh full forward (resets the cache): logits [T, V]."""
        self.reset()
        return self.prefill(token_ids)
