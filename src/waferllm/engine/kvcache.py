"""The decode KV cache on the mesh: shift-based (WaferLLM) or concatenation (baseline).

Decode layout: the Q x Q region's rows hold tokens, its columns hold kv feature blocks
(``HeadLayout``). Per layer, PE (i, j) keeps K^T[block j, slots] (K cached transposed,
so q K^T is one more GEMV) and V[slots, block j]; every PE of row i has the same slots.

Shift-based: with n tokens, rows hold q or q+1 tokens (n = qQ + m, the bottom m rows
have q+1) in logical order, row 0 the oldest. A new token enters the bottom row; if the
bottom rows were already the fuller ones, each of them hands its oldest token to the
row above in one parallel neighbour step, up to the first row that had fewer: rows stay
balanced within one token, order stays contiguous, and only neighbours exchange data.
Rows are ring buffers, so handing over the oldest token moves no other data.

Concatenation: the prompt is spread over the rows at the transition, then every new
token is appended to the bottom row, which alone grows (the capacity limit the paper
measures, ~Q times smaller).

Per decode step, the layers of a region call :meth:`KVCache.update` in order: the first
plans the append (which rows hand a token up: the same for every layer), each stores
its layer's new K/V and does its layer's shift, and the last commits the new occupancy.
``update`` returns what attention reads: the occupied slots of every row, oldest first.
A verification pass (speculative decoding) appends several tokens of one request in one
step (:meth:`KVCache.begin`): each layer appends them in order, each token's attention
reading the cache up to itself; :meth:`KVCache.rollback` then drops the rejected ones.
Each layer's append is charged by :meth:`KVCache.charge_append`, beside the layer's own
program (how many rows hand a token up changes every token, so a replayed layer does not
carry it); a layer whose values are computed fused stores its K/V with
:meth:`KVCache.update_values` and reads the cache back in token order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from waferllm.engine.transition import positions
from waferllm.errors import MeshError, PlacementError
from waferllm.hardware.plmr import DTYPE_BYTES
from waferllm.mesh import comm, compute
from waferllm.mesh.move import Placement
from waferllm.mesh.tensor import NP_DTYPES, DistTensor

SCHEMES = ("shift", "concat")


@dataclass
class KVView:
    """One layer's cache as attention reads it: every row's occupied slots, oldest first.

    Views of the cache's own storage (no copy, no SRAM of their own)."""

    k_t: DistTensor  # K^T [kv_padded, rows * slots] (x, y)
    v: DistTensor  # V [rows * slots, kv_padded] (y, x)
    valid: np.ndarray | None  # (rows, slots): True where a row's slot holds a token (numeric runs)
    index: np.ndarray | None = None  # (rows, slots): the token each slot holds, 0 the oldest (numeric runs)

    @property
    def slots(self) -> int:
        return self.k_t.tile_shape[1]

    def causal(self, tokens: int) -> np.ndarray | None:
        """(rows, tokens, slots): what each of the newest ``tokens`` tokens may attend to,
        itself and the tokens before it (a verification pass's queries; None in a dry run)."""
        if self.valid is None:
            return None
        newest = int(self.valid.sum()) - tokens  # the first of them
        limit = newest + np.arange(tokens)
        return self.valid[:, None, :] & (self.index[:, None, :] <= limit[None, :, None])


class _CaughtUp:
    """A cache field read only once the appends :meth:`KVCache.advance` counted are applied."""

    def __init__(self, field: str, doc: str):
        self.field, self.__doc__ = field, doc

    def __get__(self, cache, owner=None):
        if cache is None:
            return self
        if cache._lag:
            cache._catch_up()
        return getattr(cache, self.field)

    def __set__(self, cache, value) -> None:
        setattr(cache, self.field, value)


