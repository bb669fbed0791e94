"""The per-element steps of a transformer layer on the mesh, shared by prefill and decode.

- :func:`rmsnorm`: the sum of squares of each row's features, allreduced along the axis
  the features are split over, then ``x * rsqrt(mean + eps) * w`` on every PE.
- :func:`masked_softmax`: mask and scale, the row maximum and the sum of exponentials
  each allreduced along the axis the softmax dim is split over, then the division.
- :func:`silu_mul`: SwiGLU's ``silu(g) * u``.
- :func:`rope`: rotary embedding of pair-ordered features with per-token cos/sin tables.
- :func:`split_fused`: the parts of a fused tile (e.g. [q | k | v]) as views.

Per-element op counts come from the wafer description (``ops_rmsnorm_scale``,
``ops_exp``, ``ops_div``, ``ops_silu``, ``ops_rope``), each with its provenance. A
plain one-op step (mask-and-scale) uses the vector model's one op per element.
"""

from __future__ import annotations

import numpy as np

from waferllm.errors import MeshError
from waferllm.mesh import comm, compute
from waferllm.mesh.tensor import DistTensor


def rmsnorm(h: DistTensor, weight: DistTensor, dim: int, eps: float, out_dtype: str, k: int = 2,
            name: str = "rmsnorm", group: int | None = None) -> DistTensor:
    """RMSNorm over logical dim ``dim`` of ``h`` (its features), scaled by ``weight``."""
    mesh = h.mesh
    features = h.shape[dim]
    with mesh.ledger.span(name):
        ss = compute.tile_reduce(h, dim, "sumsq", name=f"{name}.sumsq")  # partial along the features' axis
        ss = comm.allreduce(ss, h.layout[dim], "sum", k=k, group=group, name=f"{name}.allreduce")
        out = compute.elementwise(lambda x, s, w: rms_scale(x, s, under(w, x), features, eps), h, ss, weight,
                                  ops_per_elem=mesh.wafer.ops_rmsnorm_scale, name=f"{name}.scale", dtype=out_dtype)
        mesh.sram.release(ss)
    return out


# ---- the arithmetic of each step, on host arrays (the mesh's tiles, or a fused layer's rows)


def rms_scale(x, sumsq, weight, features: int, eps: float):
    """RMSNorm's scale of ``x`` given its features' sum of squares."""
    return x / np.sqrt(sumsq / features + eps) * weight


def silu_gate(g, u):
    """SwiGLU's ``silu(g) * u``."""
    return g / (1 + np.exp(-g)) * u


