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
"""

from __future__ import annotations

import numpy as np

from waferllm.errors import PlacementError
from waferllm.mesh.cost import message_cycles, vector_cycles
from waferllm.mesh.tensor import NP_DTYPES

SCHEMES = ("shift", "concat")


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
        self.capacity_tokens = capacity_tokens
        q = mesh.rows
        self.q = q
        tf = head_layout.tf
        item = 2 if dtype == "fp16" else 4
        # slots per PE row: balanced for shift; the bottom row takes all growth for concat
        self.cap = -(-capacity_tokens // q) if scheme == "shift" else capacity_tokens
        per_slot = 2 * tf * item * layers
        if scheme == "shift":
            self._alloc = mesh.sram.alloc(f"{name} cache (shift)", per_slot * self.cap)
        else:
            rows = np.zeros(mesh.shape, np.int64)
            self._alloc = mesh.sram.alloc(f"{name} cache (concat)", rows)
        self._per_slot = per_slot
        self.count = np.zeros(q, np.int64)
        self.head = np.zeros(q, np.int64)
        self.k = self.v = None
        if mesh.numeric:
            npd = NP_DTYPES[dtype]
            self.k = [np.zeros((q, q, tf, self.cap), npd) for _ in range(layers)]
            self.v = [np.zeros((q, q, self.cap, tf), npd) for _ in range(layers)]
        self.shift_moves = 0  # token entries handed to a neighbour row (all layers)

    # ---- state -------------------------------------------------------------------
    @property
    def length(self) -> int:
        return int(self.count.sum())

    @property
    def occupied(self) -> int:
        """Slots in use on the fullest row: what the attention loops run over."""
        return int(self.count.max()) if self.count.size else 0

    def valid(self, movers: np.ndarray | None = None) -> np.ndarray:
        """(Q, cap) True where a row's slot holds a token (after the pending append, if ``movers``)."""
        head, count = (self.head, self.count) if movers is None else self.after(movers)
        s = np.arange(self.cap)[None, :]
        return ((s - head[:, None]) % self.cap) < count[:, None]

    def after(self, movers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(head, count) once the pending token is appended."""
        head = self.head.copy()
        count = self.count.copy()
        if movers.size:
            head[movers] = (head[movers] + 1) % self.cap
            count[movers - 1] += 1
            count[movers] -= 1
        count[-1] += 1
        return head, count

    def reset(self) -> None:
        self.count[:] = 0
        self.head[:] = 0
        self._resize_concat()

    def _resize_concat(self) -> None:
        if self.scheme == "concat":
            rows = np.zeros(self.mesh.shape, np.int64)
            rows[:, :] = (self.count * self._per_slot)[:, None]
            self.mesh.sram.resize(self._alloc, rows)

    # ---- prefill -> decode ---------------------------------------------------------
    def load(self, length: int, k_layers=None, v_layers=None) -> None:
        """Spread ``length`` prompt tokens over the rows (bottom rows take the extra ones).

        ``k_layers[l]``/``v_layers[l]``: [length, kv_padded] in wafer feature order (numeric).
        """
        if length > self.capacity_tokens:
            raise PlacementError(f"prompt of {length} tokens exceeds the KV cache capacity {self.capacity_tokens}")
        q, m = divmod(length, self.q)
        counts = np.full(self.q, q, np.int64)
        if m:
            counts[self.q - m:] += 1
        if counts.max() > self.cap:
            raise PlacementError(f"prompt of {length} tokens needs {counts.max()} slots per row, the cache has {self.cap}")
        self.count = counts
        self.head = np.zeros(self.q, np.int64)
        self._resize_concat()
        if self.k is None or k_layers is None:
            return
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        tf = self.hl.tf
        tok = starts[:, None] + np.arange(self.cap)[None, :]  # (Q, cap) token index per slot
        ok = np.arange(self.cap)[None, :] < counts[:, None]
        tok = np.where(ok, tok, 0)
        for l in range(self.layers):
            kl = np.asarray(k_layers[l], np.float32).reshape(length, self.q, tf)  # token, column, feature
            vl = np.asarray(v_layers[l], np.float32).reshape(length, self.q, tf)
            kk = kl[tok] * ok[..., None, None]  # (Q rows, cap, Q cols, tf)
            vv = vl[tok] * ok[..., None, None]
            self.k[l][...] = kk.transpose(0, 2, 3, 1)
            self.v[l][...] = vv.transpose(0, 2, 1, 3)

    # ---- decode append -------------------------------------------------------------
    def plan_append(self) -> np.ndarray:
        """Rows that hand their oldest token up for the next append (empty for concat)."""
        n = self.length
        if n + 1 > self.capacity_tokens:
            raise PlacementError(
                f"KV cache full ({self.scheme} scheme): {n} tokens, capacity {self.capacity_tokens}"
            )
        if self.scheme == "concat":
            if self.count[-1] + 1 > self.cap:
                raise PlacementError(f"KV cache full (concat scheme): the bottom row holds {self.count[-1]} tokens")
            return np.zeros(0, np.int64)
        m = n % self.q
        if m == 0:
            return np.zeros(0, np.int64)
        return np.arange(self.q - m, self.q)

    def write(self, layer: int, k, v, movers: np.ndarray, name: str = "kv_append") -> None:
        """Store one layer's new K/V (tiles replicated down the columns) and do its shift step."""
        mesh = self.mesh
        item = 2 if self.dtype == "fp16" else 4
        entry = 2 * self.hl.tf * item
        if movers.size:
            # every moving row sends one token's K and V feature block one hop up, in parallel
            mesh.ledger.charge(f"{name}.shift", "comm", message_cycles(mesh.wafer, entry, 1),
                               bytes_moved=entry * movers.size * self.q, hop_bytes=entry * movers.size * self.q,
                               messages=movers.size * self.q, sram_read_bytes=entry * movers.size * self.q,
                               sram_write_bytes=entry * movers.size * self.q)
        # the new entry (K and V feature blocks) stored into the bottom row's slot
        mesh.ledger.charge(f"{name}.write", "compute", vector_cycles(mesh.wafer, 2 * self.hl.tf, self.dtype),
                           sram_write_bytes=entry * self.q)
        if self.k is None:
            return
        K, V = self.k[layer], self.v[layer]
        if movers.size:
            src = self.head[movers]
            up = movers - 1
            dst = (self.head[up] + self.count[up]) % self.cap
            kval = K[movers, :, :, src]  # (len, Q, tf)
            vval = V[movers, :, src, :]
            K[up, :, :, dst] = kval
            V[up, :, dst, :] = vval
        head, count = self.after(movers)
        last = self.q - 1
        slot = (head[last] + count[last] - 1) % self.cap
        K[last, :, :, slot] = k.tiles[last].astype(K.dtype)
        V[last, :, slot, :] = v.tiles[last].astype(V.dtype)

    def commit(self, movers: np.ndarray) -> None:
        # counted here, once per step for all layers, so that steps and layers a dry run
        # replays (without calling write) are counted too
        self.shift_moves += int(movers.size) * self.layers
        self.head, self.count = self.after(movers)
        self._resize_concat()

    # ---- reading back ----------------------------------------------------------------
    def logical(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """(K, V) each [n, kv_padded] in token order, wafer feature order (numeric mode)."""
        j = np.arange(self.cap)[None, :]
        slots = (self.head[:, None] + j) % self.cap  # (Q rows, cap): the j-th oldest token's slot
        held = j < self.count[:, None]  # row-major order of `held` is token order
        k = self.k[layer].transpose(0, 3, 1, 2)  # (rows, cap, cols, tf)
        v = self.v[layer].transpose(0, 2, 1, 3)
        k = np.take_along_axis(k, slots[:, :, None, None], axis=1)[held]
        v = np.take_along_axis(v, slots[:, :, None, None], axis=1)[held]
        n = int(held.sum())
        return (k.reshape(n, self.hl.kv_padded).astype(np.float32),
                v.reshape(n, self.hl.kv_padded).astype(np.float32))
