"""What a kernel reports about one execution: the result plus its cost breakdown."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

from waferllm.mesh.compute import task
from waferllm.mesh.tensor import DistTensor


@dataclass
class KernelReport:
    algo: str
    cycles: float = 0.0
    compute_cycles: float = 0.0
    comm_cycles: float = 0.0
    exposed_comm_cycles: float = 0.0
    overhead_cycles: float = 0.0
    flops: float = 0.0
    bytes_moved: float = 0.0
    routing_stages: float = 0.0
    routes_per_pe: int = 0
    relayed: bool = False
    sram_peak_bytes_per_pe: int = 0
    seconds: float = 0.0
    max_abs_error: float | None = None
    extra: dict = field(default_factory=dict)

    def efficiency(self, useful_flops: float, peak_flops_per_cycle: float) -> float:
        """Useful flops / (cycles x the region's peak flops per cycle)."""
        return useful_flops / max(self.cycles * peak_flops_per_cycle, 1e-30)

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "extra"} | self.extra


@dataclass
class KernelResult:
    out: DistTensor
    report: KernelReport
    state: dict = field(default_factory=dict)  # e.g. a skewed operand to reuse


@contextmanager
def measured(mesh, algo: str):
    """Collect a KernelReport from the ledger and accounting over a block of primitives.

    Routes per PE are the most any request in the block needed: kernels request the
    route set they hold for their whole run (e.g. MeshGEMM's two rings) up front."""
    rep = KernelReport(algo=algo)
    mark = mesh.ledger.mark()
    relayed_before = sum(mesh.routes.relayed.values())
    sram_before = mesh.sram.peak_bytes
    mesh.sram.peak_bytes = mesh.sram.used_max()
    with mesh.ledger.span(algo), task(mesh), mesh.routes.window() as routes:
        yield rep
    rep.routes_per_pe = routes["peak"]
    d = mesh.ledger.since(mark)
    rep.cycles = d["cycles"]
    rep.compute_cycles = d["compute_cycles"]
    rep.comm_cycles = d["comm_cycles"]
    rep.exposed_comm_cycles = d["exposed_comm_cycles"]
    rep.overhead_cycles = d["overhead_cycles"]
    rep.flops = d.get("flops", 0.0)
    rep.bytes_moved = d.get("bytes_moved", 0.0)
    rep.routing_stages = d.get("routing_stages", 0.0)
    rep.seconds = d["seconds"]
    rep.relayed = sum(mesh.routes.relayed.values()) > relayed_before
    rep.sram_peak_bytes_per_pe = mesh.sram.peak_bytes
    mesh.sram.peak_bytes = max(sram_before, mesh.sram.peak_bytes)
