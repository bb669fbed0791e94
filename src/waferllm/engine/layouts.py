"""Head-aware feature orders: how attention features are laid out over mesh x.

For ``parts`` PE columns, the Hkv*D kv features are cut into ``parts`` blocks of
``col_features`` features (even, zero padding at the end). Inside a head, features are
stored in RoPE-pair order ``0, D/2, 1, D/2+1, ...`` so that the two halves RoPE
rotates together sit side by side on the same PE; q and k get the same order, which
leaves every q.k product unchanged. Query features of column j are the r = Hq/Hkv query
heads sharing each kv head of block j, ``[r, col_features]`` per column, so a column computes
its heads' partial scores alone.

Weights are permuted once, at placement; activations never are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from waferllm.models.rope import rope_cos_sin


@dataclass(frozen=True)
class HeadLayout:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    parts: int

    @property
    def group(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def col_features(self) -> int:
        """kv features per PE column (even, so that RoPE pairs never straddle two columns)."""
        t = math.ceil(self.kv_dim / self.parts)
        return t + (t % 2)

    tf = col_features  # the short name the placement's budget formulas use

    @property
    def kv_padded(self) -> int:
        return self.col_features * self.parts

    @property
    def q_padded(self) -> int:
        return self.group * self.kv_padded

    @cached_property
    def kv_cols(self) -> np.ndarray:
        """Wafer kv position -> original kv feature index (-1 = padding)."""
        d = self.head_dim
        half = d // 2
        within = np.empty(d, np.int64)
        within[0::2] = np.arange(half)
        within[1::2] = np.arange(half) + half
        orig = (np.arange(self.num_kv_heads)[:, None] * d + within[None, :]).reshape(-1)
        out = np.full(self.kv_padded, -1, np.int64)
        out[: orig.size] = orig
        return out

    @cached_property
    def q_cols(self) -> np.ndarray:
        """Wafer q position -> original q feature index (-1 = padding); blocks of [r, col_features] per column."""
        kv = self.kv_cols.reshape(self.parts, 1, self.col_features)  # [cols, 1, F]
        g, dd = kv // self.head_dim, kv % self.head_dim
        r = np.arange(self.group).reshape(1, self.group, 1)
        q = (g * self.group + r) * self.head_dim + dd
        return np.where(kv >= 0, q, -1).reshape(-1)

    @cached_property
    def head_of_pos(self) -> np.ndarray:
        """(parts, col_features): kv head of each feature a column holds (-1 = padding)."""
        kv = self.kv_cols.reshape(self.parts, self.col_features)
        return np.where(kv >= 0, kv // self.head_dim, -1)

    @cached_property
    def rope_index(self) -> np.ndarray:
        """(kv_padded,): frequency index of each wafer kv position (0 for padding)."""
        kv = self.kv_cols
        return np.where(kv >= 0, (kv % self.head_dim) % (self.head_dim // 2), 0)

    @cached_property
    def rope_sign(self) -> np.ndarray:
        """-1 for the first half of a pair (x*cos - partner*sin), +1 for the second."""
        kv = self.kv_cols
        return np.where((kv % self.head_dim) < self.head_dim // 2, -1.0, 1.0).astype(np.float32)

    @cached_property
    def within_head(self) -> np.ndarray:
        """(kv_padded,): index inside its head of each wafer kv position (0 for padding)."""
        return np.where(self.kv_cols >= 0, self.kv_cols % self.head_dim, 0)

    def rope_tables(self, config, positions) -> tuple[np.ndarray, np.ndarray]:
        """cos and signed sin, each [T, kv_padded] in wafer order, for token ``positions``:
        the same values as the reference's tables, rearranged."""
        cos, sin = rope_cos_sin(config, positions)
        return cos[:, self.within_head], sin[:, self.within_head] * self.rope_sign

    # ---- permuting weights and caches ---------------------------------------------
    def take_cols(self, w: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """w[..., cols] with zero columns for padding."""
        out = np.zeros(w.shape[:-1] + (cols.size,), dtype=w.dtype)
        ok = cols >= 0
        if _is_prefix_range(cols, ok):  # columns kept in order (an FFN's padding): one slice copy
            n = int(ok.sum())
            out[..., :n] = w[..., :n]
        else:
            out[..., ok] = w[..., cols[ok]]
        return out

    def take_rows(self, w: np.ndarray, rows: np.ndarray) -> np.ndarray:
        out = np.zeros((rows.size,) + w.shape[1:], dtype=w.dtype)
        ok = rows >= 0
        out[ok] = w[rows[ok]]
        return out

    def to_original_kv(self, x: np.ndarray) -> np.ndarray:
        """[..., kv_padded] wafer order -> [..., kv_dim] original order."""
        out = np.zeros(x.shape[:-1] + (self.kv_dim,), dtype=x.dtype)
        ok = self.kv_cols >= 0
        out[..., self.kv_cols[ok]] = x[..., ok]
        return out

    def from_original_kv(self, x: np.ndarray) -> np.ndarray:
        return self.take_cols(x, self.kv_cols)


def _is_prefix_range(index: np.ndarray, ok: np.ndarray) -> bool:
    """``index`` is 0, 1, ..., n-1 then only padding (-1)."""
    n = int(ok.sum())
    return bool(ok[:n].all()) and np.array_equal(index[:n], np.arange(n))