def rotate_pairs(x, cos, sin):
    """RoPE of pair-ordered features (last dim; cos/sin broadcast against x, sin signed):
    ``x cos + partner sin``, the partner of each feature the other of its pair."""
    partner = x.reshape(*x.shape[:-1], x.shape[-1] // 2, 2)[..., ::-1].reshape(x.shape)
    return x * cos + partner * sin


def under(v: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Tiles ``v`` of a tensor with fewer dims (a norm weight or bias [N]) lined up under tiles
    ``x`` of a batch [B, N]: the mesh dims lead, so numpy alone would align them wrongly."""
    missing = x.ndim - v.ndim
    return v.reshape(v.shape[:2] + (1,) * missing + v.shape[2:]) if missing > 0 else v


def masked_softmax(s: DistTensor, allowed, scale: float, dim: int, out_dtype: str, k: int = 2,
                   name: str = "softmax", group: int | None = None) -> DistTensor:
    """softmax(s * scale) over logical dim ``dim``, where ``allowed`` (a boolean array
    broadcastable to the tiles; None in a dry run) is False for masked entries.

    ``s`` is consumed: its space is released once the masked copy exists, and every
    intermediate at its last use, as a kernel reuses its buffers.
    """
    mesh = s.mesh
    axis = s.layout[dim]
    with mesh.ledger.span(name):
        z = compute.elementwise(lambda x: np.where(allowed, x * scale, -np.inf), s, name=f"{name}.scale",
                                dtype="fp32")
        mesh.sram.release(s)
        mx = compute.tile_reduce(z, dim, "max", name=f"{name}.max")
        mx = comm.allreduce(mx, axis, "max", k=k, group=group, name=f"{name}.allreduce_max")
        e = compute.elementwise(lambda x, m: np.where(allowed, np.exp(x - m), 0.0), z, mx,
                                ops_per_elem=mesh.wafer.ops_exp, name=f"{name}.exp", dtype="fp32")
        mesh.sram.release(z, mx)
        tot = compute.tile_reduce(e, dim, "sum", name=f"{name}.sum")
        tot = comm.allreduce(tot, axis, "sum", k=k, group=group, name=f"{name}.allreduce_sum")
        p = compute.elementwise(lambda a, b: a / b, e, tot, ops_per_elem=mesh.wafer.ops_div, name=f"{name}.div",
                                dtype=out_dtype)
        mesh.sram.release(e, tot)
    return p


def silu_mul(g: DistTensor, u: DistTensor, out_dtype: str, name: str = "silu_mul") -> DistTensor:
    """SwiGLU's gate: ``g / (1 + exp(-g)) * u`` on every PE."""
    return compute.elementwise(silu_gate, g, u, ops_per_elem=g.mesh.wafer.ops_silu, name=name, dtype=out_dtype)


def rope(t: DistTensor, cos: np.ndarray | None, sin: np.ndarray | None, name: str = "rope") -> DistTensor:
    """Rotate the pair-ordered features of q or k on every PE.

    Features come in pairs ``(x0, x1)`` side by side; ``cos``/``sin`` (sin signed: -sin
    for the first of a pair, +sin for the second) hold one feature block of ``F``
    values and broadcast against the tiles' leading dims; a tile may hold several such
    blocks (a q tile holds the block once per query head of the group).
    ``x' = x * cos + partner * sin``. Dry run: ``cos``/``sin`` None.
    """
    def rotate(x):
        width = cos.shape[-1]
        x = x.reshape(*x.shape[:-1], x.shape[-1] // width, width)  # [..., blocks, F]
        return rotate_pairs(x, cos[..., None, :], sin[..., None, :]).reshape(*x.shape[:-2], -1)

    return compute.elementwise(rotate, t, ops_per_elem=t.mesh.wafer.ops_rope, name=name, dtype=t.dtype)


def split_fused(t: DistTensor, parts: list[tuple[tuple[int, ...], int]], name: str = "part") -> list[DistTensor]:
    """Views of the parts of a fused tensor whose every tile is [part0 | part1 | ...] along
    its last dim (a 1-d tensor, or a batch [B, N] whose rows are each fused alike).

    ``parts``: (logical shape, width in the tile) of each, in tile order. A part is an
    address range of the fused tile: no copy, no SRAM of its own (the fused tensor holds
    it; release that one when the parts are done).
    """
    if len(t.shape) not in (1, 2) or (len(t.shape) == 2 and t.layout[0] is not None):
        raise MeshError(f"split_fused: {t.name} is neither 1-d nor a batch of 1-d rows")
    widths = [w for _, w in parts]
    lead = t.tile_shape[:-1]
    if sum(widths) != t.tile_shape[-1]:
        raise MeshError(f"split_fused: parts of {widths} values do not fill {t.name}'s tile of {t.tile_shape[-1]}")
    bounds = np.cumsum([0] + widths)
    out = []
    for i, (shape, w) in enumerate(parts):
        tiles = None if t.tiles is None else t.tiles[..., bounds[i]: bounds[i + 1]]
        out.append(DistTensor(t.mesh, t.shape[:-1] + tuple(shape), t.layout, t.dtype, tiles, name=f"{name}{i}",
                              tile_shape=lead + (w,), charge_sram=False))
    return out
