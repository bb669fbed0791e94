"""Beyond the paper: each algorithmic change alone and all together, on the same modelled wse2.

    .venv/bin/python benchmarks/beyond_paper.py [--markdown benchmarks/RESULTS-beyond-paper.md]

Every point is a dry-run prediction of one request (2048 + 128 tokens, every layer placed)
with the paper's design as modelled (``RunConfig`` defaults) and with each switch of
``waferllm.engine.run_config.ALGORITHMS`` turned on alone, then all of them:

- ``prefill_attention=streaming``: flash-style prefill attention (running max and sum, key
  blocks in flight), so score tiles of one key block fit and several heads run per pass;
- ``decode_collectives=fused``: RMSNorm statistics ride the following GEMV's reduce, and
  attention's softmax statistics ride its P V reduce (6 collectives per layer instead of 10);
- ``gemv_ktree=tuned``: K and the group of every K-tree chosen by the cost model per payload;
- ``gemv_overlap=segmented``: every layer GEMV's local product runs in chunks of output columns
  whose reduce segments stream through one tree, chunk c+1's product overlapping segment c's
  reduce; the segment count per GEMV and grid chosen by the cost model.

A further gain, requests pipelined over the idle decode regions, is a serving matter: see
``benchmarks/batching.py``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from waferllm.engine.predict import predict_run
from waferllm.engine.run_config import ALGORITHMS, RunConfig
from waferllm.models.presets import get_model_preset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import Out  # noqa: E402

# (model, prefill grid, decode grid, weights): llama2-13b fits one wse2 at 2048 tokens only with int4 weights
MODELS = (("llama3-8b", 600, 360, "fp16"), ("llama2-13b", 600, 360, "int4"))


def variants() -> list[tuple[str, dict]]:
    alone = [(f"{k}={v[1]}", {k: v[1]}) for k, v in ALGORITHMS.items()]
    return [("paper (as modelled)", {})] + alone + [("all combined", {k: v[1] for k, v in ALGORITHMS.items()})]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--markdown", default=None)
    args = ap.parse_args()
    out = Out()
    t0 = time.perf_counter()
    out.header("Beyond the paper", "beyond_paper.py")
    out("wse2, 2048 + 128 tokens, fp16 activations and KV, dry run, every layer placed; llama3-8b fp16 weights, "
        "llama2-13b int4 weights (in fp16 it needs two wafers). Gain: against the paper's design as modelled.")
    out()
    rows = []
    for name, pg, dg, weights in MODELS:
        cfg = get_model_preset(name)
        base = None
        for label, switches in variants():
            run = RunConfig.for_request(2048, 128, prefill_grid=pg, decode_grid=dg, weights=weights, **switches)
            r = predict_run(cfg, "wse2", run, 2048, 128, False, False, False)
            base = base or r

            def gain(key, lower_is_better=False):
                x, b = r[key], base[key]
                return f"{(b / x if lower_is_better else x / b):.2f}x"

            rows.append([name, label, f"{r['ttft_s'] * 1e3:.1f} ({gain('ttft_s', True)})",
                         f"{r['decode_tokens_per_s']:,.0f} ({gain('decode_tokens_per_s')})",
                         f"{r['e2e_tokens_per_s']:,.0f} ({gain('e2e_tokens_per_s')})"])
            print(f"  {name} {label}: TTFT {r['ttft_s'] * 1e3:.1f} ms, decode {r['decode_tokens_per_s']:.0f}", flush=True)
    out.table(["model", "design", "TTFT ms", "decode TPR", "e2e TPR"], rows)
    out(f"Host time: {time.perf_counter() - t0:.0f} s.")
    out.save(args.markdown)


if __name__ == "__main__":
    main()
