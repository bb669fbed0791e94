"""GPU baselines to quote beside a wafer prediction.

Per device setup (by default 1, 8 and 2x8 A100-80GB, one H100, H200 and B200), two
entries computed for the same request:

* ``roofline``: the ideal bound (:func:`waferllm.hardware.gpu_roofline.gpu_inference_roofline`);
* ``calibrated``: what a serving engine like SGLang would do, the same terms with the
  efficiency factors fitted to measured runs
  (:func:`waferllm.baselines.gpu_calibrated.gpu_inference_calibrated`); on GPUs without
  measurements of their own the factors are inherited from the A100 fit (``derived``);

and, when the project's data holds a measurement of exactly this model, setup and input
length, a third, ``measured``, with only the quantities that were measured. Every entry
has ``baseline`` (its kind) and ``provenance`` (which model, which constants, what it
was fitted to, the fit's residuals; or which measurements).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from waferllm.errors import HardwareError
from waferllm.hardware.gpu import GPUSpec, get_gpu
from waferllm.baselines.gpu_calibrated import EVALUATORS, gpu_inference_calibrated, measurement_request
from waferllm.hardware.gpu_roofline import device_label, gpu_inference_roofline

#: (GPU preset, number of GPUs); 16 A100s are 2 nodes of 8.
STANDARD_SETUPS: tuple[tuple[str, int], ...] = (
    ("a100", 1), ("a100", 8), ("a100", 16), ("h100", 1), ("h200", 1), ("b200", 1),
)

_ROW_KEYS = ("ttft_s", "tpot_s", "prefill_tokens_per_s", "decode_tokens_per_s", "e2e_tokens_per_s", "energy_j", "fits")


def _gpu_measurements(measurements) -> list:
    from waferllm.hardware.measurements import load_measurements

    if measurements is None or isinstance(measurements, (str, Path)):
        measurements = load_measurements(measurements, system="gpu")
    return [m for m in measurements if m.absolute and m.model in EVALUATORS]


def measured_baseline(config: Any, gpu: str | GPUSpec, num_gpus: int, input_len: int,
                      measurements: "Iterable | str | Path | None" = None) -> dict | None:
    """The measured figures of this model on this setup at this input length, or None if there are none."""
    spec = gpu if isinstance(gpu, GPUSpec) else get_gpu(gpu)
    found = []
    for m in _gpu_measurements(measurements):
        req = measurement_request(m)
        if (req.model, req.gpu, req.gpus, req.input_len) == (getattr(config, "name", None), spec.key, num_gpus,
                                                             input_len):
            found.append((m, req))
    if not found:
        return None
    out: dict = {"baseline": "measured", "device": device_label(spec, num_gpus), "gpu": spec.name,
                 "num_gpus": num_gpus, "input_len": input_len}
    for m, req in found:
        out[req.quantity] = m.value
    if "prefill_tokens_per_s" in out:
        out["ttft_s"] = input_len / out["prefill_tokens_per_s"]
    if "decode_tokens_per_s" in out:
        out["tpot_s"] = 1.0 / out["decode_tokens_per_s"]
    out["provenance"] = {
        "baseline": "measured",
        "measurements": [{"id": m.id, "quantity": m.quantity, "value": m.value, "unit": m.unit, "source": m.source,
                          "input_len": req.input_len, "output_len": req.output_len} for m, req in found],
    }
    return out


def gpu_baselines(config: Any, input_len: int, output_len: int, *,
                  setups: Iterable[tuple[str, int]] = STANDARD_SETUPS, batch: int = 1, dtype_bytes: int = 2,
                  measurements: "Iterable | str | Path | None | bool" = None) -> list[dict]:
    """Per setup: ``{"setup", "gpu", "gpu_name", "num_gpus", "nodes", "roofline": {...}, "calibrated": {...}}``
    and ``"measured"`` where a measurement matches (``measurements=False``: never)."""
    ms = [] if measurements is False else _gpu_measurements(measurements)
    out = []
    for gpu, count in setups:
        spec = get_gpu(gpu)
        try:
            nodes = spec.nodes(count)
        except HardwareError as exc:
            raise HardwareError(f"GPU setup ({gpu}, {count}): {exc}") from None
        entry = {
            "setup": device_label(spec, count), "gpu": spec.key, "gpu_name": spec.name, "num_gpus": count,
            "nodes": nodes,
            "roofline": gpu_inference_roofline(config, spec, count, input_len=input_len, output_len=output_len,
                                               batch=batch, dtype_bytes=dtype_bytes),
            "calibrated": gpu_inference_calibrated(config, spec, count, input_len=input_len, output_len=output_len,
                                                   batch=batch, dtype_bytes=dtype_bytes),
        }
        measured = measured_baseline(config, spec, count, input_len, ms) if ms else None
        if measured:
            entry["measured"] = measured
        out.append(entry)
    return out


def _basis(entry: dict) -> str:
    p = entry.get("provenance", {})
    if entry["baseline"] == "roofline":
        return "ideal bound: peak compute and HBM, full link bandwidth, assumed latency floors"
    if entry["baseline"] == "measured":
        return "measured: " + "; ".join(sorted({m["source"] for m in p.get("measurements", [])}))
    how = (f"inherited from the {p.get('fit_gpu')} fit (derived)" if p.get("derived")
           else f"fitted on {p.get('fit_gpu')}")
    return (f"efficiency {how}: {len(p.get('measurements', []))} measurements, "
            f"largest error {p.get('max_abs_error', 0):.0%}")


def baseline_rows(baselines: list[dict]) -> list[dict]:
    """One flat row per (setup, baseline) for a table: device, baseline, the figures
    (None where a measurement did not measure them) and a one-line ``basis``."""
    rows = []
    for setup in baselines:
        for kind in ("roofline", "calibrated", "measured"):
            entry = setup.get(kind)
            if entry is None:
                continue
            rows.append({"device": setup["setup"], "baseline": kind, **{k: entry.get(k) for k in _ROW_KEYS},
                         "basis": _basis(entry)})
    return rows
