"""Communication primitives: tiles move the way the fabric moves them, and pay for it.

Each primitive returns a new :class:`DistTensor` and charges the mesh's ledger with
cycles derived from the hops, routing stages and bytes of what it actually did (see
:mod:`cost`). Mesh axes: ``"y"`` moves data between rows (along a column), ``"x"``
between columns (along a row). Everything is vectorised over PEs; Python loops run
only over algorithm steps or reduction-tree levels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from waferllm.errors import MeshError, SRAMOverflowError
from waferllm.hardware.defects import DETOUR_ROUTES, region_links
from waferllm.mesh import move
from waferllm.mesh.compute import charge_task_switch
from waferllm.mesh.cost import message_cycles
from waferllm.mesh.interleave import ring_max_hops, ring_max_link_load, ring_source
from waferllm.mesh.tensor import AXES, NP_DTYPES, DistTensor

# ------------------------------------------------------------------------ helpers


def _check_axis(axis: str) -> int:
    if axis not in AXES:
        raise MeshError(f"mesh axis must be 'y' or 'x', got {axis!r}")
    return AXES[axis]


def defect_cost(mesh, axis: str | None, hops: int, routes: int = 0) -> tuple[int, int, float]:
    """What defective PEs add to a message of ``hops`` logical hops along ``axis`` ("x", "y",
    None: either) on this region, for the slowest line: (extra hops, software relays, mean
    extra hops per hop for the energy). A detour around a dead PE needs routes on the PEs it
    passes; where the primitive's own ``routes`` leave too few, each detour is a software
    relay. (0, 0, 0.0) on a perfect wafer (see :mod:`waferllm.hardware.defects`)."""
    links = region_links(mesh.region)
    if links is None or hops <= 0:
        return 0, 0, 0.0
    relays = links.detours(axis, hops) if routes + DETOUR_ROUTES > mesh.routes.budget else 0
    return links.extra(axis, hops), relays, links.mean(axis)


def charge_messages(mesh, name: str, nbytes_per_pe: float, hops: int, stages: int = 0, rounds: int = 1,
                    links_shared: int = 1, messages: int | None = None, relayed: bool = False,
                    collective: bool = False, axis: str | None = None, routes: int = 0) -> float:
    """Charge ``rounds`` rounds in which every PE (or ``messages`` senders per round in all)
    sends ``nbytes_per_pe`` over ``hops`` hops and ``stages`` software relays; flows that
    share a link serialise on it (``links_shared``). A ``collective`` (broadcast,
    multicast) also pays its fixed set-up cost and a task switch. Returns the cycles.
    The messages travel along ``axis`` (None: either); on a wafer with defective PEs they pay
    the extra hops (and relays) of the region's slowest line (:func:`defect_cost`; ``routes``:
    what the primitive holds per PE).

    For kernels whose tiles move in a pattern the tensor primitives do not express (the
    folded rings of :func:`waferllm.kernels.meshgemm.meshgemm_rect`)."""
    w = mesh.wafer
    extra, relays, mean = defect_cost(mesh, axis, hops, routes)
    per_round = message_cycles(w, nbytes_per_pe, hops + extra, stages + relays, links_shared)
    pes = mesh.rows * mesh.cols
    msgs = pes * rounds if messages is None else messages
    if collective:
        charge_task_switch(mesh)
    return mesh.ledger.charge(
        name, "comm", per_round * rounds + (w.collective_overhead_cycles if collective else 0.0),
        bytes_moved=nbytes_per_pe * msgs, hop_bytes=nbytes_per_pe * msgs * max(hops, 1) * (1 + mean),
        routing_stages=(stages + relays) * rounds, messages=msgs, relayed_transfers=msgs if relayed or relays else 0,
        sram_read_bytes=nbytes_per_pe * msgs, sram_write_bytes=nbytes_per_pe * msgs,
    )


def _grid(mesh):
    g = getattr(mesh, "_grid_cache", None)
    if g is None:
        g = np.meshgrid(np.arange(mesh.rows), np.arange(mesh.cols), indexing="ij")
        mesh._grid_cache = g
    return g


# ------------------------------------------------------------------------ shifts


def shift(t: DistTensor, axis: str, direction: int = 1, fill: float = 0.0, name: str = "shift") -> DistTensor:
    """Every PE sends its tile one hop along ``axis`` (``direction`` +1 or -1); the edge receives ``fill``."""
    ax = _check_axis(axis)
    if direction not in (1, -1):
        raise MeshError("shift direction must be +1 or -1")
    mesh = t.mesh
    mesh.routes.request(name, 2, relayable=False)
    tiles = None
    if t.tiles is not None:
        tiles = np.empty_like(t.tiles)
        src = [slice(None)] * t.tiles.ndim
        dst = [slice(None)] * t.tiles.ndim
        edge = [slice(None)] * t.tiles.ndim
        if direction == 1:
            dst[ax], src[ax], edge[ax] = slice(1, None), slice(0, -1), slice(0, 1)
        else:
            dst[ax], src[ax], edge[ax] = slice(0, -1), slice(1, None), slice(-1, None)
        tiles[tuple(dst)] = t.tiles[tuple(src)]
        tiles[tuple(edge)] = fill
    n = mesh.axis_size(axis)
    if n > 1:
        charge_messages(mesh, name, t.bytes_per_pe, hops=1, messages=mesh.rows * mesh.cols * (n - 1) // n,
                        axis=axis, routes=2)
    return t.with_tiles(tiles)


def ring_shift(t: DistTensor, axis: str, steps=1, ring: str = "interleave", name: str = "ring_shift") -> DistTensor:
    """Rotate tiles along every line of ``axis`` by ``steps`` ring positions.

    ``steps`` is an int (all lines alike) or one int per line (a skew). A line whose
    offset is k takes min(k, n-k) rounds (it may turn either way round the ring); the
    primitive costs the slowest line's rounds, each a single message of one tile over
    the ring's longest neighbour distance (2 hops on INTERLEAVE, n-1 on a plain ring).
    """
    _check_axis(axis)
    mesh = t.mesh
    n = mesh.axis_size(axis)
    lines = mesh.cols if axis == "y" else mesh.rows
    if isinstance(steps, (int, np.integer)):  # one rotation for every line (the usual case)
        steps_arr = np.int64(steps)
        k = int(steps) % n
        rounds = min(k, n - k) if n > 1 else 0
    else:
        steps_arr = np.asarray(steps, dtype=np.int64)
        if steps_arr.ndim and steps_arr.shape != (lines,):
            raise MeshError(f"{name}: need one step count per line ({lines}), got shape {steps_arr.shape}")
        k = np.mod(steps_arr, n)
        rounds = int(np.max(np.minimum(k, n - k))) if n > 1 else 0
    if rounds == 0:
        return t
    mesh.routes.request(f"{name}[{ring}]", 3, relayable=False)
    hops = ring_max_hops(n, ring)
    # flows of one step that share a directed link serialise on it
    charge_messages(mesh, name, t.bytes_per_pe, hops=hops, rounds=rounds, links_shared=ring_max_link_load(n, ring),
                    axis=axis, routes=3)
    src = ring_source(n, ring, steps_arr) if steps_arr.ndim == 0 else _line_sources(n, ring, steps_arr)
    if src.ndim == 1:
        # the same rotation on every line: index one mesh axis only (much cheaper)
        tiles = None if t.tiles is None else (t.tiles[:, src] if axis == "x" else t.tiles[src])
        return t.with_moved_tiles(tiles, axis, src)
    ii, jj = _grid(mesh)
    idx = (ii, src) if axis == "x" else (src.T, jj)
    return t.with_tiles(None if t.tiles is None else t.tiles[idx], blocks=_moved_blocks(t, idx, ii, jj, axis, src))


_LINE_SOURCES: dict = {}  # a skew's sources, by (n, ring, steps): every MeshGEMM skews alike


def _line_sources(n: int, ring: str, steps: np.ndarray) -> np.ndarray:
    key = (n, ring, steps.tobytes())
    src = _LINE_SOURCES.get(key)
    if src is None:
        if len(_LINE_SOURCES) > 64:
            _LINE_SOURCES.clear()
        src = _LINE_SOURCES[key] = ring_source(n, ring, steps)
        src.setflags(write=False)
    return src


def _moved_blocks(t: DistTensor, idx, ii, jj, axis: str, src: np.ndarray):
    """Moving tiles means each PE now holds another PE's block: record which, for every
    split dim (a dim missing from t.blocks holds its own coordinate before the move: along
    the moved axis, that of the PE its tile came from, ``src``; across it, its own)."""
    blocks = dict(t.blocks or {})
    shape = ii.shape
    for dim, a in enumerate(t.layout):
        if a is None:
            continue
        if dim in blocks:
            blocks[dim] = np.broadcast_to(blocks[dim], shape)[idx]
        elif a == axis:
            blocks[dim] = src if axis == "x" else src.T
        else:
            own = np.arange(shape[0])[:, None] if a == "y" else np.arange(shape[1])[None, :]
            blocks[dim] = np.broadcast_to(own, shape)
    return blocks or None


# ------------------------------------------------------------------------ broadcast


def broadcast(t: DistTensor, axis: str, root=0, routes_per_pe: int = 1, name: str = "broadcast") -> DistTensor:
    """Copy the root PE's tile to every PE of its line along ``axis`` (hardware multicast).

    ``routes_per_pe``: distinct routes this broadcast pattern needs through each PE over
    the program (SUMMA, whose root moves every step, needs one per root). Over the
    router's budget the region's route policy relays the message in software instead:
    every hop becomes a routing stage.
    The dim split along ``axis`` (if any) becomes whole: its size is one tile.
    """
    ax = _check_axis(axis)
    mesh = t.mesh
    n = mesh.axis_size(axis)
    if not 0 <= int(root) < n:
        raise MeshError(f"{name}: root {root} outside a line of {n} PEs")
    hardware = mesh.routes.request(name, routes_per_pe)
    hops = max(int(root), n - 1 - int(root))
    stages = 0 if hardware else hops
    if not hardware:
        mesh.ledger.note(f"{name}: {routes_per_pe} routes/PE exceed the router's {mesh.routes.budget}; relayed in software")
    if n > 1:
        charge_messages(mesh, name, t.bytes_per_pe, hops=hops, stages=stages, relayed=not hardware,
                        messages=mesh.rows * mesh.cols // n, collective=True, axis=axis, routes=routes_per_pe)
    d = t.axis_dim(axis)
    layout = list(t.layout)
    shape = list(t.shape)
    if d is not None:
        layout[d] = None
        shape[d] = t.tile_shape[d]
    tiles = None
    if t.tiles is not None:
        sel = [slice(None)] * t.tiles.ndim
        sel[ax] = slice(int(root), int(root) + 1)
        tiles = np.broadcast_to(t.tiles[tuple(sel)], t.tiles.shape)
    blocks = None
    if t.blocks:
        blocks = {k: v for k, v in t.blocks.items() if k != d} or None
        if blocks:
            sel = (slice(int(root), int(root) + 1), slice(None)) if ax == 0 else (slice(None), slice(int(root), int(root) + 1))
            blocks = {k: np.broadcast_to(v[sel], v.shape) for k, v in blocks.items()}
    # a partial along this axis is resolved by the root (reduce-to-root then broadcast);
    # a partial along the other axis is untouched by copying along this one
    partial = t.partial if t.partial is not None and t.partial[0] != axis else None
    return DistTensor(mesh, shape, layout, t.dtype, tiles, name=name, blocks=blocks, partial=partial,
                      tile_shape=t.tile_shape)


def multicast(t: DistTensor, axis: str, root: int, lo: int, hi: int, name: str = "multicast") -> DistTensor:
    """Copy the root PE's tile to the PEs ``lo .. hi-1`` of its line along ``axis`` (one route).

    The other PEs keep their own tiles. The message's head travels from the root to the
    farther end of the span; a hardware multicast delivers to every PE it passes.
    """
    ax = _check_axis(axis)
    mesh = t.mesh
    n = mesh.axis_size(axis)
    if not (0 <= root < n and 0 <= lo < hi <= n):
        raise MeshError(f"{name}: root {root} and span [{lo}, {hi}) must lie in a line of {n} PEs")
    if t.axis_dim(axis) is not None:
        raise MeshError(f"{name}: {t.name} is split along {axis}; multicast a tensor replicated along it")
    mesh.routes.request(name, 1, relayable=False)
    hops = max(abs(root - lo), abs(hi - 1 - root))
    if hops:
        charge_messages(mesh, name, t.bytes_per_pe, hops=hops, messages=(hi - lo) * (mesh.rows * mesh.cols // n),
                        collective=True, axis=axis, routes=1)
    tiles = None
    if t.tiles is not None:
        tiles = np.array(t.tiles)
        src = [slice(None)] * tiles.ndim
        dst = [slice(None)] * tiles.ndim
        src[ax] = slice(root, root + 1)
        dst[ax] = slice(lo, hi)
        tiles[tuple(dst)] = t.tiles[tuple(src)]
    return t.with_tiles(tiles, name=name)


# ------------------------------------------------------------------------ reductions


@dataclass(frozen=True)
class Phase:
    """One pipelined phase of a reduction: ``stages`` relays, each ``spacing`` hops apart."""

    label: str
    stages: int
    spacing: int
    bytes_factor: float = 1.0  # fraction of the vector each message carries
    repeats: int = 1  # sequential repetitions (ring steps)
    extra_hops: int = 0  # pass-through hops with no relay (multicast)


def reduce_schedule(n: int, algo: str, k: int = 2, group: int | None = None, root: int | None = None,
                    allreduce: bool = True) -> tuple[list[Phase], int]:
    """The phases a reduction along a line of ``n`` PEs executes, and its routes per PE."""
    phases, routes = _schedule(int(n), algo, int(k), None if group is None else int(group),
                               None if root is None else int(root), bool(allreduce))
    return list(phases), routes


@lru_cache(maxsize=4096)
def _schedule(n: int, algo: str, k: int, group: int | None, root: int | None,
              allreduce: bool) -> tuple[tuple[Phase, ...], int]:
    """:func:`reduce_schedule`, remembered: the same few reductions recur every step."""
    phases, routes = _build_schedule(n, algo, k, group, root, allreduce)
    return tuple(phases), routes


def _build_schedule(n: int, algo: str, k: int, group: int | None, root: int | None,
                    allreduce: bool) -> tuple[list[Phase], int]:
    if n <= 1:
        return [], 0
    if algo == "chain":
        r = (n - 1) if root is None else int(root)
        stages = max(r, n - 1 - r)
        phases = [Phase("chain", stages, 1)]
        if allreduce:
            phases.append(Phase("multicast", 0, 1, extra_hops=stages))
        return phases, 2 + int(allreduce)
    if algo == "pipeline":
        phases = [Phase("pipeline-reduce", n - 1, 1)]
        if allreduce:
            phases.append(Phase("pipeline-broadcast", 0, 1, extra_hops=n - 1))
        return phases, 3
    if algo == "ring":
        # reduce-scatter then allgather on the interleaved ring: 2(n-1) steps of 1/n of the vector
        steps = n - 1
        hops = ring_max_hops(n, "interleave")  # 2, or 1 on a line of 2
        phases = [Phase("ring-reduce-scatter", 1, hops, 1.0 / n, repeats=steps)]
        if allreduce:
            # each allgather step forwards one chunk to the ring neighbour: same hops, no add
            phases.append(Phase("ring-allgather", 0, hops, 1.0 / n, repeats=steps, extra_hops=hops))
        return phases, 3
    if algo == "ktree":
        if k < 1:
            raise MeshError("K-tree needs K >= 1")
        g = int(group) if group else _ktree_group(n, k)
        phases = _ktree_levels(n, k, g)
        if allreduce:
            phases.append(Phase("ktree-multicast", 0, 1, extra_hops=math.ceil((n - 1) / 2)))
        return phases, len(phases) + 1
    raise MeshError(f"unknown reduction algorithm {algo!r}; expected chain, pipeline, ring or ktree")


def _ktree_levels(n: int, k: int, g: int) -> list[Phase]:
    phases = []
    members, spacing, level = n, 1, 1
    while members > 1:
        last = level >= k or members <= g
        size = members if last else g
        phases.append(Phase(f"ktree-L{level}", math.ceil((size - 1) / 2), spacing))
        members = math.ceil(members / size)
        spacing *= size
        level += 1
    return phases


@lru_cache(maxsize=4096)
def _ktree_group(n: int, k: int) -> int:
    """Group size ~ n^(1/k): the rounded root unless a neighbouring size needs fewer routing
    stages (rounding alone is not stage-optimal, and made the stage count non-monotone in n)."""
    r = n ** (1.0 / k)
    g0 = max(2, int(round(r)))
    cands = sorted({max(2, g) for g in (math.floor(r) - 1, math.floor(r), math.ceil(r), math.ceil(r) + 1)})

    def cost(g):
        levels = _ktree_levels(n, k, g)
        return sum(p.stages for p in levels), sum(p.stages * p.spacing for p in levels)

    best = min(cands, key=cost)
    return g0 if cost(g0)[0] == cost(best)[0] else best


def _schedule_cycles(mesh, phases: list[Phase] | tuple[Phase, ...], nbytes: int, axis: str | None = None,
                     routes: int = 0) -> tuple[float, int, int]:
    """Cycles of a reduction schedule along ``axis``: its messages phase after phase, plus the
    collective's fixed cost (setting up its routes and receive tasks) once. On a wafer with
    defective PEs each phase's path pays its extra hops (and relays) on the slowest line."""
    w = mesh.wafer
    cycles, stages, hops = (w.collective_overhead_cycles if phases else 0.0), 0, 0
    for p in phases:
        b = math.ceil(nbytes * p.bytes_factor)
        h = p.stages * p.spacing + p.extra_hops
        extra, relays, _ = defect_cost(mesh, axis, h, routes)
        cycles += p.repeats * message_cycles(w, b, h + extra, p.stages + relays)
        stages += p.repeats * (p.stages + relays)
        hops += p.repeats * (h + extra)
    return cycles, stages, hops


