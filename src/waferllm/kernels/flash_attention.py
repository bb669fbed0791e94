"""Streaming (flash-style) causal attention of a prompt: key blocks in flight, online softmax.

Same operand layouts as :mod:`waferllm.kernels.attention` (every attention operand (y, x),
features in head-aware order, ``head_of_pos`` the kv head of every feature a column holds,
-1 for another pass's head or padding). K and V ride the column ring together, one
position per step (dist-GEMM-T's rotation, no skew), so at step s PE row i holds key block
b(i, s) and after N steps every row has met every block. Each step, per PE:

- partial scores of its own features against the key block it holds (r query heads,
  tq x tf x tk MACs), for the heads its column holds only ("slots");
- a sum over the columns that hold each head (a segmented allreduce along x, K-tree over
  the head's span): every PE of a head's columns gets that head's complete scores;
- the online softmax: running max m and sum l per query and head, rescale factor
  exp(m_old - m_new), p = exp(s - m_new), and O = O * corr + p V on the PE's own features
  (V(b, j) is already on the PE: no P ever moves).

A PE holds score tiles of one key block for the heads of its own features only, so the
SRAM a pass needs hardly grows with the heads in it. The steps run as a software pipeline
over two score buffers: while the router sums block s+1's partial scores, the core updates
block s, then computes block s+2's partials into the buffer block s has freed. Every
step's compute and communication overlap; only filling the pipeline is exposed.
"""

from __future__ import annotations

import numpy as np

from waferllm.errors import MeshError
from waferllm.kernels.meshgemm import ring_routes, run_and_replay
from waferllm.kernels.report import KernelResult, measured
from waferllm.mesh import comm, compute
from waferllm.mesh.compute import matmul_tiles
from waferllm.mesh.tensor import DistTensor, tile_shape_for


def head_slots(head_of_pos) -> tuple[np.ndarray, np.ndarray, int]:
    """The heads each PE column holds, as slots: ``(heads, slot_of_pos, span)``.

    ``heads`` (cols, G): the kv heads of column j's features in ascending order, -1 past the
    last (G: the most any column holds); ``slot_of_pos`` (cols, tf): each feature's slot
    (-1 for padding); ``span``: the most columns one head's features spread over."""
    hp = np.asarray(head_of_pos)
    present = _heads_held(hp)
    g = max(1, int(present.sum(axis=1).max()))
    first = np.argsort(~present, axis=1, kind="stable")[:, :g]  # held heads first, ascending
    heads = np.where(np.take_along_axis(present, first, axis=1), first, -1)
    slot = np.argmax(heads[:, None, :] == hp[:, :, None], axis=2)
    span = max(1, int(present.sum(axis=0).max()))
    return heads, np.where(hp >= 0, slot, -1), span


def _heads_held(hp: np.ndarray) -> np.ndarray:
    """(cols, H): whether column j holds a feature of kv head h (H: the largest head + 1)."""
    return (hp[..., None] == np.arange(max(int(hp.max()) + 1, 1))).any(axis=1)


def slots_per_column(head_of_pos, heads_per_pass: int) -> int:
    """The most slots (heads of one pass) a column holds, over every pass of ``heads_per_pass``
    kv heads: what sizes a PE's score tile in the streaming kernel."""
    present = _heads_held(np.asarray(head_of_pos))
    n_heads = present.shape[1]
    return max(max(1, int(present[:, g0:g0 + heads_per_pass].sum(axis=1).max()))
               for g0 in range(0, n_heads, max(1, heads_per_pass)))


