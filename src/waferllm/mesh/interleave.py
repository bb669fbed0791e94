"""Rings embedded in a line of PEs.

The INTERLEAVE ring visits positions ``0, 2, 4, ..., (last even), (last odd), ..., 3, 1``
and back to 0, so every logical neighbour is at most 2 physical hops away and every
directed link carries exactly one flow. The plain ring ``0, 1, ..., N-1`` pays N-1
hops on its wrap-around link.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np


@lru_cache(maxsize=256)
def ring_order(n: int, kind: str = "interleave") -> tuple[int, ...]:
    """Physical positions in logical ring order."""
    if n <= 0:
        raise ValueError("ring length must be positive")
    if kind == "plain":
        return tuple(range(n))
    if kind != "interleave":
        raise ValueError(f"unknown ring kind {kind!r}")
    evens = list(range(0, n, 2))
    odds = list(range(1, n, 2))
    return tuple(evens + odds[::-1])


@lru_cache(maxsize=256)
def _rank(n: int, kind: str) -> np.ndarray:
    order = ring_order(n, kind)
    rank = np.empty(n, dtype=np.int64)
    rank[list(order)] = np.arange(n)
    rank.setflags(write=False)
    return rank


def ring_rank(n: int, kind: str = "interleave") -> np.ndarray:
    """rank[p] = logical ring index of physical position p."""
    return _rank(n, kind)


def ring_next(n: int, kind: str = "interleave", steps: int = 1) -> np.ndarray:
    """nxt[p] = physical position reached from p after ``steps`` ring steps (steps may be negative)."""
    order = np.asarray(ring_order(n, kind))
    return order[(ring_rank(n, kind) + steps) % n]


def ring_source(n: int, kind: str = "interleave", steps=1) -> np.ndarray:
    if np.ndim(steps) == 0:
        return _ring_source_uniform(n, kind, int(steps))
    return _ring_source(n, kind, steps)


@lru_cache(maxsize=4096)
def _ring_source_uniform(n: int, kind: str, steps: int) -> np.ndarray:
    out = _ring_source(n, kind, steps)
    out.setflags(write=False)
    return out


def _ring_source(n: int, kind: str = "interleave", steps=1) -> np.ndarray:
    """src[p] = physical position whose tile lands on p after ``steps`` ring steps.

    ``steps`` may be an int or an array (one value per line, broadcast against positions).
    """
    order = np.asarray(ring_order(n, kind))
    return order[(ring_rank(n, kind) - np.asarray(steps)[..., None]) % n] if np.ndim(steps) else order[(ring_rank(n, kind) - steps) % n]


@lru_cache(maxsize=256)
def ring_max_hops(n: int, kind: str = "interleave") -> int:
    """Longest physical distance between logical neighbours on the ring."""
    if n <= 1:
        return 0
    nxt = ring_next(n, kind)
    return int(np.abs(nxt - np.arange(n)).max())


@lru_cache(maxsize=256)
def _link_loads(n: int, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """(right, left): flows of one ring step on each link a -> a+1 and a+1 -> a."""
    p = np.arange(n)
    q = ring_next(n, kind)
    right = np.zeros(n + 1, np.int64)
    left = np.zeros(n + 1, np.int64)
    r, l_ = q > p, q < p
    np.add.at(right, p[r], 1)  # a flow p -> q (q > p) uses links p..q-1 rightward
    np.add.at(right, q[r], -1)
    np.add.at(left, q[l_], 1)  # a flow p -> q (q < p) uses links q..p-1 leftward
    np.add.at(left, p[l_], -1)
    out = np.cumsum(right)[: n - 1], np.cumsum(left)[: n - 1]
    for a in out:
        a.setflags(write=False)
    return out


def ring_link_loads(n: int, kind: str = "interleave") -> dict[tuple[int, int], int]:
    """How many flows of one ring step cross each directed link (p -> p±1), links in use only."""
    right, left = _link_loads(n, kind)
    loads = {(int(a), int(a) + 1): int(right[a]) for a in np.flatnonzero(right)}
    loads.update({(int(a) + 1, int(a)): int(left[a]) for a in np.flatnonzero(left)})
    return loads


@lru_cache(maxsize=256)
def ring_max_link_load(n: int, kind: str = "interleave") -> int:
    """Most flows one directed link carries in a ring step (1 for both rings: no sharing)."""
    right, left = _link_loads(n, kind)
    return int(max(right.max(initial=0), left.max(initial=0)))