class KVCache:
    def __init__(self, mesh, head_layout, layers: int, capacity_tokens: int, scheme: str = "shift",
                 dtype: str = "fp16", name: str = "kv"):
        if scheme not in SCHEMES:
            raise PlacementError(f"unknown KV cache scheme {scheme!r}; expected one of {', '.join(SCHEMES)}")
        self.mesh = mesh
        self.hl = head_layout
        self.layers = layers
        self.scheme = scheme
        self.dtype = dtype
        self.name = name
        self.capacity_tokens = capacity_tokens
        q = mesh.rows
        self.q = q
        width = head_layout.col_features
        # slots per PE row: balanced for shift; the bottom row takes all growth for concat
        self.cap = -(-capacity_tokens // q) if scheme == "shift" else capacity_tokens
        self.entry_bytes = 2 * width * DTYPE_BYTES[dtype]  # one token's K and V feature blocks on a PE
        self.slot_bytes = self.entry_bytes * layers  # ... for every layer of the region
        if scheme == "shift":
            self._alloc = mesh.sram.alloc(f"{name} cache (shift)", self.slot_bytes * self.cap)
        else:
            self._alloc = mesh.sram.alloc(f"{name} cache (concat)", np.zeros(mesh.shape, np.int64))
        self._count = np.zeros(q, np.int64)
        self._head = np.zeros(q, np.int64)
        # a shape-only shift cache takes replayed steps' appends as a count (``advance``) and
        # applies them when its rows are next read: balanced rows are a function of the length
        self._lazy = not mesh.numeric and scheme == "shift"
        self._lag = 0
        self.k = self.v = None
        self._mirrors: list = [None] * layers  # per layer: (tokens, K, V) in token order (_logical)
        if mesh.numeric:
            npd = NP_DTYPES[dtype]
            self.k = [np.zeros((q, q, width, self.cap), npd) for _ in range(layers)]  # K^T per PE: [F, slots]
            self.v = [np.zeros((q, q, self.cap, width), npd) for _ in range(layers)]  # V per PE: [slots, F]
        self._shift_moves = 0  # token entries handed to a neighbour row (all layers)
        self._tokens = 1  # tokens the next step appends (several: a verification pass)
        self._plans: list | None = None  # the pending step's appends: (moving rows, head, count after)
        self._updated = 0  # layers of the pending step done
        self._sub = 0  # ... and of the current layer's appends
        self._known = None  # (count, its sum) as the last commit left them: the length, unread
        self._rows = np.arange(q)  # row indices; the movers are a view of its tail
        self._rows.flags.writeable = False

    # ---- state -------------------------------------------------------------------
    count = _CaughtUp("_count", "tokens each row holds")
    head = _CaughtUp("_head", "each row's ring slot of its oldest token")
    shift_moves = _CaughtUp("_shift_moves", "token entries handed to a neighbour row (all layers)")

    def _check_room(self, n: int) -> None:
        """Refuse a token joining ``n`` when the cache holds no more."""
        if n + 1 > self.capacity_tokens:
            raise PlacementError(f"KV cache full ({self.scheme} scheme): {n} tokens, capacity {self.capacity_tokens}")

    def _length(self) -> int:
        """Tokens held, appends not yet applied (``advance``) included."""
        known = self._known
        n = known[1] if known is not None and known[0] is self._count else int(self._count.sum())
        return n + self._lag

    def _catch_up(self) -> None:
        """Apply the appends ``advance`` counted, at once, as they would have gone one by one:
        the rows balanced for the new length; each row's head stepped once per append in which
        it handed a token up (the append that joins token n moves the last n % q rows); and
        those hand-overs counted."""
        n, m, q = self._length() - self._lag, self._lag, self.q
        self._lag = 0
        t = q - self._rows  # row i hands a token up when the length mod q is at least q - i

        def handed(x):  # appends from 0 up to length x in which each row handed a token up
            return (x // q) * (q - t) + np.maximum(0, x % q - t)

        def moved(x):  # rows that handed a token up in the appends from 0 up to length x
            return (x // q) * (q * (q - 1) // 2) + (x % q) * (x % q - 1) // 2

        self._head = (self._head + handed(n + m) - handed(n)) % self.cap
        self._count = self.balanced_counts(n + m)
        self._shift_moves += (moved(n + m) - moved(n)) * self.layers
        self._known = (self._count, n + m)

    @property
    def length(self) -> int:
        return int(self.count.sum())

    @property
    def occupied(self) -> int:
        """Slots in use on the fullest row: what the attention loops run over."""
        return int(self.count.max()) if self.count.size else 0

    def program_key(self, tokens: int = 1) -> tuple:
        """What the next decode step's program depends on: the fullest row's slots and
        whether rows shift (a dry run replays a step whose key it has executed); for a step
        appending several ``tokens``, that of each append in turn."""
        if self._lazy and not self._updated and not self._sub:  # balanced rows: from the length
            n, q = self._length(), self.q
            self._check_room(n + tokens - 1)
            keys = tuple((-(-(n + j) // q), bool((n + j) % q)) for j in range(tokens))
            return keys[0] if tokens == 1 else keys
        if tokens == 1:
            return self.occupied, bool(self._plan_append().size)
        keys, count = [], self.count
        for movers, _, after in self._plan_steps(tokens):
            keys.append((int(count.max()), bool(movers.size)))
            count = after
        return tuple(keys)

    def free(self) -> None:
        """The request is done: the cache's SRAM is free for others."""
        self.mesh.sram.free(self._alloc)
        self.k = self.v = None

    def reset(self) -> None:
        self._mirrors = [None] * self.layers
        self.count[:] = 0
        self.head[:] = 0
        self._clear_step()
        self._resize_concat()

    def _clear_step(self) -> None:
        self._tokens, self._plans, self._updated, self._sub = 1, None, 0, 0

    def _resize_concat(self) -> None:
        """After the rows' counts changed (reset, load, an append): the concat cache's SRAM
        follows its rows; the length :meth:`_plan_append` knows is no longer known."""
        self._known = None
        if self.scheme == "concat":
            rows = np.zeros(self.mesh.shape, np.int64)
            rows[:, :] = (self.count * self.slot_bytes)[:, None]
            self.mesh.sram.resize(self._alloc, rows)

    # ---- prefill -> decode ---------------------------------------------------------
    def balanced_counts(self, length: int) -> np.ndarray:
        """Tokens per row when ``length`` prompt tokens are spread over the rows (the bottom
        rows take the extra ones)."""
        q, m = divmod(length, self.q)
        counts = np.full(self.q, q, np.int64)
        if m:
            counts[self.q - m:] += 1
        return counts

    def placement(self, length: int) -> Placement:
        """Where :meth:`load` puts a layer's ``length`` prompt tokens: the logical
        [tokens, K | V] in the model's feature order, tokens over the rows in balanced
        counts, each feature on the column of its block in this cache's HeadLayout (how a
        PE stores its share, K transposed, does not change where it lands)."""
        hl = self.hl
        col = positions(hl.kv_cols, hl.kv_dim) // hl.col_features
        return Placement(self.mesh.region, (length, 2 * hl.kv_dim), y_dim=0,
                         y_of=np.repeat(np.arange(self.q), self.balanced_counts(length)), x_dim=1,
                         x_of=np.concatenate((col, col)))

    def load(self, length: int, k_layers=None, v_layers=None, source_cols=None) -> None:
        """Spread ``length`` prompt tokens over the rows as :meth:`placement` says.

        Numeric runs: ``k_layers[l]``/``v_layers[l]`` are layer l's K and V on the prefill
        mesh ([length, features] tensors) and ``source_cols[l]`` the column there of each of
        the model's kv features; every PE's slots are read from the prefill tiles that hold
        them (the transition charges the move).
        """
        if length > self.capacity_tokens:
            raise PlacementError(f"prompt of {length} tokens exceeds the KV cache capacity {self.capacity_tokens}")
        if self._lag:
            self._catch_up()  # the previous contents' hand-overs still count
        counts = self.balanced_counts(length)
        if counts.max() > self.cap:
            raise PlacementError(f"prompt of {length} tokens needs {counts.max()} slots per row, the cache has {self.cap}")
        self.count = counts
        self.head = np.zeros(self.q, np.int64)
        self._mirrors = [None] * self.layers
        self._clear_step()
        self._resize_concat()
        if self.k is None or k_layers is None:
            return
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        slot = np.arange(self.cap)
        held = slot[None, :] < counts[:, None]  # (rows, cap)
        tok = np.where(held, starts[:, None] + slot, 0)[:, None, None, :]  # token of every slot
        feature = self.hl.kv_cols.reshape(self.q, self.hl.col_features)  # (cols, F): model feature (-1: padding)
        real = held[:, None, None, :] & (feature >= 0)[None, :, :, None]  # (rows, cols, F, cap)
        for l in range(self.layers):
            col = np.asarray(source_cols[l])[np.maximum(feature, 0)][None, :, :, None]
            self.k[l][...] = np.where(real, comm.elements(k_layers[l], (tok, col)), 0)  # [rows, cols, F, cap]
            self.v[l][...] = np.where(real, comm.elements(v_layers[l], (tok, col)), 0).transpose(0, 1, 3, 2)

    # ---- decode append -------------------------------------------------------------
    def begin(self, tokens: int) -> None:
        """The next step appends ``tokens`` tokens of this request (a verification pass):
        each layer's :meth:`update` is called ``tokens`` times, in token order."""
        if self._updated or self._sub or self._plans is not None:
            raise MeshError(f"{self.name}: a step is half appended ({self._updated} of {self.layers} layers)")
        if tokens < 1:
            raise MeshError(f"{self.name}: a step appends at least one token, got {tokens}")
        self._tokens = int(tokens)

    def update(self, layer: int, k: DistTensor | None = None, v: DistTensor | None = None) -> KVView | None:
        """Append the new token's K and V of ``layer`` ([kv_padded] (x), replicated down the
        columns) and return the layer's cache as attention reads it, the new token included.

        Layers are updated in order 0, 1, ... (each as many times as the step has tokens):
        the first plans the append, the last commits it. ``k``/``v`` None: the layer's
        program was replayed (a dry run, its cost already charged): only the bookkeeping
        advances, and nothing is returned.
        """
        if k is None:
            return self._append(layer, None, None, None)
        return self._append(layer, None if k.tiles is None else k.tiles[-1], None if v.tiles is None else v.tiles[-1],
                            self._view)

    def _append(self, layer: int, k, v, read):
        """Layer ``layer``'s next append of the step, in order: the first plans the step,
        the last commits it. Stores ``k``/``v`` (the bottom row's tiles [cols, F]; None: no
        values) and returns ``read(layer, head, count)`` on the cache with the new token
        (``read`` None: bookkeeping only, nothing returned)."""
        if layer != self._updated:
            raise MeshError(f"{self.name}: layers of a token are appended in order; expected layer "
                            f"{self._updated}, got {layer}")
        plans = self._step_plans()
        j = self._sub
        movers, head, count = plans[j]
        out = None
        if read is not None:
            if self.k is not None and k is not None:
                before = (self.head, self.count) if j == 0 else plans[j - 1][1:]
                self._shift_and_store(layer, k, v, movers, before, head, count)
            out = read(layer, head, count)
        self._sub += 1
        if self._sub == len(plans):
            self._sub = 0
            self._updated += 1
            if self._updated == self.layers:
                self._commit()
        return out

    def charge_append(self) -> None:
        """Charge the next layer's appends (its rows' hand-over and the new entry's store),
        before :meth:`update` or :meth:`update_values` does them. Kept out of the layer's
        program: how many rows hand a token up changes with every token, and with it the
        append's messages (not its time), so a replayed layer charges only what it shares."""
        for movers, _, _ in self._step_plans():
            self._charge_append(movers)

    def update_values(self, layer: int, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """:meth:`update` for a layer whose cost was replayed but whose numerics run fused
        (:mod:`waferllm.engine.fused`): store the new token's K and V (each [kv_padded], wafer
        order) as the program would, charge nothing, and return the layer's cache (K, V) each
        [tokens, kv_padded] in token order (None without values: a dry run)."""
        cols = (self.q, self.hl.col_features)
        return self._append(layer, k.reshape(cols), v.reshape(cols), None if self.k is None else self._logical)

    def advance(self) -> None:
        """A step whose every layer was replayed: the append's bookkeeping at once (what
        :meth:`update` does over all layers without K/V)."""
        if self._updated or self._sub:
            raise MeshError(f"{self.name}: a step is half appended ({self._updated} of {self.layers} layers)")
        if self._lazy and self._plans is None and self._tokens == 1:
            self._check_room(self._length())
            self._lag += 1  # applied when the rows are next read (_catch_up)
            return
        self._step_plans()
        self._commit()

    def _step_plans(self) -> list:
        """The pending step's appends, planned on first use: (moving rows, head, count after each)."""
        if self._plans is None:
            self._plans = self._plan_steps(self._tokens)
        return self._plans

    def _plan_steps(self, tokens: int) -> list:
        plans, head, count = [], self.head, self.count
        for ahead in range(tokens):
            movers = self._plan_append(ahead)
            head, count = self._after(movers, head, count)
            plans.append((movers, head, count))
        return plans

    def _plan_append(self, ahead: int = 0) -> np.ndarray:
        """Rows that hand their oldest token up for the next append (empty for concat), after
        ``ahead`` appends still pending: the last rows, as a read-only view of the cache's row
        indices (a replayed decode step plans every cache's append, so this stays a few
        Python operations). Balanced rows make them a function of the length alone."""
        n = self._length() + ahead
        self._check_room(n)
        rows = self._rows
        if self.scheme == "concat":
            if self.count[-1] + ahead + 1 > self.cap:
                raise PlacementError(f"KV cache full (concat scheme): the bottom row holds "
                                     f"{self.count[-1] + ahead} tokens")
            return rows[:0]
        return self._movers_at(n)

    def _movers_at(self, n: int) -> np.ndarray:
        """The rows that hand a token up when a token joins ``n`` balanced ones (shift)."""
        return self._rows[self.q - n % self.q:] if n % self.q else self._rows[:0]

    def _after(self, movers: np.ndarray, head: np.ndarray, count: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(head, count) of every row once a token is appended to rows at ``head``, ``count``.
        The movers :meth:`_plan_append` names are the last m rows: their heads step on, and
        the row above them gains the token each hands up (the bottom row's new one replaces
        its own)."""
        head = head.copy()
        count = count.copy()
        m = movers.size
        if m and movers.base is self._rows and movers.strides == movers.base.strides:
            tail = head[self.q - m:]
            tail += 1
            np.remainder(tail, self.cap, out=tail)
            count[self.q - m - 1] += 1
            return head, count
        if m:
            head[movers] = (head[movers] + 1) % self.cap
            count[movers - 1] += 1
            count[movers] -= 1
        count[-1] += 1
        return head, count

    def _charge_append(self, movers: np.ndarray, name: str = "kv_append") -> None:
        mesh, entry, q = self.mesh, self.entry_bytes, self.q
        if movers.size:
            # every PE of a moving row sends one token's K and V feature block one hop up, in
            # parallel (over a remapped or rerouted neighbour row on a defective wafer)
            comm.charge_messages(mesh, f"{name}.shift", entry, 1, messages=movers.size * q, axis="y")
        # the new entry (K and V feature blocks) stored into the bottom row's slot by its q PEs
        compute.store(mesh, f"{name}.write", 2 * self.hl.col_features, self.dtype, writers=q)

    def _shift_and_store(self, layer, k, v, movers, before, head, count) -> None:
        """Hand the movers' oldest tokens up and store the new token (``k``, ``v``: the
        bottom row's tiles, [cols, F], the same on every row) in the bottom row; the rows
        were at ``before`` (head, count) and are at ``head``, ``count`` after."""
        K, V = self.k[layer], self.v[layer]  # [rows, cols, F, cap], [rows, cols, cap, F]
        if movers.size:
            src = before[0][movers]
            up = movers - 1
            dst = (before[0][up] + before[1][up]) % self.cap
            K[up, :, :, dst] = K[movers, :, :, src]
            V[up, :, dst, :] = V[movers, :, src, :]
        last = self.q - 1
        slot = (head[last] + count[last] - 1) % self.cap
        K[last, :, :, slot] = k.astype(K.dtype)
        V[last, :, slot, :] = v.astype(V.dtype)

    def _view(self, layer: int, head: np.ndarray, count: np.ndarray) -> KVView:
        """The occupied slots of every row in ring order (a ring's occupied part is one or two
        address ranges, so a PE reads only those)."""
        mesh, q = self.mesh, self.q
        slots = max(int(count.max()), 1)
        k_tiles = v_tiles = valid = index = None
        if self.k is not None:
            ring = (head[:, None] + np.arange(slots)[None, :]) % self.cap  # [rows, slots]: j-th oldest's slot
            k_tiles = np.take_along_axis(self.k[layer], ring[:, None, None, :], axis=3)
            v_tiles = np.take_along_axis(self.v[layer], ring[:, None, :, None], axis=2)
            valid = np.arange(slots)[None, :] < count[:, None]
            index = (np.cumsum(count) - count)[:, None] + np.arange(slots)[None, :]  # rows hold tokens in order
        padded = self.hl.kv_padded
        k_t = DistTensor(mesh, (padded, q * slots), ("x", "y"), self.dtype, k_tiles, name=f"{self.name}.k",
                         charge_sram=False)
        v = DistTensor(mesh, (q * slots, padded), ("y", "x"), self.dtype, v_tiles, name=f"{self.name}.v",
                       charge_sram=False)
        return KVView(k_t, v, valid, index)

    def _commit(self) -> None:
        # counted once per step for all layers, replayed ones included
        n = self._length()
        plans = self._plans
        self.shift_moves += sum(int(m.size) for m, _, _ in plans) * self.layers
        _, self.head, self.count = plans[-1]
        self._clear_step()
        self._resize_concat()
        self._known = (self.count, n + len(plans))  # every append adds one token

    # ---- rejected tokens ---------------------------------------------------------------
    def rollback(self, tokens: int) -> None:
        """Drop the newest ``tokens`` tokens (a verification pass's rejected drafts), the
        exact inverse of their appends: for each, newest first, every row that handed its
        oldest token up to the row above takes that row's newest token back, in one parallel
        neighbour step carrying the token's K and V of every layer (charged here); the
        concatenation cache only shortens its bottom row."""
        if self._updated or self._sub or self._plans is not None:
            raise MeshError(f"{self.name}: cannot roll back during a step")
        if not 0 <= tokens <= (self.length if self.scheme == "shift" else int(self.count[-1])):
            raise MeshError(f"{self.name}: cannot drop {tokens} of {self.length} tokens"
                            + (f" (the concatenation cache's bottom row holds {self.count[-1]})"
                               if self.scheme == "concat" else ""))
        mesh, q = self.mesh, self.q
        for _ in range(tokens):
            n = self.length - 1  # tokens once the newest is gone
            movers = self._movers_at(n) if self.scheme == "shift" else self._rows[:0]
            head, count = self.head.copy(), self.count.copy()
            if movers.size:
                up = movers - 1
                if self.k is not None:
                    src = (head[up] + count[up] - 1) % self.cap  # the row above's newest
                    dst = (head[movers] - 1) % self.cap  # just before the mover's oldest
                    for K, V in zip(self.k, self.v):
                        K[movers, :, :, dst] = K[up, :, :, src]
                        V[movers, :, dst, :] = V[up, :, src, :]
                comm.charge_messages(mesh, "kv_rollback.shift", self.slot_bytes, 1, messages=movers.size * q,
                                     axis="y")
                head[movers] = (head[movers] - 1) % self.cap
                count[up] -= 1
                count[movers] += 1
                self.shift_moves += int(movers.size) * self.layers
            count[-1] -= 1
            self.head, self.count = head, count
        n = self.length  # the tokens kept are unchanged: a mirror keeps its share of them
        self._mirrors = [m if m is None else (min(m[0], n), m[1], m[2]) for m in self._mirrors]
        self._resize_concat()

    # ---- reading back ----------------------------------------------------------------
    def logical(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """(K, V) each [n, kv_padded] in token order, wafer feature order (numeric mode)."""
        return self._logical(layer, self.head, self.count)

    def _logical(self, layer: int, head: np.ndarray, count: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(K, V) [tokens, kv_padded] in token order. Appends and hand-overs keep the tokens'
        order and values, and each new token enters the bottom row's newest slot; so once
        read, a layer's cache is kept in token order too (its mirror) and the next read after
        one append adds just that token, read from its slot. Any other change (a load, a
        reset, a rollback past the mirror, appends not read here) rebuilds it from the rows."""
        n = int(count.sum())
        mirror = self._mirrors[layer]
        if mirror is not None and mirror[0] == n - 1 and n <= mirror[1].shape[0]:
            last, (_, k, v) = self.q - 1, mirror
            slot = (head[last] + count[last] - 1) % self.cap
            k[n - 1] = self.k[layer][last, :, :, slot].reshape(-1)
            v[n - 1] = self.v[layer][last, :, slot, :].reshape(-1)
        else:
            k, v = self._gathered(layer, head, count, max(n, 2 * (mirror[1].shape[0] if mirror else 0), 16))
        self._mirrors[layer] = (n, k, v)
        return k[:n], v[:n]

    def _gathered(self, layer: int, head: np.ndarray, count: np.ndarray, room: int) -> tuple[np.ndarray, np.ndarray]:
        """Every row's tokens gathered into token order, in buffers of ``room`` tokens (float32)."""
        j = np.arange(int(count.max()) if count.size else 0)[None, :]
        slots = (head[:, None] + j) % self.cap  # (Q rows, slots): the j-th oldest token's slot
        held = j < count[:, None]  # row-major order of `held` is token order
        k = self.k[layer].transpose(0, 3, 1, 2)  # [rows, cap, cols, F]
        v = self.v[layer].transpose(0, 2, 1, 3)
        n, width = int(held.sum()), self.hl.kv_padded
        room = min(max(room, n), self.capacity_tokens)
        K, V = np.zeros((room, width), np.float32), np.zeros((room, width), np.float32)
        K[:n] = np.take_along_axis(k, slots[:, :, None, None], axis=1)[held].reshape(n, width)
        V[:n] = np.take_along_axis(v, slots[:, :, None, None], axis=1)[held].reshape(n, width)
        return K, V
