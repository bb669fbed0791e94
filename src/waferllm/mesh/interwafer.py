"""Moves between the wafers of a cluster, priced from the bytes they carry and the link model.

A tensor that leaves a wafer crosses three legs:

1. the source wafer's fabric, from the PEs that hold it to the column where the system's
   I/O meets the fabric (the wafer's west edge: its first column of healthy PEs), each
   row of the tensor along its own row of PEs;
2. the link between the two systems (:class:`waferllm.hardware.cluster.ClusterSpec`):
   ``hops`` network elements of ``hop_latency_s`` each, a fixed ``transfer_overhead_s``
   per hand-off, and the bytes at ``link_bytes_per_s``;
3. the destination wafer's fabric, from its I/O column to the PEs that receive it.

The wafer legs are moves priced from their real block maps (:mod:`waferllm.mesh.move`:
the busiest ramp or link, the longest path). The legs stream into one another, so a
transfer costs the heads of all three (the wafer legs' longest paths and the link's
latency), plus the slowest body (the busiest wafer link or ramp of either leg, or the
bytes over the system link), plus the fixed costs: setting up each wafer leg's routes (a
collective's overhead on each wafer), one task switch, and the link's per-transfer
overhead. Several transfers issued together (:func:`charge_transfer` with many flows)
run at once on different systems; flows that leave or enter the same system share its
I/O, so their bodies and hand-offs add up there.

Counters: ``interwafer_bytes`` (the logical bytes over the links), ``interwafer_transfers``,
and, for the wafer legs, the bytes, hop-bytes, messages and SRAM traffic a move counts.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from waferllm.errors import MeshError
from waferllm.mesh.move import MoveCost, Placement, move_cost, plain_key
from waferllm.mesh.region import Region
from waferllm.mesh.tensor import DistTensor


@lru_cache(maxsize=64)
def io_region(wafer) -> Region:
    """The column of PEs where the system's I/O enters the fabric: the west edge, or the
    first column west to east with no defective PE."""
    bad = {c for _, c in wafer.defective_pes}
    col = next((c for c in range(wafer.cols) if c not in bad), None)
    if col is None:
        raise MeshError(f"{wafer.name}: every column holds a defective PE; no path to the system's I/O")
    return Region(wafer, wafer.rows, 1, 0, col, name="io")


def at_io(p: Placement) -> Placement:
    """The tensor of ``p`` on its wafer's I/O column: each element on the row of the wafer
    where ``p`` has it (it streams along its own row to or from the I/O); a tensor whose
    rows come from block tables, or that no dim spreads over the rows, in balanced blocks
    of its column-spread (else largest) dim over the column's rows."""
    io = io_region(p.region.wafer)
    if p.y_dim is not None and p.pe_rows is None:
        return Placement(io, p.shape, y_dim=p.y_dim, y_of=p.y_of + p.region.row0)
    dim = p.y_dim if p.y_dim is not None else p.x_dim
    if dim is None:
        dim = int(np.argmax(p.shape)) if p.shape else None
    if dim is None:
        return Placement(io, p.shape)
    n = p.shape[dim]
    return Placement(io, p.shape, y_dim=dim, y_of=(np.arange(n, dtype=np.int64) * io.rows) // max(n, 1))


@dataclass(frozen=True)
class Flow:
    """One tensor from ``src`` (on one wafer) to ``dst`` (on another), elements of ``itemsize`` bytes."""

    src: Placement
    dst: Placement
    itemsize: int

    def __post_init__(self):
        if self.src.shape != self.dst.shape:
            raise MeshError(f"interwafer: source shape {self.src.shape} differs from destination shape {self.dst.shape}")
        if self.src.region.wafer == self.dst.region.wafer:
            raise MeshError(f"interwafer: {self.src.region.describe()} and {self.dst.region.describe()} are on the same "
                            "wafer; move it on the wafer (comm.relayout / move.charge_move)")

    @property
    def nbytes(self) -> int:
        return math.prod(self.src.shape) * self.itemsize


@dataclass(frozen=True)
class TransferCost:
    """What a group of transfers costs (cycles of the wafer clock) and what it counts."""

    head_cycles: float  # the longest path: both wafer legs' heads and the link's latency
    body_cycles: float  # the slowest stream: a wafer leg's busiest link or ramp, or a system's link
    fixed_cycles: float  # route set-up on both wafers and the link's per-transfer overheads
    counters: dict

    @property
    def cycles(self) -> float:
        return self.head_cycles + self.body_cycles + self.fixed_cycles


def _head(w, c: MoveCost) -> float:
    return 2 * w.ramp_cycles + w.alpha_cycles * c.max_hops if c.messages else 0.0


def _body(w, c: MoveCost) -> float:
    return math.ceil(c.busiest_bytes / w.link_bytes_per_cycle) if c.messages else 0.0


def transfer_cost(cluster, flows: list[Flow]) -> TransferCost:
    """The cost of ``flows`` issued together (see the module docstring)."""
    if not flows:
        return TransferCost(0.0, 0.0, 0.0, {})
    w, clock = cluster.wafer, cluster.wafer.clock_hz
    head = 0.0
    leg_out, leg_in = defaultdict(float), defaultdict(float)  # wafer -> body cycles on its I/O column
    sent, received, handoffs = defaultdict(float), defaultdict(float), defaultdict(int)  # per system
    counters = defaultdict(float)
    for f in flows:
        out = move_cost(f.src, at_io(f.src), f.itemsize)
        inn = move_cost(at_io(f.dst), f.dst, f.itemsize)
        a, b = f.src.region.wafer, f.dst.region.wafer
        head = max(head, _head(w, out) + _head(w, inn))
        leg_out[a] += _body(w, out)
        leg_in[b] += _body(w, inn)
        sent[a] += f.nbytes
        received[b] += f.nbytes
        handoffs[a] += 1
        for c in (out, inn):
            counters["bytes_moved"] += c.bytes_moved
            counters["hop_bytes"] += c.hop_bytes
            counters["messages"] += c.messages
        counters["sram_read_bytes"] += out.read_bytes  # read where it leaves, written where it lands
        counters["sram_write_bytes"] += inn.write_bytes
        counters["interwafer_bytes"] += f.nbytes
        counters["interwafer_transfers"] += 1
    link = max(max(sent.values()), max(received.values())) / cluster.link_bytes_per_s * clock
    body = max(max(leg_out.values()), max(leg_in.values()), link)
    fixed = 2 * w.collective_overhead_cycles + max(handoffs.values()) * cluster.transfer_overhead_s * clock
    return TransferCost(head + cluster.latency_s * clock, body, fixed, dict(counters))


def charge_transfer(ledger, cluster, flows: list[Flow], name: str = "interwafer") -> float:
    """Charge ``flows`` (issued together) on ``ledger``: a task switch and one transfer of
    :func:`transfer_cost`. Returns the transfer's cycles."""
    cost = transfer_cost(cluster, flows)
    if not flows:
        return 0.0
    return _charge_cost(ledger, cost, name)


def _charge_cost(ledger, cost: TransferCost, name: str) -> float:
    ledger.charge_task_switch()
    return ledger.charge(name, "comm", cost.cycles, **cost.counters)


def send(src: Placement, itemsize: int, data, mesh, layout, dtype: str, cluster, name: str = "interwafer") -> DistTensor:
    """Land ``data`` (a host array, or a shape in a dry run), held at ``src`` in elements of
    ``itemsize`` bytes, on another wafer's ``mesh`` in ``layout``, charging the transfer (the
    narrower of the two dtypes travels); returns the landed tensor."""
    out = DistTensor.from_global(mesh, data, layout, dtype, name=name)
    charge_transfer(mesh.ledger, cluster, [Flow(src, Placement.of(out), min(itemsize, out.itemsize))], name)
    return out


def send_many(src: Placement, itemsize: int, data, meshes: list, layout, dtype: str, cluster,
              name: str = "interwafer") -> list[DistTensor]:
    """:func:`send` to several wafers' ``meshes`` at once (one flow each, issued together: the
    source system's I/O carries every copy); returns the landed tensors in order."""
    outs = [DistTensor.from_global(m, data, layout, dtype, name=name) for m in meshes]
    charge_transfer(meshes[0].ledger, cluster, [Flow(src, Placement.of(o), min(itemsize, o.itemsize)) for o in outs],
                    name)
    return outs


def transfer(t: DistTensor, mesh, layout, cluster, dtype: str | None = None, name: str = "interwafer") -> DistTensor:
    """Re-place ``t`` on ``mesh`` of another wafer (the inter-wafer :func:`comm.relayout`);
    the narrower of the two dtypes travels."""
    if t.mesh.wafer == mesh.wafer:
        raise MeshError(f"{name}: {t.mesh.region.describe()} and {mesh.region.describe()} are on the same wafer; "
                        "use comm.relayout")
    data = t.to_global() if t.tiles is not None else t.shape
    out = DistTensor.from_global(mesh, data, layout, dtype or t.dtype, name=name)
    itemsize = min(t.itemsize, out.itemsize)
    a, b = plain_key(t), plain_key(out)
    if a is None or b is None:
        charge_transfer(mesh.ledger, cluster, [Flow(Placement.of(t), Placement.of(out), itemsize)], name)
        return out
    # a stage's hidden states cross the same link every step (and in every option of a
    # cluster search): the transfer is priced once per geometry, and charged as always
    key = (id(cluster), a, t.mesh.wafer.rows, b, mesh.wafer.rows, itemsize)
    held = _TRANSFERS.get(key)
    if held is None or held[0] is not cluster:
        if len(_TRANSFERS) > 4096:
            _TRANSFERS.clear()
        held = _TRANSFERS[key] = (cluster, transfer_cost(cluster, [Flow(Placement.of(t), Placement.of(out), itemsize)]))
    _charge_cost(mesh.ledger, held[1], name)
    return out


_TRANSFERS: dict = {}  # (cluster, both ends' geometry, itemsize) -> (that cluster, its TransferCost)
