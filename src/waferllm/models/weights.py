"""Model weights in one orientation: every matrix is applied as ``x @ W`` (input dim first).

Q/K projection columns follow the HF ("rotate_half" / NeoX) RoPE layout. All arrays are
float32 numpy. ``ModelWeights.layers`` may be a :class:`LazyLayers` sequence that builds
each layer on first access, so a large memory-mapped file is not materialised all at once.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np

from waferllm.models.config import ModelConfig


@dataclass
class LayerWeights:
    attn_norm: np.ndarray  # [E]
    wq: np.ndarray  # [E, Hq*D]
    wk: np.ndarray  # [E, Hkv*D]
    wv: np.ndarray  # [E, Hkv*D]
    wo: np.ndarray  # [Hq*D, E]
    ffn_norm: np.ndarray  # [E]
    w_gate: np.ndarray  # [E, F]
    w_up: np.ndarray  # [E, F]
    w_down: np.ndarray  # [F, E]
    bq: np.ndarray | None = None  # [Hq*D]
    bk: np.ndarray | None = None  # [Hkv*D]
    bv: np.ndarray | None = None  # [Hkv*D]

    def arrays(self) -> dict[str, np.ndarray]:
        return {k: v for k, v in self.__dict__.items() if v is not None}

    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in self.arrays().values())


def expected_layer_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    E, F, Q, KV = config.hidden_size, config.intermediate_size, config.q_dim, config.kv_dim
    shapes = {
        "attn_norm": (E,), "wq": (E, Q), "wk": (E, KV), "wv": (E, KV), "wo": (Q, E),
        "ffn_norm": (E,), "w_gate": (E, F), "w_up": (E, F), "w_down": (F, E),
    }
    if config.qkv_bias:
        shapes.update(bq=(Q,), bk=(KV,), bv=(KV,))
    return shapes


class LazyLayers(Sequence[LayerWeights]):
    """A sequence of layers built on demand by ``build(i)``.

    ``cache`` layers are kept (least recently used dropped first); ``cache=None`` keeps all.
    """

    def __init__(self, n: int, build: Callable[[int], LayerWeights], cache: int | None = None):
        self._n = n
        self._build = build
        self._cache_size = cache
        self._cache: OrderedDict[int, LayerWeights] = OrderedDict()

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self._n))]
        if i < 0:
            i += self._n
        if not 0 <= i < self._n:
            raise IndexError(i)
        if i in self._cache:
            self._cache.move_to_end(i)
            return self._cache[i]
        layer = self._build(i)
        if self._cache_size is None or self._cache_size > 0:
            self._cache[i] = layer
            if self._cache_size is not None:
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        return layer

    def __iter__(self) -> Iterator[LayerWeights]:
        for i in range(self._n):
            yield self[i]

    def materialize(self) -> list[LayerWeights]:
        return [self[i] for i in range(self._n)]


@dataclass
class ModelWeights:
    config: ModelConfig
    embed: np.ndarray  # [V, E]
    layers: Sequence[LayerWeights]
    final_norm: np.ndarray  # [E]
    lm_head: np.ndarray  # [E, V]; tied models: embed.T (a view, no copy)

    def nbytes(self) -> int:
        n = self.embed.nbytes + self.final_norm.nbytes
        if not self.config.tie_word_embeddings:
            n += self.lm_head.nbytes
        return int(n + sum(layer.nbytes() for layer in self.layers))
