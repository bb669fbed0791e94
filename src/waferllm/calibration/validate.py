"""Every measurement beside the model's value and its error: `waferllm validate`."""

from __future__ import annotations

from waferllm.calibration.fit import Row, evaluate, recorded_loss, target_loss
from waferllm.hardware.measurements import load_measurements
from waferllm.hardware.plmr import WaferSpec, get_wafer

SYSTEMS = ("wse2", "wse3")


def validation_rows(wafers: dict[str, WaferSpec] | None = None, gpu: bool = True) -> dict[str, list[Row]]:
    """Rows per system: each wafer preset against its own measurements, and (``gpu``) the
    GPU measurements against the ideal roofline (not fitted: it shows the roofline's gap)
    and against the calibrated GPU model (fitted to them)."""
    from waferllm.baselines.gpu_calibrated import measurement_value

    wafers = wafers or {n: get_wafer(n) for n in SYSTEMS}
    out = {name: evaluate(w) for name, w in wafers.items()}
    if gpu:
        ms = load_measurements(system="gpu")
        out["gpu-roofline"] = [Row(m, measurement_value(m, "roofline")) for m in ms]
        out["gpu-calibrated"] = [Row(m, measurement_value(m, "calibrated")) for m in ms]
    return out


def as_dicts(rows: dict[str, list[Row]]) -> list[dict]:
    out = []
    for system, rs in rows.items():
        for r in rs:
            m = r.measurement
            out.append({
                "id": m.id, "system": system, "kind": m.kind, "quantity": m.quantity, "measured": m.shown(),
                "measured_value": m.value, "model_value": r.value, "unit": m.unit,
                "error": m.error(r.value) if (m.absolute or m.check == "about") else None,
                "tolerance": m.tolerance if (m.absolute or m.check == "about") else None,
                "passes": r.passes, "source": m.source,
            })
    return out


def summary(wafers: dict[str, WaferSpec], rows: dict[str, list[Row]]) -> dict[str, dict]:
    """Per wafer: the loss its constants give now, and the loss its provenance records."""
    return {name: {"loss": target_loss(rows[name]), "recorded_loss": recorded_loss(w)} for name, w in wafers.items()}
