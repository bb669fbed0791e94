"""The decode KV cache on the mesh: shift-based (WaferLLM) and concatenation schemes.

After loading L prompt tokens and any number of appends, the cache read back in
logical order equals the dense cache. The shift scheme's rows hold what a brute-force
model of lists of tokens says: L tokens in logical order, the bottom L mod Q rows one
more, the first row the oldest; between two steps a row loses at most its oldest token
and gains at most one from the row below (or, the bottom row, the new token). What
``update`` returns for attention is every row's tokens, oldest first. The concat
scheme grows only the bottom row; a full cache raises PlacementError.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from waferllm.engine.kvcache import KVCache
from waferllm.engine.layouts import HeadLayout
from waferllm.errors import MeshError, PlacementError
from waferllm.hardware import get_wafer
from waferllm.mesh import Mesh, Region

WAFER = get_wafer("wse2")


def make_cache(q: int, capacity: int, scheme: str = "shift", layers: int = 2, heads=(2, 1, 4), mode="numeric"):
    mesh = Mesh.square(WAFER, q, mode=mode)
    hl = HeadLayout(heads[0], heads[1], heads[2], q)
    return mesh, hl, KVCache(mesh, hl, layers, capacity, scheme, dtype="fp32")


def shift_rows(n: int, q: int) -> list[list[int]]:
    """Brute force: n tokens over q rows in logical order, the bottom n mod q rows one longer."""
    counts = [n // q + (i >= q - n % q if n % q else 0) for i in range(q)]
    tokens = iter(range(n))
    return [[next(tokens) for _ in range(c)] for c in counts]


def row_tokens(cache: KVCache) -> list[list[int]]:
    """Token index held by each slot, row by row, in ring order (from the K of layer 0, feature 0)."""
    out = []
    for i in range(cache.q):
        slots = (cache.head[i] + np.arange(cache.count[i])) % cache.cap
        out.append([int(round(x)) for x in cache.k[0][i, 0, 0, slots]])
    return out


class Driver:
    """Loads a prompt and appends tokens the way a decode step does, tracking the dense cache."""

    def __init__(self, q, capacity, scheme="shift", layers=2, seed=0):
        self.mesh, self.hl, self.cache = make_cache(q, capacity, scheme, layers)
        self.rng = np.random.default_rng(seed)
        self.layers = layers
        self.views = []
        self.dense_k = [np.zeros((0, self.hl.kv_padded), np.float32) for _ in range(layers)]
        self.dense_v = [np.zeros((0, self.hl.kv_padded), np.float32) for _ in range(layers)]

    def rows(self, n, start):
        """[n, kv_padded] K/V rows; feature 0 of every column block carries the token index."""
        k = self.rng.standard_normal((n, self.hl.kv_padded)).astype(np.float32)
        v = self.rng.standard_normal((n, self.hl.kv_padded)).astype(np.float32)
        k[:, :: self.hl.col_features] = (start + np.arange(n))[:, None]
        return k, v

    def load(self, length):
        """The prompt's K and V as a prefill region would hold them (model feature order, on
        another region and grid), read into the cache; their padding features arrive as zeros."""
        prefill = Mesh(Region(WAFER, 2, 3, row0=40, col0=7), mode="numeric")
        ks, vs = [], []
        for l in range(self.layers):
            k, v = (np.where(self.hl.kv_cols >= 0, a, 0) for a in self.rows(length, 0))
            ks.append(prefill.place(self.hl.to_original_kv(k), ("y", "x"), "fp32", name="k"))
            vs.append(prefill.place(self.hl.to_original_kv(v), ("y", "x"), "fp32", name="v"))
            self.dense_k[l], self.dense_v[l] = k, v
        self.cache.load(length, ks, vs, [np.arange(self.hl.kv_dim)] * self.layers)

    def append(self):
        """One decode step: every layer's update, in order."""
        n = self.cache.length
        self.views = []
        for l in range(self.layers):
            k, v = self.rows(1, n)
            kt = self.mesh.place(k[0], ("x",), "fp32", name="k")
            vt = self.mesh.place(v[0], ("x",), "fp32", name="v")
            self.views.append(self.cache.update(l, kt, vt))
            self.dense_k[l] = np.concatenate([self.dense_k[l], k])
            self.dense_v[l] = np.concatenate([self.dense_v[l], v])

    def check_logical(self):
        for l in range(self.layers):
            k, v = self.cache.logical(l)
            np.testing.assert_array_equal(k, self.dense_k[l])
            np.testing.assert_array_equal(v, self.dense_v[l])


