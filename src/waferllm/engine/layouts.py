"""Head-aware feature orders: how attention features are laid out over mesh x.

For ``parts`` PE columns, the Hkv*D kv features are cut into ``parts`` blocks of
``tf`` features (``tf`` even, zero padding at the end). Inside a head, features are
stored in RoPE-pair order ``0, D/2, 1, D/2+1, ...`` so that the two halves RoPE
rotates together sit side by side on the same PE; q and k get the same order, which
leaves every q.k product unchanged. Query features of column j are the r = Hq/Hkv query
heads sharing each kv head of block j, ``[r, tf]`` per column, so a column computes
its heads' partial scores alone.

Weights are permuted once, at placement; activations never are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np


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
    def tf(self) -> int:
        """kv features per PE column (even)."""
        t = math.ceil(self.kv_dim / self.parts)
        return t + (t % 2)

    @property
    def kv_padded(self) -> int:
        return self.tf * self.parts

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
        """Wafer q position -> original q feature index (-1 = padding); blocks of [r, tf] per column."""
        kv = self.kv_cols.reshape(self.parts, 1, self.tf)
        g, dd = kv // self.head_dim, kv % self.head_dim
        r = np.arange(self.group).reshape(1, self.group, 1)
        q = (g * self.group + r) * self.head_dim + dd
        return np.where(kv >= 0, q, -1).reshape(-1)

    @cached_property
    def head_of_pos(self) -> np.ndarray:
        """(parts, tf): kv head of each feature a column holds (-1 = padding)."""
        kv = self.kv_cols.reshape(self.parts, self.tf)
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

    def max_heads_per_column(self) -> int:
        hp = self.head_of_pos
        return int(max(len(set(row[row >= 0].tolist())) for row in hp)) or 1

    # ---- permuting weights and caches ---------------------------------------------
    def take_cols(self, w: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """w[..., cols] with zero columns for padding."""
        out = np.zeros(w.shape[:-1] + (cols.size,), dtype=w.dtype)
        ok = cols >= 0
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

    def to_original_q(self, x: np.ndarray) -> np.ndarray:
        out = np.zeros(x.shape[:-1] + (self.num_heads * self.head_dim,), dtype=x.dtype)
        ok = self.q_cols >= 0
        out[..., self.q_cols[ok]] = x[..., ok]
        return out


def padded(n: int, parts: int) -> int:
    return math.ceil(n / parts) * parts
