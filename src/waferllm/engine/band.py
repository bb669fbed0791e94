"""The low/high band of a prediction.

Two sources of doubt are combined:

- the **calibration residuals**: after the fit, the model still misses the absolute
  measurements of its preset by some relative error; the largest of them (the wafer's
  ``calibration_error``, written by the fit) widens the band on both sides;
- the **ranges of the constants whose status is ``assumed``** (a ``range = [low, high]``
  in the wafer file): the prediction is run again with every such constant at the end of
  its range that makes the program faster, and at the end that makes it slower.
"""

from __future__ import annotations

from waferllm.hardware.plmr import WaferSpec

#: Constants that make a program faster when they grow (the others make it slower).
FASTER_WHEN_LARGER = {"clock_hz", "link_bits_per_cycle", "fp32_macs_per_cycle", "fp16_macs_per_cycle",
                      "routable_routes_per_pe"}
#: Constants that change where things fit, not how long they take: a band over them would
#: change the placement itself, so they are left out of the timing band.
PLACEMENT_ONLY = {"rows", "cols", "sram_bytes_per_pe", "reserved_bytes_per_pe"}


def assumed_ranges(wafer: WaferSpec) -> dict[str, tuple[float, float]]:
    """Timing constants with status ``assumed`` and a declared range."""
    out = {}
    for key, prov in wafer.provenance.items():
        if prov.status == "assumed" and prov.range is not None and key not in PLACEMENT_ONLY:
            out[key] = prov.range
    return out


def corner(wafer: WaferSpec, slow: bool) -> WaferSpec | None:
    """The wafer with every assumed timing constant at its fast (or slow) end; None if none has a range."""
    ranges = assumed_ranges(wafer)
    if not ranges:
        return None
    vals = {}
    for key, (lo, hi) in ranges.items():
        larger_is_slower = key not in FASTER_WHEN_LARGER
        vals[key] = hi if (slow == larger_is_slower) else lo
    return wafer.replace(**vals)


TIMES = ("ttft_s", "tpot_s", "transition_s")
RATES = ("prefill_tokens_per_s", "decode_tokens_per_s", "e2e_tokens_per_s")


def apply_band(metrics: dict, low_run: dict | None, high_run: dict | None, residual: float) -> dict:
    """Add ``*_low``/``*_high`` for times and rates to ``metrics`` (in place, and returned).

    ``low_run``/``high_run``: the same prediction on the fast and the slow corner (or None).
    Times: low = fast corner x (1 - residual), high = slow corner x (1 + residual);
    rates are their reciprocals, so ``*_low`` of a rate comes from the slow side.
    """
    for key in TIMES + RATES:
        v = metrics.get(key)
        if v is None:
            continue
        fast = (low_run or metrics).get(key, v)
        slow = (high_run or metrics).get(key, v)
        if key in TIMES:
            lo, hi = min(fast, slow, v) * (1 - residual), max(fast, slow, v) * (1 + residual)
        else:
            lo, hi = min(fast, slow, v) / (1 + residual), max(fast, slow, v) / max(1 - residual, 1e-9)
        metrics[f"{key}_low"], metrics[f"{key}_high"] = lo, hi
    metrics["band"] = {"calibration_residual": residual,
                       "assumed_ranges": bool(low_run or high_run)}
    return metrics