def view_tokens(view) -> list[list[int]]:
    """Tokens a view shows each row, oldest first (feature 0 of column 0 carries the index)."""
    return [[int(round(x)) for x, ok in zip(view.k_t.tiles[i, 0, 0], view.valid[i]) if ok]
            for i in range(view.valid.shape[0])]


@settings(max_examples=40, deadline=None)
@given(q=st.integers(1, 9), length=st.integers(1, 30), appends=st.integers(0, 25), seed=st.integers(0, 3))
def test_shift_cache_matches_the_list_model_and_moves_only_neighbours(q, length, appends, seed):
    d = Driver(q, capacity=length + appends + seed, scheme="shift", seed=seed)
    d.load(length)
    assert row_tokens(d.cache) == shift_rows(length, q)
    d.check_logical()
    moves = 0
    for _ in range(appends):
        before = row_tokens(d.cache)
        d.append()
        after = row_tokens(d.cache)
        n = d.cache.length
        assert after == shift_rows(n, q)
        # what attention read during the step: the rows with the new token, oldest first
        for view in d.views:
            assert view_tokens(view) == after
            assert view.slots == max(len(r) for r in after)
        # neighbours only: a row keeps its tokens but perhaps its oldest (handed up), and
        # gains the oldest of the row below if that one handed it up (the bottom row: the new token)
        gave = [bool(b) and (not a or a[0] != b[0]) for b, a in zip(before, after)]
        for i in range(q):
            kept = before[i][1:] if gave[i] else before[i]
            assert after[i][: len(kept)] == kept, (i, before, after)
            got = [n - 1] if i == q - 1 else before[i + 1][:1] if gave[i + 1] else []
            assert after[i][len(kept):] == got, (i, before, after)
        moves += sum(gave)
    assert d.cache.shift_moves == moves * d.layers
    d.check_logical()


def test_update_runs_the_layers_of_a_token_in_order():
    d = Driver(3, capacity=20)
    d.load(4)  # counts 1 1 2
    k = d.mesh.place(np.zeros(d.hl.kv_padded, np.float32), ("x",), "fp32")
    with pytest.raises(MeshError, match="in order"):
        d.cache.update(1, k, k)
    d.cache.update(0, k, k)
    assert d.cache.length == 4  # committed only once every layer has its entry
    d.cache.update(1)  # a replayed layer: bookkeeping only
    assert d.cache.length == 5 and list(d.cache.count) == [1, 2, 2]


@settings(max_examples=25, deadline=None)
@given(q=st.integers(1, 9), length=st.integers(1, 30), appends=st.integers(0, 25))
def test_concat_cache_grows_only_the_bottom_row(q, length, appends):
    d = Driver(q, capacity=length + appends, scheme="concat")
    d.load(length)
    loaded = d.cache.count.copy()
    used0 = d.mesh.sram.used().copy()
    assert loaded.max() - loaded.min() <= 1  # the transition spreads the prompt evenly
    for _ in range(appends):
        before = row_tokens(d.cache)
        d.append()
        assert row_tokens(d.cache)[:-1] == before[:-1]  # nothing ever shifts
    np.testing.assert_array_equal(d.cache.count[:-1], loaded[:-1])
    assert d.cache.count[-1] == loaded[-1] + appends
    assert d.cache.shift_moves == 0
    d.check_logical()
    # its SRAM: only the bottom row of PEs holds the growth
    grown = d.mesh.sram.used() - used0
    np.testing.assert_array_equal(grown[:-1], 0)
    np.testing.assert_array_equal(grown[-1], appends * d.cache.slot_bytes)


@pytest.mark.parametrize("scheme", ["shift", "concat"])
def test_full_cache_raises(scheme):
    d = Driver(3, capacity=7, scheme=scheme)
    d.load(4)
    for _ in range(3):
        d.append()
    assert d.cache.length == 7
    with pytest.raises(PlacementError, match="full"):
        d.append()
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


def test_program_key_and_the_charges_of_one_append():
    """The key says (slots of the fullest row, whether rows shift); an append charges one
    hop up for each moving row's K and V block, per layer, and the write of the new entry."""
    mesh, hl, cache = make_cache(3, capacity=20, layers=2, mode="dry")
    cache.load(4)  # counts 1 1 2: the bottom row is the fuller one, it shifts
    assert cache.program_key() == (2, True)
    entry = 2 * hl.col_features * 4  # K and V feature blocks, fp32
    for layer in range(2):
        cache.charge_append()  # charged beside the layer's program (its message count changes per token)
        cache.update(layer, mesh.zeros((hl.kv_padded,), ("x",)), mesh.zeros((hl.kv_padded,), ("x",)))
    t = mesh.ledger.totals
    assert t["bytes_moved"] == 2 * entry * 1 * 3  # 2 layers x 1 moving row x its 3 PEs
    assert t["sram_write_bytes"] == 2 * (entry * 3 + entry * 3)  # the shift's writes and the new entry's
    assert cache.program_key() == (2, True)  # counts 1 2 2
    assert list(cache.count) == [1, 2, 2]


