"""INTERLEAVE ring properties for every line length 1..64, and the plain ring for contrast."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from waferllm.mesh.interleave import (
    ring_link_loads, ring_max_hops, ring_next, ring_order, ring_rank, ring_source,
)

NS = list(range(1, 65))


@pytest.mark.parametrize("kind", ["interleave", "plain"])
@pytest.mark.parametrize("n", NS)
def test_ring_visits_every_position_once(n, kind):
    order = ring_order(n, kind)
    assert sorted(order) == list(range(n))
    assert order[0] == 0
    rank = ring_rank(n, kind)
    assert all(order[rank[p]] == p for p in range(n))
    # following ring_next from 0 walks the whole ring and returns
    nxt = ring_next(n, kind)
    seen, p = [], 0
    for _ in range(n):
        seen.append(p)
        p = int(nxt[p])
    assert p == 0 and sorted(seen) == list(range(n))


# Written out by hand from the paper's figure: out along the even positions, back along the odd ones.
HAND_ORDERS = {
    1: (0,),
    2: (0, 1),
    3: (0, 2, 1),
    4: (0, 2, 3, 1),
    5: (0, 2, 4, 3, 1),
    6: (0, 2, 4, 5, 3, 1),
    7: (0, 2, 4, 6, 5, 3, 1),
    8: (0, 2, 4, 6, 7, 5, 3, 1),
}


@pytest.mark.parametrize("n", sorted(HAND_ORDERS))
def test_interleave_order_matches_the_hand_written_ring(n):
    assert ring_order(n) == HAND_ORDERS[n]


@pytest.mark.parametrize("n", range(3, 9))
def test_interleave_is_the_only_two_hop_ring(n):
    # brute force over every cycle through 0: the rings whose links all span <= 2 positions
    found = {perm for perm in itertools.permutations(range(1, n))
             if all(abs(a - b) <= 2 for a, b in zip((0, *perm), (*perm, 0)))}
    order = ring_order(n)
    assert found == {order[1:], order[1:][::-1]}


@pytest.mark.parametrize("n", NS)
def test_interleave_neighbours_within_two_hops(n):
    nxt = ring_next(n)
    dist = np.abs(nxt - np.arange(n))
    if n >= 3:
        assert dist.max() == 2 == ring_max_hops(n)
    else:
        assert ring_max_hops(n) == n - 1
    # the two ends turn around with one hop each; every other step is 2 hops
    if n >= 3:
        assert sorted(dist.tolist()) == [1, 1] + [2] * (n - 2)
        assert int(nxt[1]) == 0 and int(ring_next(n, steps=-1)[0]) == 1


@pytest.mark.parametrize("n", NS)
def test_each_directed_link_carries_at_most_one_flow(n):
    loads = ring_link_loads(n)
    assert all(v == 1 for v in loads.values())
    assert all(abs(a - b) == 1 for a, b in loads)
    # every flow's hops are accounted for
    nxt = ring_next(n)
    assert sum(loads.values()) == int(np.abs(nxt - np.arange(n)).sum())
    plain = ring_link_loads(n, "plain")
    assert all(v == 1 for v in plain.values())


@pytest.mark.parametrize("n", NS)
def test_plain_ring_wrap(n):
    assert ring_max_hops(n, "plain") == max(n - 1, 0)
    if n >= 2:
        assert int(ring_next(n, "plain")[n - 1]) == 0


@pytest.mark.parametrize("n", [1, 2, 3, 8, 13, 64])
def test_steps_compose_and_source_inverts_next(n):
    rng = np.random.default_rng(n)
    for kind in ("interleave", "plain"):
        for s in rng.integers(-3 * n, 3 * n, size=5):
            s = int(s)
            nxt = ring_next(n, kind, s)
            src = ring_source(n, kind, s)
            assert np.array_equal(nxt[src], np.arange(n))
            one = ring_next(n, kind)
            p = np.arange(n)
            for _ in range(s % n):
                p = one[p]
            assert np.array_equal(p, nxt)
        per_line = rng.integers(-n, n, size=4)
        src = ring_source(n, kind, per_line)
        assert src.shape == (4, n)
        for i, s in enumerate(per_line):
            assert np.array_equal(src[i], ring_source(n, kind, int(s)))


def test_bad_rings():
    with pytest.raises(ValueError, match="ring length must be positive"):
        ring_order(0)
    with pytest.raises(ValueError, match="unknown ring kind 'torus'"):
        ring_order(4, "torus")
