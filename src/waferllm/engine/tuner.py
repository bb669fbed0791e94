"""The offline grid tuner: pick prefill and decode grid sizes by predicted time.

As the paper's tuner does, it runs the model (shape-only) on each candidate grid for a
given input/output length and keeps the fastest that fits. Prefill time depends only
on the prefill grid and decode time only on the decode grid, so each is tuned alone.
"""

from __future__ import annotations

from waferllm.engine.run_config import RunConfig
from waferllm.errors import PlacementError, WaferLLMError


def candidate_grids(wafer, lo: int = 8, hi: int | None = None, count: int = 12) -> list[int]:
    hi = min(hi or min(wafer.rows, wafer.cols), min(wafer.rows, wafer.cols))
    if hi <= lo:
        return [hi]
    step = max(1, (hi - lo) // (count - 1))
    grids = sorted(set(list(range(lo, hi + 1, step)) + [hi]))
    return grids


def tune_grids(config, wafer, run: RunConfig, input_len: int, output_len: int, max_grid: int | None = None,
               candidates: list[int] | None = None) -> dict:
    """Fastest prefill and decode grids for ``run`` by predicted TTFT and TPOT; a grid
    ``run`` fixes is kept. Returns ``run`` with both grids set (``"run"``), the grids, and
    every candidate's predicted seconds or why it does not fit (``"tried"``)."""
    from waferllm.engine.predict import predict_phase

    grids = candidates or candidate_grids(wafer, hi=max_grid)
    tried: dict[str, dict[int, float | str]] = {"prefill": {}, "decode": {}}
    best = {"prefill": run.prefill_grid, "decode": run.decode_grid}
    for phase in ("prefill", "decode"):
        if best[phase] is not None:
            continue
        scores = {}
        for g in grids:
            trial = run.with_grids(g, None) if phase == "prefill" else run.with_grids(None, g)
            try:
                scores[g] = predict_phase(config, wafer, trial, phase, input_len, output_len)
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
    return {"prefill_grid": best["prefill"], "decode_grid": best["decode"], "tried": tried,
            "run": run.with_grids(best["prefill"], best["decode"])}