def test_concat_bottom_row_cap_is_the_whole_capacity_but_sram_limits_it():
    """The concat scheme's growth lands on one row of PEs: its SRAM overflows long before the shift scheme's."""
    from waferllm.errors import SRAMOverflowError

    small = WAFER.replace(sram_bytes_per_pe=12 * 1024)
    mesh = Mesh.square(small, 4, mode="dry")
    hl = HeadLayout(2, 1, 64, 4)
    per_token_row = 2 * hl.col_features * 4 * 4  # K and V, fp32, 4 layers
    fit = small.usable_sram_bytes_per_pe // per_token_row
    shift = KVCache(mesh, hl, 4, 4 * fit, "shift", dtype="fp32")  # fits: every row holds `fit` tokens
    assert shift.cap == fit
    mesh2 = Mesh.square(small, 4, mode="dry")
    concat = KVCache(mesh2, hl, 4, 4 * fit, "concat", dtype="fp32")
    concat.load(4)
    with pytest.raises(SRAMOverflowError, match="SRAM overflow on region .*concat"):
        for _ in range(4 * fit):
            for layer in range(4):
                concat.update(layer)
    assert concat.count[-1] <= fit + 1


@pytest.mark.parametrize("grid,prompt,steps", [(4, 9, 23), (5, 0, 17), (3, 7, 1)])
def test_a_shape_only_cache_catches_up_on_replayed_steps_exactly(grid, prompt, steps):
    """A dry shift cache counts replayed steps' appends and applies them when read: its rows,
    ring heads, hand-over count and program keys equal appending token by token."""
    wafer = get_wafer("wse2")
    caches = []
    for lazy in (True, False):
        mesh = Mesh(Region(wafer, grid, grid), mode="dry")
        c = KVCache(mesh, HeadLayout(4, 2, 8, grid), 3, 64, "shift", "fp16")
        c._lazy = lazy
        c.load(prompt)
        caches.append(c)
    keys = [[], []]
    for _ in range(steps):
        for i, c in enumerate(caches):
            keys[i].append((c.program_key(), c.program_key(3)))
            c.advance()
    lazy, eager = caches
    assert keys[0] == keys[1]
    assert lazy._lag == steps  # nothing applied yet
    assert lazy.count.tolist() == eager.count.tolist() and lazy.head.tolist() == eager.head.tolist()
    assert lazy.shift_moves == eager.shift_moves and lazy.length == prompt + steps
    with pytest.raises(PlacementError, match="KV cache full"):
        for _ in range(64):
            lazy.advance()


@settings(max_examples=30, deadline=None)
@given(scheme=st.sampled_from(["shift", "concat"]), q=st.integers(1, 6), length=st.integers(1, 12),
       ops=st.lists(st.sampled_from(["fused", "fused", "mesh", "rollback", "load", "read"]), max_size=14))
def test_fused_reads_follow_every_change_to_the_cache(scheme, q, length, ops):
    """What a fused layer reads back (``update_values``: the cache in token order, kept
    between reads) equals the dense cache through any mix of fused and primitive appends,
    rollbacks of rejected tokens and new prompts."""
    d = Driver(q, capacity=length + len(ops) + 2, scheme=scheme, seed=q)
    d.load(length)
    for op in ops:
        c = d.cache
        if op == "rollback":
            drop = min(2, c.length if scheme == "shift" else int(c.count[-1]))
            c.rollback(drop)
            d.dense_k = [k[:len(k) - drop] for k in d.dense_k]
            d.dense_v = [v[:len(v) - drop] for v in d.dense_v]
        elif op == "load":
            d.load(max(1, length - 1))
        elif op == "mesh":
            d.append()
        elif op == "read":
            d.check_logical()
        else:
            n = c.length
            for l in range(d.layers):
                k, v = d.rows(1, n)
                got_k, got_v = c.update_values(l, k[0], v[0])
                d.dense_k[l] = np.concatenate([d.dense_k[l], k])
                d.dense_v[l] = np.concatenate([d.dense_v[l], v])
                np.testing.assert_array_equal(got_k, d.dense_k[l])
                np.testing.assert_array_equal(got_v, d.dense_v[l])
    d.check_logical()
