"""Cycle and energy costs of the fabric's basic events, from the wafer's constants only.

A message of ``b`` bytes that travels ``h`` hops through ``s`` software routing stages
costs ``ramp (out) + alpha*h + beta*s + ramp (in) + b / link_bytes_per_cycle``: the
head pays the latency, the body streams behind it at link rate (wormhole routing).
``links_shared`` > 1 when several flows of one step serialise on the same link.

Energy is earned from the counted events: multiply-accumulates by dtype, SRAM bytes
read and written, bit-hops on the fabric, plus the system's static power for the time
on the critical path (:func:`energy_breakdown_j`).
"""

from __future__ import annotations

import math
from typing import Mapping

from waferllm.mesh.corners import nominal

PJ = 1e-12

# ledger counter -> energy term it pays for
ENERGY_COUNTERS = ("macs_fp16", "macs_fp32", "sram_read_bytes", "sram_write_bytes", "hop_bytes")
ENERGY_TERMS = ("compute_fp16", "compute_fp32", "sram_read", "sram_write", "fabric", "static")


def energy_breakdown_j(wafer, counters: Mapping[str, float], seconds: float) -> dict[str, float]:
    """Joules per term for a run with these event counts lasting ``seconds`` on the critical path.

    A pure function of the counters, so it applies as well to a ledger delta or to counters
    scaled for an extrapolated run. ``sum(result.values())`` is the energy.
    """
    seconds = nominal(seconds)  # the band covers times and rates, not energy
    if seconds < 0:
        raise ValueError(f"seconds must be >= 0, got {seconds!r}")

    def get(key):
        return float(nominal(counters.get(key, 0.0)))

    return {
        "compute_fp16": get("macs_fp16") * wafer.mac_energy_fp16_pj * PJ,
        "compute_fp32": get("macs_fp32") * wafer.mac_energy_fp32_pj * PJ,
        "sram_read": get("sram_read_bytes") * wafer.sram_read_energy_pj_per_byte * PJ,
        "sram_write": get("sram_write_bytes") * wafer.sram_write_energy_pj_per_byte * PJ,
        "fabric": 8.0 * get("hop_bytes") * wafer.fabric_energy_pj_per_bit_hop * PJ,
        "static": wafer.static_power_w * float(seconds),
    }


def energy_j(wafer, counters: Mapping[str, float], seconds: float) -> float:
    """The sum of :func:`energy_breakdown_j` (same order, so equal to summing the breakdown)."""
    return sum(energy_breakdown_j(wafer, counters, seconds).values())


def message_cycles(wafer, nbytes: float, hops: float, stages: float = 0, links_shared: int = 1) -> float:
    if nbytes <= 0 and hops <= 0:
        return 0.0
    body = math.ceil(nbytes / wafer.link_bytes_per_cycle) * max(1, links_shared)
    return 2 * wafer.ramp_cycles + wafer.alpha_cycles * hops + wafer.beta_cycles * stages + body


def compute_cycles(wafer, macs_per_pe: float, dtype: str) -> float:
    """Multiply-accumulates on one PE at its SIMD width, plus the op's launch overhead."""
    if macs_per_pe <= 0:
        return 0.0
    return math.ceil(macs_per_pe / wafer.macs_per_cycle(dtype)) + wafer.op_overhead_cycles


def vector_cycles(wafer, elems_per_pe: float, dtype: str, ops_per_elem: float = 1.0) -> float:
    """Elementwise/vector work: one SIMD op per element per lane."""
    if elems_per_pe <= 0:
        return 0.0
    return math.ceil(elems_per_pe * ops_per_elem / wafer.macs_per_cycle(dtype)) + wafer.op_overhead_cycles
