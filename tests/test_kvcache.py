"""The decode KV cache on the mesh: shift-based (WaferLLM) and concatenation schemes.

After loading L prompt tokens and any number of appends, the cache read back in
logical order equals the dense cache; the shift scheme keeps rows balanced within one
token, moves only neighbour-to-neighbour (a contiguous run of bottom rows, one token
each, one row up) and keeps the order contiguous; the concat scheme grows only the
bottom row; a full cache raises PlacementError.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from waferllm.engine.kvcache import KVCache
from waferllm.engine.layouts import HeadLayout
from waferllm.errors import PlacementError
from waferllm.hardware import get_wafer
from waferllm.mesh import Mesh

WAFER = get_wafer("wse2")


def make_cache(q: int, capacity: int, scheme: str = "shift", layers: int = 2, heads=(2, 1, 4)):
    mesh = Mesh.square(WAFER, q, mode="numeric")
    hl = HeadLayout(heads[0], heads[1], heads[2], q)
    return mesh, hl, KVCache(mesh, hl, layers, capacity, scheme, dtype="fp32")


def row_tokens(cache: KVCache) -> list[list[int]]:
    """Token index held by each slot, row by row, in ring order (from the K of layer 0, feature 0)."""
    out = []
    for i in range(cache.q):
        slots = (cache.head[i] + np.arange(cache.count[i])) % cache.cap
        out.append([int(round(x)) for x in cache.k[0][i, 0, 0, slots]])
    return out


class Driver:
    """Loads a prompt and appends tokens the way a decode layer does, tracking the dense cache."""

    def __init__(self, q, capacity, scheme="shift", layers=2, seed=0):
        self.mesh, self.hl, self.cache = make_cache(q, capacity, scheme, layers)
        self.rng = np.random.default_rng(seed)
        self.layers = layers
        self.dense_k = [np.zeros((0, self.hl.kv_padded), np.float32) for _ in range(layers)]
        self.dense_v = [np.zeros((0, self.hl.kv_padded), np.float32) for _ in range(layers)]

    def rows(self, n, start):
        """[n, kv_padded] K/V rows; feature 0 of every column block carries the token index."""
        k = self.rng.standard_normal((n, self.hl.kv_padded)).astype(np.float32)
        v = self.rng.standard_normal((n, self.hl.kv_padded)).astype(np.float32)
        k[:, :: self.hl.tf] = (start + np.arange(n))[:, None]
        return k, v

    def load(self, length):
        ks, vs = [], []
        for l in range(self.layers):
            k, v = self.rows(length, 0)
            ks.append(k)
            vs.append(v)
            self.dense_k[l], self.dense_v[l] = k, v
        self.cache.load(length, ks, vs)

    def append(self):
        n = self.cache.length
        movers = self.cache.plan_append()
        for l in range(self.layers):
            k, v = self.rows(1, n)
            kt = self.mesh.place(k[0], ("x",), "fp32", name="k")
            vt = self.mesh.place(v[0], ("x",), "fp32", name="v")
            self.cache.write(l, kt, vt, movers)
            self.dense_k[l] = np.concatenate([self.dense_k[l], k])
            self.dense_v[l] = np.concatenate([self.dense_v[l], v])
        self.cache.commit(movers)
        return movers

    def check_logical(self):
        for l in range(self.layers):
            k, v = self.cache.logical(l)
            np.testing.assert_array_equal(k, self.dense_k[l])
            np.testing.assert_array_equal(v, self.dense_v[l])


@settings(max_examples=40, deadline=None)
@given(q=st.integers(1, 9), length=st.integers(1, 30), appends=st.integers(0, 25), seed=st.integers(0, 3))
def test_shift_cache_logical_order_balance_and_neighbour_moves(q, length, appends, seed):
    d = Driver(q, capacity=length + appends + seed, scheme="shift", seed=seed)
    d.load(length)
    d.check_logical()
    c = d.cache
    assert c.count.max() - c.count.min() <= 1
    assert np.all(np.diff(c.count) >= 0)  # the bottom rows hold the extra tokens
    for _ in range(appends):
        before = row_tokens(c)
        counts = c.count.copy()
        movers = d.append()
        after = row_tokens(c)
        # movers: a contiguous run of rows ending at the bottom one
        if movers.size:
            np.testing.assert_array_equal(movers, np.arange(q - movers.size, q))
            assert movers[0] >= 1
            # they move only when the bottom rows were the fuller ones
            assert np.all(counts[movers] == counts.max()) and counts[movers[0] - 1] == counts.min() < counts.max()
        else:
            assert counts.max() == counts.min()  # all rows equal: the new token simply enters the bottom row
        # each moving row hands exactly its oldest token to the row above; nothing else moves
        for i in range(q):
            gave = [before[i][0]] if i in movers else []
            got = [before[i + 1][0]] if (i + 1) in movers else []
            new = [c.length - 1] if i == q - 1 else []
            expect = before[i][len(gave):] + got + new
            assert after[i] == expect, (i, before, after)
        assert c.count.max() - c.count.min() <= 1
        # the logical order stays contiguous: row i's tokens directly precede row i+1's
        flat = [t for r in after for t in r]
        assert flat == list(range(c.length))
    d.check_logical()


def test_shift_moves_counted_once_per_moving_row_and_layer():
    d = Driver(4, capacity=64, layers=3)
    d.load(5)  # counts 1 1 1 2
    total = 0
    for _ in range(9):
        total += d.append().size * 3
    assert d.cache.shift_moves == total > 0
    d.check_logical()


@settings(max_examples=25, deadline=None)
@given(q=st.integers(1, 9), length=st.integers(1, 30), appends=st.integers(0, 25))
def test_concat_cache_grows_only_the_bottom_row(q, length, appends):
    d = Driver(q, capacity=length + appends, scheme="concat")
    d.load(length)
    loaded = d.cache.count.copy()
    used0 = d.mesh.sram.used().copy()
    assert loaded.max() - loaded.min() <= 1  # the transition spreads the prompt evenly
    for _ in range(appends):
        assert d.append().size == 0  # nothing ever shifts
    np.testing.assert_array_equal(d.cache.count[:-1], loaded[:-1])
    assert d.cache.count[-1] == loaded[-1] + appends
    assert d.cache.shift_moves == 0
    d.check_logical()
    # its SRAM: only the bottom row of PEs holds the growth
    grown = d.mesh.sram.used() - used0
    np.testing.assert_array_equal(grown[:-1], 0)
    np.testing.assert_array_equal(grown[-1], appends * d.cache._per_slot)


@pytest.mark.parametrize("scheme", ["shift", "concat"])
def test_full_cache_raises(scheme):
    d = Driver(3, capacity=7, scheme=scheme)
    d.load(4)
    for _ in range(3):
        d.append()
    assert d.cache.length == 7
    with pytest.raises(PlacementError, match="full"):
        d.cache.plan_append()
    d.check_logical()


def test_load_beyond_capacity_raises():
    _, _, cache = make_cache(3, capacity=6)
    with pytest.raises(PlacementError, match="capacity"):
        cache.load(7)


def test_unknown_scheme_raises():
    mesh = Mesh.square(WAFER, 2)
    with pytest.raises(PlacementError, match="scheme"):
        KVCache(mesh, HeadLayout(2, 1, 4, 2), 1, 8, "ring")


def test_shift_capacity_per_row_and_reset():
    d = Driver(4, capacity=10)
    assert d.cache.cap == 3  # ceil(10 / 4) slots per row
    d.load(6)
    d.append()
    d.cache.reset()
    assert d.cache.length == 0 and d.cache.occupied == 0
    d.load(2)
    assert list(d.cache.count) == [0, 0, 1, 1]


def test_valid_mask_after_pending_append():
    d = Driver(3, capacity=20)
    d.load(4)  # counts 1 1 2
    movers = d.cache.plan_append()
    np.testing.assert_array_equal(movers, [2])
    valid = d.cache.valid(movers)
    assert valid.sum() == 5
    np.testing.assert_array_equal(valid.sum(axis=1), [1, 2, 2])
    assert d.cache.valid().sum() == 4  # nothing committed yet


def test_concat_bottom_row_cap_is_the_whole_capacity_but_sram_limits_it():
    """The concat scheme's growth lands on one row of PEs: its SRAM overflows long before the shift scheme's."""
    from waferllm.errors import SRAMOverflowError

    small = WAFER.replace(sram_bytes_per_pe=12 * 1024)
    mesh = Mesh.square(small, 4, mode="dry")
    hl = HeadLayout(2, 1, 64, 4)
    per_token_row = 2 * hl.tf * 4 * 4  # K and V, fp32, 4 layers
    fit = small.usable_sram_bytes_per_pe // per_token_row
    shift = KVCache(mesh, hl, 4, 4 * fit, "shift", dtype="fp32")  # fits: every row holds `fit` tokens
    assert shift.cap == fit
    mesh2 = Mesh.square(small, 4, mode="dry")
    concat = KVCache(mesh2, hl, 4, 4 * fit, "concat", dtype="fp32")
    concat.load(4)
    with pytest.raises(SRAMOverflowError):
        for _ in range(4 * fit):
            concat.commit(concat.plan_append())
    assert concat.count[-1] <= fit + 1