def _schedule_cost(mesh, phases: tuple, nbytes: int, axis: str | None, routes: int) -> tuple[float, int, int]:
    """:func:`_schedule_cycles` of a region, remembered: its wafer, defects and route budget
    are fixed, and the same reductions recur every step."""
    memo = mesh.cache("schedule_costs")
    key = (phases, nbytes, axis, routes)
    out = memo.get(key)
    if out is None:
        out = memo[key] = _schedule_cycles(mesh, phases, nbytes, axis, routes)
    return out


def _occupancy_cycles(mesh, phases: list[Phase], nbytes: int) -> float:
    """Cycles a reduction keeps its busiest PE occupied: at every level it relays, a PE
    takes in the streams from both sides, adds them and sends one on."""
    w = mesh.wafer
    busy = 2 * w.ramp_cycles
    for p in phases:
        body = math.ceil(math.ceil(nbytes * p.bytes_factor) / w.link_bytes_per_cycle)
        busy += p.repeats * ((2 * body + w.beta_cycles) if p.stages else body)
    return busy


def pipeline_tail(mesh, n: int, nbytes: int, algo: str = "ktree", k: int = 2, allreduce: bool = False,
                  axis: str | None = None, group: int | None = None) -> float:
    """What the last of a stream of pipelined reductions (along ``axis``) adds after the stream's steps."""
    phases, routes = reduce_schedule(n, algo, k, group, None, allreduce)
    full, _, _ = _schedule_cycles(mesh, phases, nbytes, axis, routes)
    return max(0.0, full - _occupancy_cycles(mesh, phases, nbytes))


