"""Cycle costs of the fabric's basic events, from the wafer's PLMR constants only.

A message of ``b`` bytes that travels ``h`` hops through ``s`` software routing stages
costs ``ramp (out) + alpha*h + beta*s + ramp (in) + b / link_bytes_per_cycle``: the
head pays the latency, the body streams behind it at link rate (wormhole routing).
``links_shared`` > 1 when several flows of one step serialise on the same link.
"""

from __future__ import annotations

import math


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