def streaming_attention(q: DistTensor, k: DistTensor, v: DistTensor, head_of_pos, group: int, length: int,
                        scale: float, out: DistTensor | None = None, *, ring: str = "interleave", ktree: int = 2,
                        name: str = "attn_out") -> KernelResult:
    """Causal softmax(Q K^T * scale) V over the heads of ``head_of_pos`` (one pass).

    ``q`` [L, r*Fpad], ``k`` and ``v`` [L, Fpad], all (y, x), row i holding tokens of block i;
    keys at or past ``length`` are padding. Returns O [L, r*Fpad] (y, x) fp32, normalised on
    this pass's features; ``out`` (consumed) carries earlier passes' features, unchanged.
    """
    mesh = q.mesh
    if mesh.rows != mesh.cols:
        raise MeshError("streaming attention runs on a square region")
    n = mesh.rows
    tq, tqf = q.tile_shape
    tk, tf = k.tile_shape
    if tqf != group * tf or v.tile_shape != k.tile_shape:
        raise MeshError(f"{name}: Q tile {q.tile_shape}, K {k.tile_shape} and V {v.tile_shape} disagree "
                        f"for {group} query heads per kv head")
    heads, slot_of_pos, span = head_slots(head_of_pos)
    g, m_len = heads.shape[1], tq * group
    # per step, the scores of the heads a PE holds: [slots, (query, query head), key in block]
    s_shape, s_layout = (n * g, n * m_len, tk), ("x", "y", None)
    stat_shape = (n * g, n * m_len, 1)  # running max and sum per query, query head and slot
    onehot = (slot_of_pos[..., None] == np.arange(g)).astype(np.float32) if mesh.numeric else None  # (cols, tf, G)
    q_rows = np.arange(n)[:, None] * tq + np.arange(tq)  # (rows, tq): PE row i's queries
    safe_slot = np.where(slot_of_pos < 0, 0, slot_of_pos)  # (cols, tf), padding read from slot 0, then zeroed

    def allowed(blocks):
        """(rows, 1, 1, tq*r, tk): causal and real keys of the block each row holds."""
        keys = blocks[:, None] * tk + np.arange(tk)  # (rows, tk)
        ok = (keys[:, None, :] <= q_rows[:, :, None]) & (keys[:, None, :] < length)  # (rows, tq, tk)
        return np.repeat(ok, group, axis=1)[:, None, None]

    def filled(shape, value, nm):
        tiles = None
        if mesh.numeric:
            tiles = np.full((n, n, *tile_shape_for(shape, s_layout, mesh.shape)), value, np.float32)
        return DistTensor(mesh, shape, s_layout, "fp32", tiles, name=nm)

    with measured(mesh, "streaming_attention") as rep:
        # held for the whole kernel: the column ring K and V ride, and the heads' reduction trees
        _, tree = comm.reduce_schedule(span, "ktree", ktree, None, None, True)
        mesh.routes.request("streaming_attention.routes", ring_routes(n) + tree, relayable=False)
        o = out if out is not None else mesh.zeros((q.shape[0], q.shape[1]), ("y", "x"), "fp32", name=name)
        m = filled(stat_shape, -np.inf, "running_max")
        l = filled(stat_shape, 0.0, "running_sum")
        state = {"k": k.compute_view(), "v": v.compute_view(), "o": o, "m": m, "l": l}
        parts, sums, keys = {}, {}, {}
        qt = None if q.tiles is None else q.tiles.astype(np.float32, copy=False).reshape(n, n, tq, group, tf)

        def product(i):
            """Block i's partial scores from the K tile each PE holds, then K moves on."""
            kk = state["k"]
            matmul_tiles(mesh, None, None, dtype=q.dtype, name="streaming_attention.tile_matmul",
                         shapes=(tq, tf, tk, group))
            tiles = None
            if qt is not None:
                # (n,n,tq,r,tf) x (n,tf,G) x (n,n,tk,tf) -> (n,n,G,tq,r,tk): each feature to its slot
                tiles = np.einsum("ijtrf,jfg,ijkf->ijgtrk", qt, onehot, kk.tiles, optimize=True)
                tiles = tiles.reshape(n, n, g, m_len, tk)
                keys[i] = np.arange(n) if kk.blocks is None else np.asarray(kk.blocks[0])[:, 0]
            parts[i] = DistTensor(mesh, s_shape, s_layout, "fp32", tiles, name="partial_scores", partial=("x", "sum"))
            state["k"] = comm.ring_shift(kk, "y", -1, ring=ring, name="streaming_attention.shift_K")

        def reduce(i):
            """Block i's scores summed over the columns of each head (in the partials' buffer)."""
            part = parts.pop(i)
            mesh.sram.release(part)
            sums[i] = comm.allreduce_slots(part, "x", heads[None], span, k=ktree, name="streaming_attention.scores")

        def update(i):
            """The online softmax of block i, and O = O * corr + p V with the V tile each PE holds.
            Each step overwrites a buffer it reads (ends that lifetime first): the PE works in
            place, so a block's scores take one tile from the sum to p."""
            s = sums.pop(i)
            ok = allowed(keys.pop(i)) if mesh.numeric else None
            mesh.sram.release(s)
            z = compute.elementwise(lambda x: np.where(ok, x * scale, -np.inf), s, name="stream.scale", dtype="fp32")
            mb = compute.tile_reduce(z, 2, "max", name="stream.max")
            m_old = state["m"]
            mesh.sram.release(mb)
            m_new = compute.elementwise(np.maximum, m_old, mb, name="stream.new_max", dtype="fp32")
            mesh.sram.release(z)
            p = compute.elementwise(lambda x, mx: np.where(ok, np.exp(x - mx), 0.0), z, m_new,
                                    ops_per_elem=mesh.wafer.ops_exp, name="stream.exp", dtype="fp32")
            # rescale of what earlier blocks summed: exp(m_old - m_new), 1 while both are -inf
            mesh.sram.release(m_old)
            corr = compute.elementwise(lambda a, b: np.where(a == b, 1.0, np.exp(a - b)), m_old, m_new,
                                       ops_per_elem=mesh.wafer.ops_exp, name="stream.rescale", dtype="fp32")
            state["m"] = m_new
            ps = compute.tile_reduce(p, 2, "sum", name="stream.sum")
            mesh.sram.release(state["l"])
            state["l"] = compute.elementwise(lambda a, c, b: a * c + b, state["l"], corr, ps, ops_per_elem=2,
                                             name="stream.new_sum", dtype="fp32")
            mesh.sram.release(ps, state["o"])
            # [L, r*Fpad] (y, x): each feature scaled by its own head's factor
            o = compute.elementwise(lambda a, c: a * _per_feature(c, slot_of_pos, tq, group), state["o"], corr,
                                    name="stream.rescale_out", dtype="fp32")
            mesh.sram.release(corr)
            # r query heads x (tq x tk) @ (tk x tf), accumulated into O: each feature takes its own head's p
            matmul_tiles(mesh, None, None, dtype=v.dtype, name="streaming_attention.pv_matmul",
                         shapes=(tq, tk, tf, group))
            if o.tiles is not None:
                pt = p.tiles.reshape(n, n, g, tq, group, tk)
                every = np.einsum("ijgtrk,ijkf->ijtrgf", pt, state["v"].tiles, optimize=True)  # every slot x feature
                own = np.take_along_axis(every, np.broadcast_to(safe_slot[None, :, None, None, None, :],
                                                                every.shape[:4] + (1, tf)), axis=4)[:, :, :, :, 0]
                o.tiles += (own * (slot_of_pos >= 0)[None, :, None, None, :]).reshape(o.tiles.shape)
            mesh.sram.release(p)
            state["o"] = o
            state["v"] = comm.ring_shift(state["v"], "y", -1, ring=ring, name="streaming_attention.shift_V")

        def block(i):
            # the router sums block i+1 while the core updates block i, then computes block
            # i+2's partials into the buffer block i has just freed: two score tiles in all
            with mesh.ledger.overlap():
                if i + 1 < n:
                    reduce(i + 1)
                update(i)
                if i + 2 < n:
                    product(i + 2)
            mesh.ledger.charge("streaming_attention.step", "overhead", mesh.wafer.step_overhead_cycles)

        # K and V rotate through their own space plus one receive buffer each
        with mesh.sram.lent(k, v):
            # filling the pipeline: block 0's scores have nothing to hide behind
            product(0)
            with mesh.ledger.overlap():
                if n > 1:
                    product(1)
                reduce(0)
            _run_blocks(mesh, n, block, parts, sums)
            state["k"] = state["v"] = None  # home again after a full turn of the ring
        mesh.sram.release(state["o"], state["m"], state["l"])  # normalised in place, statistics done
        o = compute.elementwise(lambda a, s: a / _per_feature(s, slot_of_pos, tq, group), state["o"],
                                state["l"], ops_per_elem=mesh.wafer.ops_div, name="stream.normalise", dtype="fp32")
    rep.extra.update(grid=n, slots=g, span=span)
    return KernelResult(o, rep)