def reduce(t: DistTensor, axis: str, op: str = "sum", algo: str = "ktree", k: int = 2, group: int | None = None,
           root: int | None = None, allreduce: bool = True, name: str | None = None,
           pipelined: bool = False) -> DistTensor:
    """Reduce tiles along ``axis`` (sum or max).

    The input is either a tensor with ``partial == (axis, op)`` or any tensor not split
    along ``axis`` whose tiles are combined. With ``allreduce`` every PE of the line ends
    with the result; otherwise only the root does (the other tiles are zeroed, and the
    result stays ``partial`` so that its logical value is exact).

    ``pipelined``: one of a stream of independent reductions issued step after step (as in
    dist-GEMM-T, whose root rotates so consecutive reductions do not queue at one PE):
    each is charged only the time it occupies its busiest PE; the caller charges the
    stream's latency tail once (:func:`pipeline_tail`).
    """
    mesh = t.mesh
    n = mesh.axis_size(axis)
    name = name or f"{'allreduce' if allreduce else 'reduce'}[{algo}]"
    keep_partial = _check_reduce(t, axis, op, allreduce, name)
    worst_root = None
    if root is not None:
        r_arr = np.asarray(root)
        if r_arr.size and (r_arr.min() < 0 or r_arr.max() >= n):
            raise MeshError(f"{name}: root {root} outside a line of {n} PEs")
        if algo == "chain" and r_arr.size:  # only a chain's schedule depends on where its root is
            worst_root = int(r_arr.flat[np.argmax(np.maximum(r_arr, n - 1 - r_arr))])
    phases, routes = _schedule(n, algo, int(k), None if group is None else int(group), worst_root, bool(allreduce))
    _charge_reduce(mesh, name, axis, phases, routes, t.bytes_per_pe, t.tile_elems, allreduce, pipelined)
    partial = keep_partial if allreduce else (axis, op)
    return t.with_tiles(_reduced_tiles(t, axis, op, root, allreduce), partial=partial, name=name)


