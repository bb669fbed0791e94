"""Batching on the wafer: predicted throughput and per-request speed against the batch size.

    .venv/bin/python benchmarks/batching.py [--markdown benchmarks/RESULTS-batching.md] [--model llama3-8b]

Every point is a dry-run (shape-only) prediction of N identical requests arriving together,
served by the scheduler's policy (``waferllm.engine.scheduler.predict_batch``): admitted up
to ``max_num_seqs`` at a time, prefilled one after another in blocks of at most the planned
prompt length (one restore of the weights before a block, one transition after), each
block followed by one decode step of every running request. A decode step runs the batch as
micro-batches (at most one per decode region) pipelined over the regions; each micro-batch's
projections are skinny MeshGEMMs of its rows. The decode KV pool is planned for
``max_num_seqs`` whole contexts, so larger batches need more SRAM and stop fitting.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from waferllm.engine.run_config import RunConfig
from waferllm.engine.scheduler import predict_batch
from waferllm.errors import PlacementError
from waferllm.hardware import get_wafer
from waferllm.models.presets import get_model_preset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import Out  # noqa: E402

SHAPES = ((2048, 128, (1, 2, 3, 4)), (512, 128, (1, 2, 4, 8)), (128, 128, (1, 4, 8, 12)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--markdown", default=None)
    ap.add_argument("--model", default="llama3-8b")
    ap.add_argument("--prefill-grid", type=int, default=600)
    ap.add_argument("--decode-grid", type=int, default=360)
    args = ap.parse_args()
    cfg, wafer = get_model_preset(args.model), get_wafer("wse2")
    out = Out()
    t0 = time.perf_counter()
    out.header("Batching on the wafer", "batching.py")
    out(f"{args.model} on wse2, grids {args.prefill_grid}/{args.decode_grid}, fp16, dry run. N requests arrive "
        "together; max_num_seqs = N. The first row of each shape is the paper's setting (one request at a time). "
        "Decode step: one token for the whole batch in flight; per-request TPR = 1 / step, aggregate = N / step. "
        "TPOT: a request's first token to its last, so it includes waiting for the other requests' prefills. "
        "Output tok/s: all output tokens over the time to finish them all.")
    out()
    rows = []
    for inp, outp, batches in SHAPES:
        base = None
        for n in batches:
            run = RunConfig.for_request(inp, outp, prefill_grid=args.prefill_grid, decode_grid=args.decode_grid,
                                        max_num_seqs=n)
            try:
                r = predict_batch(cfg, wafer, run, inp, outp, n)
            except PlacementError as exc:
                rows.append([f"{inp}+{outp}", n, "does not fit: " + str(exc).split(":")[0], "", "", "", "", "", "", ""])
                continue
            base = base or r
            rows.append([f"{inp}+{outp}", n, r["decode_regions"], r["micro_batches"],
                         f"{r['decode_step_s'] * 1e6:,.0f}", f"{r['decode_tokens_per_s_per_request']:,.0f}",
                         f"{r['decode_tokens_per_s']:,.0f} ({r['decode_tokens_per_s'] / base['decode_tokens_per_s']:.2f}x)",
                         f"{r['ttft_s_mean'] * 1e3:.1f} / {r['ttft_s_max'] * 1e3:.1f}",
                         f"{r['tpot_s_mean'] * 1e6:,.0f}", f"{r['output_tokens_per_s']:,.0f}"])
            print(f"  {inp}+{outp} N={n}: {r['decode_tokens_per_s']:.0f} tok/s", flush=True)
    out.table(["request", "N", "decode regions", "micro-batches", "decode step us", "per-request TPR",
               "aggregate decode tok/s", "TTFT ms mean / max", "TPOT us", "output tok/s"], rows)
    out(f"Host time: {time.perf_counter() - t0:.0f} s.")
    out.save(args.markdown)


if __name__ == "__main__":
    main()
