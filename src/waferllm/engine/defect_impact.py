"""What defective PEs cost a request: the same prediction on the perfect wafer beside it.

``defect_impact`` runs the request on the wafer without its defects (same grids, same
run) and reports TTFT, TPOT, decode TPR, end-to-end TPR and KV capacity on both, and
what the defects take away (see :mod:`waferllm.hardware.defects` for the two recovery
schemes and what they charge).
"""

from __future__ import annotations

from waferllm.engine.predict import predict_run

#: the figures compared, and whether more is better
FIGURES = {"ttft_s": False, "tpot_s": False, "decode_tokens_per_s": True, "e2e_tokens_per_s": True,
           "kv_capacity_tokens": True}


def perfect_wafer(wafer):
    """The same wafer without defective PEs."""
    return wafer.replace(defective_pes=[], defect_recovery="avoid")


def defect_impact(config, wafer, run, input_len: int, output_len: int, defective: dict | None = None,
                  allow_beyond_context: bool = False, rate: float | None = None, seed: int | None = None) -> dict:
    """The request's figures on ``wafer`` (with its defects) and on the perfect wafer, and the
    loss: for rates and capacity the fraction lost, for times the fraction added.
    ``defective``: the metrics of the run on ``wafer`` when already predicted."""
    kw = dict(gpus=False, band=False, allow_beyond_context=allow_beyond_context)
    base = predict_run(config, perfect_wafer(wafer), run, input_len, output_len, **kw)
    m = defective or predict_run(config, wafer, run, input_len, output_len, **kw)
    lost = {}
    for key, more_is_better in FIGURES.items():
        a, b = base.get(key), m.get(key)
        if a and b is not None:
            lost[key] = (a - b) / a if more_is_better else (b - a) / a
    return {
        "defective_pes": len(wafer.defective_pes), "recovery": wafer.defect_recovery, "rate": rate, "seed": seed,
        "perfect": {k: base.get(k) for k in FIGURES}, "defective": {k: m.get(k) for k in FIGURES},
        "lost_fraction": lost,
        # fault-aware placement keeps the perfect wafer's regions unless the defects leave no room for one
        "same_regions": all(_sides(base, ph) == _sides(m, ph) for ph in ("prefill", "decode")),
    }


def _sides(metrics: dict, phase: str):
    return (metrics["placement"].get(phase) or {}).get("region_sides")
