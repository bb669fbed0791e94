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

GQA, MQA and MHA differ only in ``head_of_pos`` and r.
"""

from __future__ import annotations

import numpy as np

from waferllm.kernels.layer_ops import masked_softmax
from waferllm.mesh import comm, compute
from waferllm.mesh.tensor import DistTensor


def decode_attention(q: DistTensor, k_t: DistTensor, v: DistTensor, valid: np.ndarray | None,
                     head_of_pos: np.ndarray, num_kv_heads: int, scale: float, k: int = 2,
                     group: int | None = None) -> DistTensor:
    """softmax(q K^T * scale) V.

    ``q``: [r * Fpad] (x,) fp32; ``k_t``: [Fpad, rows * S] (x, y); ``v``: [rows * S, Fpad]
    (y, x); ``valid``: (rows, S), True where a row's slot holds a token (None in a dry
    run). Returns the attention output [r * Fpad] (x,) fp32, complete on every PE. ``k`` and
    ``group``: the K-tree of every allreduce (group None: about n^(1/k) PEs).
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
    summed = comm.allreduce_segments(scores, "x", head_span, held, k, group=group, name="qk_allreduce")
    mesh.sram.release(scores)
    allowed = None if valid is None else valid[:, None, None, None, :]  # (rows, 1, 1, 1, S) against the tiles
    p = masked_softmax(summed, allowed, scale, dim=2, out_dtype="fp32", k=k, group=group)
    # [r * Fpad] (x,), partial along y: each PE its slots' share
    o = compute.grouped_expand(p, v, groups, shape=q.shape, layout=q.layout, partial=("y", "sum"), name="pv_gemv")
    mesh.sram.release(p)
    out = comm.allreduce(o, "y", "sum", k=k, group=group, name="pv_allreduce")
    mesh.sram.release(o)
    return out


def _columns_per_head(head_of_pos: np.ndarray, num_kv_heads: int) -> int:
    """Most PE columns one kv head's features are spread over: the span of its score sum."""
    held = (np.asarray(head_of_pos)[:, :, None] == np.arange(num_kv_heads)).any(axis=1)  # (cols, Hkv)
    return max(1, int(held.sum(axis=0).max()))