def _run_blocks(mesh, n: int, block, parts: dict, sums: dict) -> None:
    """Blocks 0..n-1. Shapes only: blocks 0..n-3 (both neighbours in flight) cost alike, so
    from the third on they are replayed from the second, and the last two executed."""
    full = n - 2
    if mesh.numeric or full <= 2:
        for i in range(n):
            block(i)
        return
    block(0)
    run_and_replay(mesh, lambda: block(1), full - 2, "streaming_attention.steps (replayed)")
    # what block n-3 would leave in flight: shapes only, so the last ones in flight stand in
    sums[n - 2] = sums.pop(2)
    parts[n - 1] = parts.pop(3)
    block(n - 2)
    block(n - 1)


def _per_feature(stat, slot_of_pos, tq: int, group: int):
    """(rows, cols, G, tq*r, 1) per-slot values -> (rows, cols, tq, r*tf): each feature its
    head's value (1 for features of no head in this pass: a rescale or divide leaves them be)."""
    rows, cols = stat.shape[:2]
    per = stat[..., 0].reshape(rows, cols, -1, tq, group).transpose(0, 1, 3, 4, 2)  # (rows, cols, tq, r, G)
    tf = slot_of_pos.shape[1]
    safe = np.where(slot_of_pos < 0, 0, slot_of_pos)  # (cols, tf)
    idx = np.broadcast_to(safe[None, :, None, None, :], (rows, cols, tq, group, tf))
    got = np.take_along_axis(per, idx, axis=4)  # (rows, cols, tq, r, tf): the column's slot of every feature
    got = np.where(slot_of_pos[None, :, None, None, :] >= 0, got, 1.0)
    return got.reshape(rows, cols, tq, group * tf)