def _check_reduce(t: DistTensor, axis: str, op: str, allreduce: bool, name: str):
    """Refuse what a reduction of ``t`` cannot do; returns the partial state the result keeps."""
    _check_axis(axis)
    if op not in ("sum", "max"):
        raise MeshError(f"reduce op must be sum or max, got {op!r}")
    if t.axis_dim(axis) is not None:
        raise MeshError(f"cannot reduce {t.name} along {axis}: a logical dim is split along it")
    if t.partial is None or t.partial == (axis, op):
        return None
    # the tiles are partial along the other axis: reducing them is exact only for the
    # same op, and only an allreduce can keep that other partial
    if t.partial[0] == axis or t.partial[1] != op or not allreduce:
        raise MeshError(f"{name}: {t.name} is partial along {t.partial[0]} ({t.partial[1]}); "
                        f"cannot {op}-reduce it along {axis}{'' if allreduce else ' to a root'}")
    return t.partial


def _charge_reduce(mesh, name: str, axis: str, phases, routes: int, nbytes: int, elems: int, allreduce: bool,
                   pipelined: bool) -> None:
    """Charge a reduction of ``nbytes`` (``elems`` values) per PE along ``axis`` by ``phases``."""
    n = mesh.axis_size(axis)
    if routes:
        mesh.routes.request(name, routes, relayable=False)
    cycles, stages, hops = _schedule_cost(mesh, phases, nbytes, axis, routes)
    if pipelined:
        cycles = _occupancy_cycles(mesh, phases, nbytes)
    lines = mesh.rows * mesh.cols // max(n, 1)
    if n > 1:
        mesh.ledger.charge(
            name, "comm", cycles,
            bytes_moved=nbytes * (n - 1) * lines * (2 if allreduce else 1),
            hop_bytes=nbytes * hops * lines, routing_stages=stages, messages=(n - 1) * lines,
            flops=elems * (n - 1) * lines,
        )


