"""Decode attention: one new token's query against the cached keys and values, per head.

Decode layout (see ``waferllm.engine.decode``): the query and the KV cache's feature
blocks are split over mesh x in a head-aware order (PE column j holds kv feature block
j and, for the query, the r query heads sharing each of its kv heads); cached tokens are
split over mesh y. ``head_of_pos[j, p]`` is the kv head of feature p of column j.

    q [r*F] (x)   K^T [F, S] (x, y)   V [S, F] (y, x)       F: kv features, S: slots
    scores[g, r, s] = sum over g's features of q . K^T   each PE its own features
                      -> summed over the columns of each head (a segmented allreduce)
    p = softmax over s (split along y: max and sum allreduced along y), masked slots 0
    o[r, f] = sum_s p[head(f), r, s] V[s, f]             each PE its own slots
              -> summed along y (an allreduce), every PE of column j holds o's block j

With ``fused`` the three collectives along y become one (flash-decoding's combine): every
PE keeps its own slots' max m, sum of exponentials s and unnormalised p V o, and one
allreduce merges the states [m | s | o] (M = max m_i, S = sum s_i e^(m_i - M), O = sum
o_i e^(m_i - M)); then o = O / S. The statistics travel first so that a relay knows its
rescaling factors before the output block streams through it.

GQA, MQA and MHA differ only in ``head_of_pos`` and r.
"""

from __future__ import annotations

import numpy as np

from waferllm.kernels.layer_ops import masked_softmax
from waferllm.mesh import comm, compute
from waferllm.mesh.tensor import DistTensor


