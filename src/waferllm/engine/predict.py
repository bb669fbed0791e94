"""Dry-run prediction: the engine's own code path on shapes only, for any model size.

``predict()`` places the whole model (a pipeline of regions per phase), runs prefill
for ``input_len`` tokens, the transition, and ``output_len - 1`` decode steps (the first
output token comes from the prefill logits), and reports the ledger's figures beside a
GPU roofline. With ``layers=K`` it runs the first K layers on the given grids and scales
the per-layer time to the whole model: the paper's method for models that do not fit
one wafer; the result says so.
"""

from __future__ import annotations

import time

from waferllm.hardware.gpu_roofline import gpu_baselines
from waferllm.engine.wafer import WaferModel
from waferllm.errors import RequestError


def _check(input_len: int, output_len: int) -> None:
    for name, v in (("input_len", input_len), ("output_len", output_len)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise RequestError(f"{name} must be a positive integer, got {v!r}")


def predict(config, wafer, input_len: int, output_len: int, prefill_grid: int, decode_grid: int,
            dtype: str = "fp16", kv_scheme: str = "shift", layers: int | None = None, gpus: bool = True) -> dict:
    _check(input_len, output_len)
    t0 = time.perf_counter()
    wm = WaferModel(config, None, wafer, prefill_grid, decode_grid, max_seq_len=input_len + output_len,
                    prompt_len=input_len, mode="dry", dtype=dtype, kv_scheme=kv_scheme, layers=layers)
    wm.reset()
    wm.prefill(input_len)
    for _ in range(output_len - 1):
        wm.decode(None)
    m = wm.request_metrics()
    m.update({
        "model": config.name,
        "input_len": input_len,
        "output_len": output_len,
        "dtype": dtype,
        "kv_scheme": kv_scheme,
        "placement": wm.plan.to_dict(),
        "constants": {k: {"value": v["value"], "status": v["status"]} for k, v in wm.wafer.to_dict().items()
                      if isinstance(v, dict)},
        "host_wall_s": time.perf_counter() - t0,
    })
    if layers is not None and layers != config.num_layers:
        m["note"] = (f"extrapolated: {layers} of {config.num_layers} layers were placed and run on these grids; "
                     f"layer time scaled by {config.num_layers / layers:g} (the paper's method for models that do "
                     f"not fit one wafer)")
    if gpus:
        m["gpu_baselines"] = gpu_baselines(config, input_len, output_len)
    return m


def predict_phase(config, wafer, phase: str, grid: int, input_len: int, output_len: int, max_seq_len: int,
                  dtype: str = "fp16", layers: int | None = None) -> float:
    """Predicted seconds of one phase on one grid (for the tuner): TTFT or mean TPOT."""
    if phase == "prefill":
        wm = WaferModel(config, None, wafer, grid, None, max_seq_len=max_seq_len, prompt_len=input_len, mode="dry",
                        dtype=dtype, layers=layers)
        wm.reset()
        wm.prefill(input_len)
        return wm.request_metrics()["ttft_s"]
    wm = WaferModel(config, None, wafer, None, grid, max_seq_len=max_seq_len, mode="dry", dtype=dtype, layers=layers)
    wm.reset()
    wm.start_decode(input_len)
    for _ in range(max(1, output_len - 1)):
        wm.decode(None)
    return wm.request_metrics()["tpot_s"]