def _reduced_tiles(t: DistTensor, axis: str, op: str, root, allreduce: bool):
    """The values a reduction of ``t`` along ``axis`` leaves on every PE (None in a dry run)."""
    if t.tiles is None:
        return None
    mesh, ax = t.mesh, AXES[axis]
    n = mesh.axis_size(axis)
    lines_n = mesh.cols if axis == "y" else mesh.rows
    red = np.sum if op == "sum" else np.max
    acc = red(t.tiles.astype(np.float32, copy=False), axis=ax, keepdims=True).astype(t.tiles.dtype)
    if allreduce:
        return np.broadcast_to(acc, t.tiles.shape)
    # only the root of each line holds the result; max needs -inf elsewhere, sum zeros
    rroot = np.broadcast_to(np.asarray((n - 1) // 2 if root is None else root, dtype=np.int64), (lines_n,))
    tiles = np.full_like(t.tiles, 0 if op == "sum" else -np.inf)
    line = np.arange(lines_n)
    if axis == "y":
        tiles[rroot, line] = acc[0]
    else:
        tiles[line, rroot] = acc[:, 0]
    return tiles


def allreduce(t: DistTensor, axis: str, op: str = "sum", algo: str = "ktree", **kw) -> DistTensor:
    return reduce(t, axis, op=op, algo=algo, allreduce=True, **kw)


def stream_cycles(mesh, axis: str, nbytes: int, algo: str = "ktree", k: int = 2, group: int | None = None,
                  allreduce: bool = True) -> tuple[float, float]:
    """(latency, period) of one segment of ``nbytes`` in a stream of reductions along ``axis``
    through one tree: the cycles :func:`reduce` charges it alone, and what it occupies the
    busiest PE, after which the next segment can follow (what ``reduce(pipelined=True)`` charges)."""
    n = mesh.axis_size(axis)
    if n <= 1:
        return 0.0, 0.0
    phases, routes = reduce_schedule(n, algo, k, group, None, allreduce)
    return _schedule_cost(mesh, tuple(phases), nbytes, axis, routes)[0], _occupancy_cycles(mesh, phases, nbytes)


def reduce_stream(t: DistTensor, axis: str, widths, produce=None, op: str = "sum", algo: str = "ktree", k: int = 2,
                  group: int | None = None, allreduce: bool = True, name: str | None = None) -> DistTensor:
    """:func:`reduce` of ``t`` delivered as segments of its tiles' last dim (``widths`` values
    each), one after another through the same tree, so that the work making the next segment
    overlaps the reduction of this one.

    ``produce(c)`` charges the work that makes segment c (e.g. its columns of a local
    product): segment 0's first, then segment c+1's on the PEs' cores while segment c is
    on the fabric. Each segment is its own message: it pays its ramps, hops and relays, and
    the stream's last one its whole latency; the tree's set-up is paid once. Segment c+1
    enters the tree when both its producer and the busiest PE (done with segment c) are
    ready, so a stream of tiny segments costs more than one message. One segment is
    exactly :func:`reduce`. The values are those of one reduction of the whole tile."""
    widths = [int(w) for w in widths]
    if sum(widths) != t.tile_shape[-1] or min(widths) < 1:
        raise MeshError(f"reduce_stream: segments of {widths} values do not fill {t.name}'s tile of {t.tile_shape[-1]}")
    mesh, led = t.mesh, t.mesh.ledger
    name = name or f"{'allreduce' if allreduce else 'reduce'}[{algo}]"
    if produce is not None:
        produce(0)
    if len(widths) == 1:
        return reduce(t, axis, op, algo, k, group, allreduce=allreduce, name=name)
    keep = _check_reduce(t, axis, op, allreduce, name)
    n = mesh.axis_size(axis)
    phases, routes = _schedule(n, algo, int(k), None if group is None else int(group), None, bool(allreduce))
    per_value = t.tile_elems // t.tile_shape[-1]  # a segment of w values: w of every leading row
    for c, w in enumerate(widths):
        with led.overlap():
            if produce is not None and c + 1 < len(widths):
                produce(c + 1)
            _charge_reduce(mesh, name, axis, phases, routes, per_value * w * t.itemsize, per_value * w, allreduce,
                           pipelined=True)
    # the last segment's latency beyond its occupancy: nothing is left to hide it
    tail = pipeline_tail(mesh, n, per_value * widths[-1] * t.itemsize, algo, k, allreduce, axis, group)
    led.charge(f"{name}.tail", "comm", tail)
    return t.with_tiles(_reduced_tiles(t, axis, op, None, allreduce), partial=keep if allreduce else (axis, op),
                        name=name)


def allreduce_segments(t: DistTensor, axis: str, span: int, bytes_per_pe: int | None = None, k: int = 2,
                       name: str = "allreduce_segments", group: int | None = None) -> DistTensor:
    """Sum-allreduce along ``axis`` within segments of ``span`` PEs that run at the same time.

    For values that live on a few neighbouring PEs of a line (an attention head's feature
    columns): each entry of a tile is non-zero only on the PEs of its segment, so the sum
    over the whole line is each segment's sum. The cost is a K-tree over ``span`` PEs
    carrying ``bytes_per_pe`` (what a PE really holds; default its whole tile).
    """
    _check_axis(axis)
    mesh = t.mesh
    nbytes = t.bytes_per_pe if bytes_per_pe is None else bytes_per_pe
    phases, routes = reduce_schedule(span, "ktree", k, group if group and group < span else None, None, True)
    cycles, stages, hops = _schedule_cost(mesh, tuple(phases), nbytes, axis, routes)
    if routes:
        mesh.routes.request(name, routes, relayable=False)
    pes = mesh.rows * mesh.cols
    lines = pes // max(span, 1)
    mesh.ledger.charge(name, "comm", cycles, bytes_moved=nbytes * pes, hop_bytes=nbytes * hops * lines,
                       routing_stages=stages, messages=pes)
    charge_task_switch(mesh)
    tiles = None
    if t.tiles is not None:
        tiles = np.broadcast_to(t.tiles.sum(axis=AXES[axis], keepdims=True), t.tiles.shape)
    return t.with_tiles(tiles, partial=None, name=name)


# ------------------------------------------------------------------------ gather / re-place


def gather(t: DistTensor, to: tuple[int, int] = (0, 0), name: str = "gather"):
    """Collect the whole logical tensor on one PE (numeric: returns it; dry: None).

    Every byte enters the target through its one ramp, so the body streams at link rate.
    """
    mesh = t.mesh
    r, c = to
    if not (0 <= r < mesh.rows and 0 <= c < mesh.cols):
        raise MeshError(f"{name}: target PE {to} outside region {mesh.region.describe()}")
    total = math.prod(t.shape) * t.itemsize
    cap = mesh.sram.capacity - mesh.sram.used_max() + t.bytes_per_pe
    if total > cap:
        raise SRAMOverflowError(
            f"{name}: gathering {t.name} ({total:,} B) onto PE {to} of region {mesh.region.describe()} "
            f"needs {total - cap:,} B more than its {cap:,} B free"
        )
    hops = max(r, mesh.rows - 1 - r) + max(c, mesh.cols - 1 - c)
    charge_messages(mesh, name, total, hops=hops, messages=1, routes=1)
    return t.to_global() if t.tiles is not None else None


def relayout(t: DistTensor, mesh, layout, dtype: str | None = None, name: str = "relayout") -> DistTensor:
    """Re-place a tensor onto another region and/or layout (e.g. prefill -> decode).

    Priced by :func:`waferllm.mesh.move.charge_move` from where every element is now (its
    layout, padding and block map) and where it lands; the narrower of the two dtypes
    travels (the conversion happens at whichever end makes the message smaller).
    """
    src = t.mesh
    if src.wafer is not mesh.wafer and src.wafer != mesh.wafer:
        raise MeshError(f"{name}: cannot move a tensor between different wafers")
    dtype = dtype or t.dtype
    if t.source is None and t.tiles is None:
        out = DistTensor.from_global(mesh, t.shape, layout, dtype, name=name)
    else:  # t's values are exact in its dtype, so in the same or a wider one: tiles cut only if read
        exact = t.partial is None and (dtype == t.dtype or dtype == "fp32")  # a partial one sums on reading
        out = DistTensor.from_global(mesh, t.to_global(np.float32 if exact else None), layout, dtype, name=name,
                                     exact=exact)
    move.charge_tensor_move(mesh.ledger, t, out, min(t.itemsize, out.itemsize), name)
    return out


def elements(t: DistTensor, index) -> np.ndarray:
    """The values of ``t``'s logical elements at ``index`` (one integer array per dim,
    broadcast together), read from the tiles of the PEs that hold them through the tensor's
    layout and block map (any copy of a replicated tile): what a move carries, for a caller
    that builds its destination's storage itself and charges the move from the two
    placements (:func:`waferllm.mesh.move.charge_move`). Numeric runs only."""
    if t.source is None and t.tiles is None:
        raise MeshError(f"{t.name}: dry-run tensors hold no data")
    if t.partial is not None:
        raise MeshError(f"{t.name}: partial along {t.partial[0]}; reduce it before reading its elements")
    index = np.broadcast_arrays(*(np.asarray(i, np.int64) for i in index))
    if len(index) != len(t.shape):
        raise MeshError(f"{t.name}: {len(index)} index arrays for a {len(t.shape)}-d tensor")
    if t.source is not None:  # placed from an exact host array, its tiles not yet cut: the same values
        return t.source[tuple(index)].astype(NP_DTYPES[t.dtype])
    p = move.Placement.of(t)
    by = p.y_of[index[p.y_dim]] if p.y_dim is not None else 0
    bx = p.x_of[index[p.x_dim]] if p.x_dim is not None else 0
    if p.pe_rows is not None:
        by, bx = p.pe_rows[by, bx], p.pe_cols[by, bx]
    offsets = tuple(i % size if axis else i for i, size, axis in zip(index, t.tile_shape, t.layout))
    return t.tiles[(by, bx) + offsets]


# ------------------------------------------------------------------------ merges of states, K per reduction


def allreduce_combine(t: DistTensor, axis: str, combine, k: int = 2, group: int | None = None,
                      bytes_per_pe: int | None = None, merge_ops: float = 0.0,
                      name: str = "allreduce_combine") -> DistTensor:
    """Allreduce along ``axis`` whose relays merge per-PE states with ``combine`` instead of adding them
    (flash-decoding's softmax: [max | sum | unnormalised output] merged with rescaling).

    The schedule and its messages are the K-tree allreduce's (:func:`reduce`), carrying
    ``bytes_per_pe`` (what a PE really sends; default its whole tile). ``merge_ops``: the SIMD ops
    (fp32) one merge of two states needs beyond the add a relay already does while the payload
    streams through; a relay must finish them before it forwards, so every merge on the critical
    path adds them: each level is a chain of relays ending at a root that merges both sides, at
    most ``stages + 1`` merges in sequence.

    ``combine(x, ax)`` merges the states stacked along axis ``ax`` of ``x`` (kept, size 1). ``x``
    is the tile array with the line split into (groups, members) at each level: the dims before
    the tile dims are mesh dims, and the last of them is the mesh columns on a reduction along y.
    It is applied level by level over the groups the K-tree forms, so the result is the tree's.
    """
    ax = _check_axis(axis)
    if t.axis_dim(axis) is not None:
        raise MeshError(f"{name}: cannot combine {t.name} along {axis}: a logical dim is split along it")
    mesh = t.mesh
    n = mesh.axis_size(axis)
    nbytes = t.bytes_per_pe if bytes_per_pe is None else bytes_per_pe
    phases, routes = reduce_schedule(n, "ktree", k, group, None, True)
    if routes:
        mesh.routes.request(name, routes, relayable=False)
    cycles, stages, hops = _schedule_cost(mesh, tuple(phases), nbytes, axis, routes)
    lines = mesh.rows * mesh.cols // max(n, 1)
    if n > 1:
        mesh.ledger.charge(name, "comm", cycles, bytes_moved=nbytes * (n - 1) * lines * 2,
                           hop_bytes=nbytes * hops * lines, routing_stages=stages, messages=(n - 1) * lines,
                           flops=t.tile_elems * (n - 1) * lines)
        merges = sum(p.stages + 1 for p in phases if p.stages)
        if merge_ops and merges:
            ops = merge_ops * (n - 1) * lines  # every non-root state is merged once
            mesh.ledger.charge(f"{name}.merge", "compute",
                               merges * math.ceil(merge_ops / mesh.wafer.macs_per_cycle("fp32")),
                               flops=ops, macs_fp32=ops / 2)
    tiles = None
    if t.tiles is not None:
        acc = _combine_levels(t.tiles.astype(np.float32, copy=False), ax, phases, n, combine)
        tiles = np.broadcast_to(acc, t.tiles.shape)
    return t.with_tiles(tiles, partial=None, name=name)


def _combine_levels(x: np.ndarray, ax: int, phases: list[Phase], n: int, combine) -> np.ndarray:
    """``combine`` over the line axis ``ax`` in the K-tree's groups, level after level: a level of
    group size g merges members [0, g), [g, 2g), ... (the last group may be short)."""
    levels = [p for p in phases if p.stages]
    sizes = [b.spacing // a.spacing for a, b in zip(levels, levels[1:])]
    sizes.append(math.ceil(n / levels[-1].spacing) if levels else 1)
    for g in sizes:
        m = x.shape[ax]
        full = (m // g) * g
        parts = []
        if full:
            head = np.take(x, np.arange(full), axis=ax)
            head = head.reshape(head.shape[:ax] + (m // g, g) + head.shape[ax + 1:])
            parts.append(np.squeeze(combine(head, ax + 1), axis=ax + 1))
        if full < m:
            parts.append(combine(np.take(x, np.arange(full, m), axis=ax), ax))
        x = np.concatenate(parts, axis=ax) if len(parts) > 1 else parts[0]
    return x


def best_ktree(mesh, axis: str, nbytes_per_pe: int, allreduce: bool = True, span: int | None = None,
               ks: tuple[int, ...] = (1, 2, 3, 4)) -> tuple[int, int]:
    """The K-tree (K, group size) whose executed schedule is fastest for a reduction of
    ``nbytes_per_pe`` along ``axis`` (over ``span`` PEs; default the whole line).

    Every K in ``ks`` and every group size 2..n-1 is priced with the schedule and the cycles
    :func:`reduce` itself charges (defects included); ties go to the paper's K=2 default, then
    to fewer routes, smaller K and smaller groups, so the choice is deterministic and never
    slower than the default. Small payloads favour more levels (fewer software relays), large
    ones fewer (each level streams the whole payload once more)."""
    _check_axis(axis)
    n = mesh.axis_size(axis) if span is None else int(span)
    key = (axis, n, int(nbytes_per_pe), bool(allreduce), tuple(ks), mesh.routes.budget)
    # per region: the wafer's constants and defects are fixed there
    cache = mesh.cache("best_ktree")
    if key not in cache:
        default = (2, _ktree_group(n, 2)) if n > 1 else (2, 2)
        best = None
        for k in ks:
            for g in ([max(n, 2)] if k == 1 else range(2, max(n, 3))):
                phases, routes = reduce_schedule(n, "ktree", k, g, None, allreduce)
                if routes > mesh.routes.budget:
                    continue
                cycles = _schedule_cycles(mesh, phases, nbytes_per_pe, axis, routes)[0]
                rank = (cycles, (k, g) != default, routes, k, g)
                if best is None or rank < best:
                    best = rank
        cache[key] = (best[3], best[4]) if best else default
    return cache[key]


def ktree_for(mesh, axis: str, nbytes_per_pe: int, k, group: int | None = None, allreduce: bool = True,
              span: int | None = None) -> tuple[int, int | None]:
    """(k, group) as given, or, with ``k == "tuned"``, :func:`best_ktree`'s for this payload."""
    if k == "tuned":
        return best_ktree(mesh, axis, nbytes_per_pe, allreduce, span)
    return k, group


# ------------------------------------------------------------------------ sums of per-PE slots


def allreduce_slots(t: DistTensor, axis: str, slot_groups, span: int, k: int = 2, group: int | None = None,
                    name: str = "allreduce_slots") -> DistTensor:
    """Sum-allreduce along ``axis`` of tiles whose first tile dim holds a PE's *slots*: slot s of a
    PE stands for group ``slot_groups[..., s]`` (broadcastable to (rows, cols, slots); -1: none),
    e.g. the attention heads of the features a PE column holds, packed so that a PE keeps only
    its own. Every PE gets, in each slot, the sum over its line of the entries of that slot's
    group. A group lives on at most ``span`` consecutive PEs, so the schedule and its cost are
    :func:`allreduce_segments`' over ``span`` PEs carrying the whole (packed) tile."""
    ax = _check_axis(axis)
    mesh = t.mesh
    out = allreduce_segments(t, axis, span, k=k, name=name, group=group)
    if t.tiles is not None:
        ids = np.broadcast_to(np.asarray(slot_groups), (mesh.rows, mesh.cols, t.tile_shape[0]))
        n_groups = max(int(ids.max()) + 1, 1)
        onehot = (ids[..., None] == np.arange(n_groups)).astype(np.float32)  # (rows, cols, slots, groups)
        x = t.tiles.astype(np.float32, copy=False)
        x = np.where((ids >= 0).reshape(ids.shape + (1,) * (x.ndim - 3)), x, 0.0)
        per_group = np.einsum("ijsg,ijs...->ijg...", onehot, x)  # each PE's entries by group
        total = per_group.sum(axis=ax, keepdims=True)  # the line's sum of every group
        tiles = np.einsum("ijsg,ijg...->ijs...", onehot, np.broadcast_to(total, per_group.shape))
        out.tiles = tiles.astype(t.tiles.dtype)
    return out