def decode_attention(q: DistTensor, k_t: DistTensor, v: DistTensor, valid: np.ndarray | None,
                     head_of_pos: np.ndarray, num_kv_heads: int, scale: float, k=2,
                     group: int | None = None, fused: bool = False) -> DistTensor:
    """softmax(q K^T * scale) V.

    ``q``: [r * Fpad] (x,) fp32; ``k_t``: [Fpad, rows * S] (x, y); ``v``: [rows * S, Fpad]
    (y, x); ``valid``: (rows, S), True where a row's slot holds a token (None in a dry
    run). Several queries of one request (a verification pass, ``batch.rows_as_heads``: T
    tokens' r heads each, read as T*r heads) take ``valid`` (rows, T, S): each its own
    causal limit; every collective then carries all T at once. Returns the attention
    output [r * Fpad] (x,) fp32, complete on every PE. ``k`` and
    ``group``: the K-tree of every allreduce (group None: about n^(1/k) PEs); ``k="tuned"``
    picks both per reduction for its payload (:func:`comm.best_ktree`). ``fused``: one
    allreduce for softmax and p V (see the module docstring).
    """
    mesh = q.mesh
    slots = k_t.tile_shape[1]
    groups = np.asarray(head_of_pos)[None]  # (1, cols, F): the same on every PE row
    r = q.tile_elems // k_t.tile_shape[0]
    # [Hkv, r, rows*S] (None, None, y): each PE the partial scores of the heads of its features
    scores = compute.grouped_contract(q, k_t, groups, num_kv_heads, shape=(num_kv_heads, r, k_t.shape[1]),
                                      layout=(None, None, "y"), partial=("x", "sum"), name="qk_gemv")
    # every head's partials summed over the columns holding its features, all heads at once;
    # a PE holds (and sends) only the heads of its own features
    held = compute.groups_per_pe(groups) * r * slots * scores.itemsize
    head_span = _columns_per_head(head_of_pos, num_kv_heads)
    kq, gq = comm.ktree_for(mesh, "x", held, k, group, span=head_span)
    summed = comm.allreduce_segments(scores, "x", head_span, held, kq, group=gq, name="qk_allreduce")
    mesh.sram.release(scores)
    # against the tiles (rows, cols, Hkv, r, S)
    if valid is None:
        allowed = None
    elif valid.ndim == 3:  # T queries of one request: query t's heads are rows t*r0 .. (t+1)*r0 - 1
        allowed = np.repeat(valid, r // valid.shape[1], axis=1)[:, None, None]  # (rows, 1, 1, T*r0, S)
    else:
        allowed = valid[:, None, None, None, :]  # (rows, 1, 1, 1, S)
    if fused:
        return _flash_softmax_pv(summed, v, q, allowed, groups, scale, r, k, group)
    ks, gs = comm.ktree_for(mesh, "y", num_kv_heads * r * 4, k, group)  # the max and sum: fp32 per head row
    p = masked_softmax(summed, allowed, scale, dim=2, out_dtype="fp32", k=ks, group=gs)
    # [r * Fpad] (x,), partial along y: each PE its slots' share
    o = compute.grouped_expand(p, v, groups, shape=q.shape, layout=q.layout, partial=("y", "sum"), name="pv_gemv")
    mesh.sram.release(p)
    ko, go = comm.ktree_for(mesh, "y", o.bytes_per_pe, k, group)
    out = comm.allreduce(o, "y", "sum", k=ko, group=go, name="pv_allreduce")
    mesh.sram.release(o)
    return out


def _flash_softmax_pv(s: DistTensor, v: DistTensor, q: DistTensor, allowed, groups, scale: float, r: int, k,
                      group, name: str = "flash_softmax_pv") -> DistTensor:
    """Softmax and p V over each PE's own slots, merged along y by one allreduce of the states."""
    mesh = s.mesh
    w = mesh.wafer
    hkv = s.shape[0]
    with mesh.ledger.span(name):
        z = compute.elementwise(lambda x: np.where(allowed, x * scale, -np.inf), s, name="softmax.scale",
                                dtype="fp32")
        mesh.sram.release(s)
        mx = _own(compute.tile_reduce(z, 2, "max", name="softmax.max"))  # [Hkv, r, 1]: this PE's slots
        e = compute.elementwise(lambda x, m: np.where(allowed, np.exp(x - m), 0.0), z, mx,
                                ops_per_elem=w.ops_exp, name="softmax.exp", dtype="fp32")
        mesh.sram.release(z)
        tot = _own(compute.tile_reduce(e, 2, "sum", name="softmax.sum"))
        # [r * Fpad] (x,): this PE's slots' unnormalised share
        o = compute.grouped_expand(e, v, groups, shape=q.shape, layout=q.layout, name="pv_gemv")
        mesh.sram.release(e)
        rows_held = compute.groups_per_pe(groups) * r  # head rows a PE holds: 2 words each travel with o
        hr = hkv * r
        tiles = None
        if mesh.numeric:
            flat = [t.tiles.reshape(mesh.rows, mesh.cols, -1) for t in (mx, tot, o)]
            tiles = np.concatenate(flat, axis=-1).astype(np.float32, copy=False)
        state = DistTensor(mesh, (mesh.cols * (2 * hr + o.tile_elems),), ("x",), "fp32", tiles, name=f"{name}.state")
        mesh.sram.release(mx, tot, o)
        onehot = (np.asarray(groups[0])[..., None] == np.arange(hkv)).astype(np.float32)  # (cols, F, Hkv)
        nbytes = (o.tile_elems + 2 * rows_held) * 4
        kc, gc = comm.ktree_for(mesh, "y", nbytes, k, group)
        # a merge per head row: difference, |.|, one exp (the larger max keeps weight 1), max, and the
        # rescaled sum as one multiply-add; the output's multiply-add replaces the plain add
        merged = comm.allreduce_combine(state, "y", _merge(hkv, r, onehot), kc, gc, bytes_per_pe=nbytes,
                                        merge_ops=rows_held * (4 + w.ops_exp), name="softmax_pv_allreduce")
        mesh.sram.release(state)
        total, out = _views(merged, q, hkv, r)
        o = compute.elementwise(lambda a, b: _divide(a, b, onehot, r), out, total, ops_per_elem=w.ops_div,
                                name="softmax_pv.div", dtype="fp32")
        mesh.sram.release(merged)
    return o


def _own(t: DistTensor) -> DistTensor:
    """A tile statistic taken as the PE's own value: the fused path merges such states itself
    instead of reducing them, so the result is not marked partial."""
    own = t.with_tiles(t.tiles, partial=None, name=t.name)
    t.mesh.sram.release(t)
    return own


def _merge(hkv: int, r: int, onehot: np.ndarray):
    """The combine of states [m | s | o] stacked along an axis (see :func:`comm.allreduce_combine`)."""
    hr = hkv * r

    def merge(x, ax):
        lead = x.shape[:-1]
        m = x[..., :hr].reshape(lead + (hkv, r))
        s = x[..., hr:2 * hr].reshape(lead + (hkv, r))
        o = x[..., 2 * hr:].reshape(lead + (r, -1))
        top = np.max(m, axis=ax, keepdims=True)
        # a PE with no token for a head row holds m = -inf: it weighs nothing
        wgt = np.where(np.isneginf(m), 0.0, np.exp(m - np.where(np.isneginf(top), 0.0, top))).astype(np.float32)
        tot = np.sum(s * wgt, axis=ax, keepdims=True)
        out = np.sum(o * np.einsum("...cgr,cfg->...crf", wgt, onehot), axis=ax, keepdims=True)
        keep = top.shape[:-2]
        return np.concatenate([top.reshape(keep + (hr,)), tot.reshape(keep + (hr,)), out.reshape(keep + (-1,))],
                              axis=-1)

    return merge


def _views(merged: DistTensor, q: DistTensor, hkv: int, r: int) -> tuple[DistTensor, DistTensor]:
    """The merged sums [Hkv, r] and output [r * Fpad] (x,): address ranges of the state (no copy)."""
    mesh, hr = merged.mesh, hkv * r
    t = merged.tiles
    total = DistTensor(mesh, (hkv, r), (None, None), "fp32",
                       None if t is None else t[..., hr:2 * hr].reshape(mesh.rows, mesh.cols, hkv, r),
                       name="softmax.total", charge_sram=False)
    out = DistTensor(mesh, q.shape, q.layout, "fp32", None if t is None else t[..., 2 * hr:], name="pv_sum",
                     charge_sram=False)
    return total, out


def _divide(o: np.ndarray, total: np.ndarray, onehot: np.ndarray, r: int) -> np.ndarray:
    """O / S per feature, S taken from the feature's head; padding features (no head) stay 0."""
    o = o.reshape(o.shape[:-1] + (r, -1))
    per = np.einsum("...cgr,cfg->...crf", total, onehot)
    return np.where(per > 0, o / np.where(per > 0, per, 1.0), 0.0).reshape(o.shape[:-2] + (-1,))


def _columns_per_head(head_of_pos: np.ndarray, num_kv_heads: int) -> int:
    """Most PE columns one kv head's features are spread over: the span of its score sum."""
    held = (np.asarray(head_of_pos)[:, :, None] == np.arange(num_kv_heads)).any(axis=1)  # (cols, Hkv)
    return max(1, int(held.sum(axis=0).max()))
