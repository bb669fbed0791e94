"""Faster move pricing prices the same: each shortcut against the general path it replaces."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from waferllm.hardware import get_wafer
from waferllm.mesh import move
from waferllm.mesh.move import LOADS, MoveCost, Placement, move_cost, move_traffic
from waferllm.mesh.region import Region

WAFER = get_wafer("wse2")


def _map(rng, n, parts, kind):
    """A coordinate map of n indices over ``parts`` lines: blocked, or any (permuted, uneven)."""
    if kind == "blocked":
        return np.arange(n) * parts // n
    return rng.integers(0, parts, n)


def _loads(tr):
    return {k: getattr(tr, k) for k in LOADS}


def _same(a, b):
    for k in LOADS:
        np.testing.assert_array_equal(getattr(a, k), getattr(b, k), err_msg=k)
    assert (a.messages, a.bytes_moved, a.max_hops, a.origin) == (b.messages, b.bytes_moved, b.max_hops, b.origin)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.sampled_from(["blocked", "any"]), st.sampled_from(["blocked", "any"]))
def test_transpose_priced_from_sums_equals_cells(seed, kind_a, kind_b):
    """A plain transpose (rows' dim -> columns, columns' dim -> rows), priced from a few
    (H, W) sums, loads every ramp and link as the per-cell path does."""
    rng = np.random.default_rng(seed)
    r1, c1, r2, c2 = rng.integers(1, 7, 4)
    src_reg = Region(WAFER, int(r1), int(c1), int(rng.integers(0, 5)), int(rng.integers(0, 5)))
    dst_reg = Region(WAFER, int(r2), int(c2), int(rng.integers(0, 5)), int(rng.integers(0, 5)))
    A, B = int(rng.integers(1, 13)), int(rng.integers(1, 13))
    shape = (A, B, 3)  # a third dim spread over no axis
    src = Placement(src_reg, shape, y_dim=0, y_of=_map(rng, A, src_reg.rows, kind_a), x_dim=1,
                    x_of=_map(rng, B, src_reg.cols, kind_b))
    dst = Placement(dst_reg, shape, y_dim=1, y_of=_map(rng, B, dst_reg.rows, kind_a), x_dim=0,
                    x_of=_map(rng, A, dst_reg.cols, kind_b))
    assert move._transposed(src, dst)
    box = move._box(src, dst)
    _same(move._traffic_transposed(src, dst, 2, box), move._traffic_cells(src, dst, 2, box))


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000))
def test_factored_loads_price_as_their_arrays(seed):
    """A separable move keeps its loads as outer products: the cost read from the factors
    equals the one read from the arrays."""
    rng = np.random.default_rng(seed)
    reg = Region(WAFER, 5, 6, int(rng.integers(0, 4)), int(rng.integers(0, 4)))
    other = Region(WAFER, 4, 3, int(rng.integers(0, 6)), int(rng.integers(0, 6)))
    shape = (int(rng.integers(1, 11)), int(rng.integers(1, 11)))
    src = Placement(reg, shape, y_dim=0, y_of=_map(rng, shape[0], 5, "any"), x_dim=1, x_of=_map(rng, shape[1], 6, "any"))
    dst = Placement(other, shape, y_dim=0, y_of=_map(rng, shape[0], 4, "any"), x_dim=1,
                    x_of=_map(rng, shape[1], 3, "any"))
    tr = move_traffic(src, dst, 4)
    cost = MoveCost.of(tr)
    arrays = _loads(tr)  # materialised now
    assert cost.busiest_bytes == max(int(a.max(initial=0)) for a in arrays.values())
    assert cost.hop_bytes == sum(int(arrays[k].sum()) for k in ("east", "west", "south", "north"))
    assert (cost.read_bytes, cost.write_bytes) == (int(arrays["inject"].sum()), int(arrays["eject"].sum()))


@pytest.mark.parametrize("layers", [1, 3, 7])
def test_a_stacked_move_costs_its_layers_times_one(layers):
    """A leading dim spread over no axis multiplies every element's bytes: priced once per
    element byte and scaled, it equals pricing the whole tensor."""
    rng = np.random.default_rng(layers)
    a, b = Region(WAFER, 6, 6), Region(WAFER, 4, 4, 0, 6)
    one = (10, 12)
    src = Placement(a, (layers,) + one, y_dim=1, y_of=_map(rng, 10, 6, "any"), x_dim=2, x_of=_map(rng, 12, 6, "any"))
    dst = Placement(b, (layers,) + one, y_dim=2, y_of=_map(rng, 12, 4, "any"), x_dim=1, x_of=_map(rng, 10, 4, "any"))
    whole = MoveCost.of(move_traffic(src, dst, 2))
    assert move_cost(src, dst, 2) == whole
    single = MoveCost.of(move_traffic(dataclasses.replace(src, shape=(1,) + one), dataclasses.replace(dst, shape=(1,) + one), 1))
    assert whole == single.scaled(2 * layers)
    assert whole.messages == single.messages and whole.max_hops == single.max_hops


def test_the_cost_cache_tells_maps_apart_by_every_value():
    """Two moves that differ in one element's coordinate are two entries."""
    a, b = Region(WAFER, 4, 4), Region(WAFER, 4, 4, 4, 0)
    y = np.arange(16) // 4
    src = Placement(a, (16,), y_dim=0, y_of=y)
    y2 = y.copy()
    y2[5] = 3
    c1 = move_cost(src, Placement(b, (16,), y_dim=0, y_of=y), 2)
    c2 = move_cost(src, Placement(b, (16,), y_dim=0, y_of=y2), 2)
    assert c1 == MoveCost.of(move_traffic(src, Placement(b, (16,), y_dim=0, y_of=y), 2))
    assert c2 == MoveCost.of(move_traffic(src, Placement(b, (16,), y_dim=0, y_of=y2), 2))
    assert c1 != c2
