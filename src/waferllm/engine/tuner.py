"""The offline grid tuner: pick prefill and decode grid sizes by predicted time.

As the paper's tuner does, it runs the model (shape-only) on each candidate grid for a
given input/output length and keeps the fastest that fits. Prefill time depends only
on the prefill grid and decode time only on the decode grid, so each is tuned alone.
"""

from __future__ import annotations

from waferllm.errors import PlacementError, WaferLLMError


def candidate_grids(wafer, lo: int = 8, hi: int | None = None, count: int = 12) -> list[int]:
    hi = min(hi or min(wafer.rows, wafer.cols), min(wafer.rows, wafer.cols))
    if hi <= lo:
        return [hi]
    step = max(1, (hi - lo) // (count - 1))
    grids = sorted(set(list(range(lo, hi + 1, step)) + [hi]))
    return grids


def tune_grids(config, wafer, input_len: int, output_len: int, max_seq_len: int | None = None, dtype: str = "fp16",
               max_grid: int | None = None, prefill_grid: int | None = None, decode_grid: int | None = None,
               candidates: list[int] | None = None, layers: int | None = None) -> dict:
    """Fastest (prefill_grid, decode_grid) by predicted TTFT and TPOT; fixed ones are kept."""
    from waferllm.engine.predict import predict_phase

    max_seq_len = max_seq_len or input_len + output_len
    grids = candidates or candidate_grids(wafer, hi=max_grid)
    tried: dict[str, dict[int, float | str]] = {"prefill": {}, "decode": {}}
    best = {"prefill": prefill_grid, "decode": decode_grid}
    for phase in ("prefill", "decode"):
        if best[phase] is not None:
            continue
        scores = {}
        for g in grids:
            try:
                scores[g] = predict_phase(config, wafer, phase, g, input_len, output_len, max_seq_len, dtype, layers)
                tried[phase][g] = scores[g]
            except WaferLLMError as exc:
                tried[phase][g] = f"does not fit: {exc}"
        if not scores:
            largest = max(grids)
            raise PlacementError(
                f"{config.name} does not fit {wafer.name} for {phase} on any grid tried ({min(grids)}..{largest}). "
                f"The largest, {largest}x{largest}: {str(tried[phase][largest]).removeprefix('does not fit: ')}"
            )
        best[phase] = min(scores, key=scores.get)
    return {"prefill_grid": best["prefill"], "decode_grid": best["decode"], "tried": tried}
