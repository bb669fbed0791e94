"""Simulation speed: host seconds per generated token on the simulated wafer vs the dense reference.

    .venv/bin/python benchmarks/simulation_speed.py [--decode-grids 24,32,48] [--prefill-grid 32]
        [--max-tokens 16] [--markdown benchmarks/RESULTS-simulation-speed.md]

1. The embedded SmolLM2 (``waferllm.models.loader.load_model()``) generates ``--max-tokens``
   tokens greedily (``SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)``) on the
   simulated WSE-2 (numeric mode: every PE's tiles are real numpy data, fp16) with
   ``LLM(prefill_grid=32, decode_grid=24/32/48)``. Host figures come from
   ``out.metrics["host"]``: placement wall, prefill wall, decode wall / (generated - 1).
2. The same prompt through ``waferllm.models.reference.ReferenceModel`` (dense numpy, fp32):
   prefill wall and the mean wall of one decode step. Ratio = wafer / reference.
3. Dry-run ``predict`` wall: llama3-8b extrapolated from 1 layer, smollm2-135m fully placed.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import Out, code_version  # noqa: E402

PROMPT = ("The wafer-scale engine is a single silicon wafer holding hundreds of thousands of cores, "
          "each with its own small memory, connected by a two-dimensional mesh. Large language models")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prefill-grid", type=int, default=32)
    ap.add_argument("--decode-grids", default="24,32,48")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--markdown", default=None, help="also write the output to this file")
    ap.add_argument("--threads", type=int, default=1,
                    help="BLAS threads, set before numpy loads (1: steadiest on a small, shared machine; 0: default)")
    args = ap.parse_args()
    if args.threads:
        for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(args.threads)
    import numpy as np

    from waferllm import LLM, SamplingParams
    from waferllm.engine.predict import predict
    from waferllm.hardware import get_wafer
    from waferllm.models.loader import load_model
    from waferllm.models.presets import get_model_preset
    from waferllm.models.reference import ReferenceModel

    out = Out()
    t_all = time.perf_counter()
    rev = code_version()
    out("# Simulation speed")
    out()
    out("Command: `.venv/bin/python benchmarks/simulation_speed.py " + " ".join(sys.argv[1:]) + "`")
    out()
    out(f"Host: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"numpy {np.__version__}, BLAS threads {args.threads or 'default'}, load average at start "
        f"{os.getloadavg()[0]:.2f} (other work shares this host). Code: {rev}.")
    out()

    t0 = time.perf_counter()
    model = load_model()
    load_s = time.perf_counter() - t0
    c = model.config
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    ids = model.tokenizer.encode(PROMPT, add_special_tokens=True)
    out(f"Model: {c.name} ({c.param_count() / 1e6:.1f}M parameters, {c.num_layers} layers, hidden {c.hidden_size}), "
        f"loaded in {load_s:.2f} s. Prompt: {len(ids)} tokens; {args.max_tokens} tokens generated greedily "
        f"(ignore_eos).")
    out()

    # ---------------------------------------------------------------- reference
    rm = ReferenceModel(model.weights)
    ref_prefill, ref_step, ref_tokens = float("inf"), float("inf"), None
    for _ in range(3):
        rm.reset()
        t = time.perf_counter()
        logits = rm.prefill(ids)
        ref_prefill = min(ref_prefill, time.perf_counter() - t)
        toks = [int(np.argmax(logits[-1]))]
        t = time.perf_counter()
        for _ in range(args.max_tokens - 1):
            toks.append(int(np.argmax(rm.decode(toks[-1]))))
        ref_step = min(ref_step, (time.perf_counter() - t) / max(1, args.max_tokens - 1))
        ref_tokens = toks

    # ---------------------------------------------------------------- wafer (numeric)
    rows = []
    for dg in [int(x) for x in args.decode_grids.split(",")]:
        t = time.perf_counter()
        try:
            llm = LLM(model, wafer="wse2", prefill_grid=args.prefill_grid, decode_grid=dg, dtype="fp16")
        except Exception as e:  # noqa: BLE001 - report and go on
            rows.append([f"{args.prefill_grid}/{dg}", f"{type(e).__name__}: {str(e)[:140]}"] + [""] * 9)
            continue
        init_s = time.perf_counter() - t
        o = llm.generate_ids(ids, params)
        h = o.metrics["host"]
        n_gen = h["generated_tokens"]
        per_tok = h["decode_time_s"] / max(1, n_gen - 1)
        match = sum(a == b for a, b in zip(o.token_ids, ref_tokens))
        rows.append([f"{args.prefill_grid}/{dg}",
                     f"{init_s:.2f} ({h['placement_wall_s']:.2f})",
                     f"{h['prefill_time_s']:.3f}",
                     f"{h['prefill_time_s'] / ref_prefill:.0f}x",
                     f"{per_tok:.3f}",
                     f"{per_tok / ref_step:.0f}x",
                     f"{h['wall_s']:.2f}",
                     f"{o.metrics['ttft_s'] * 1e6:.1f}",
                     f"{o.metrics['tpot_s'] * 1e6:.1f}",
                     f"{per_tok / o.metrics['tpot_s']:.2e}",
                     f"{match}/{len(ref_tokens)}"])
    out("## 1. Numeric simulation (SmolLM2 on simulated WSE-2 regions, fp16) vs dense reference (numpy fp32)")
    out()
    out(f"Reference: prefill {ref_prefill * 1e3:.1f} ms for {len(ids)} tokens, decode {ref_step * 1e3:.2f} ms/token "
        f"(best of 3).")
    out()
    out.table(["grids pre/dec", "LLM() s (placement)", "host prefill s", "vs ref prefill", "host s / token",
               "vs ref decode step", "host total s", "predicted TTFT us", "predicted TPOT us",
               "host s per wafer s (decode)", "greedy tokens = ref"], rows)

    # ---------------------------------------------------------------- dry-run predict
    wafer = get_wafer("wse2")
    drows = []
    for name, li, lo, pg, dg, layers in (("llama3-8b", 2048, 128, 600, 420, 1), ("llama3-8b", 4096, 4096, 600, 420, 1),
                                         ("smollm2-135m", 2048, 128, 120, 90, None),
                                         ("smollm2-135m", 512, 512, 120, 120, None)):
        t = time.perf_counter()
        m = predict(get_model_preset(name), wafer, li, lo, pg, dg, layers=layers)
        wall = time.perf_counter() - t
        drows.append([name, "layers=1 (extrapolated)" if layers else "full", f"{li}/{lo}", f"{pg}/{dg}",
                      f"{wall:.2f}", f"{m['ttft_s'] * 1e3:.3g}", f"{m['tpot_s'] * 1e6:.3g}",
                      f"{m['decode_tokens_per_s']:.0f}"])
    out("## 2. Dry-run predict (shapes only, identical layers replayed from the ledger)")
    out()
    out.table(["model", "placement", "in/out", "grids pre/dec", "host s", "predicted TTFT ms", "predicted TPOT us",
               "decode TPR"], drows)
    out(f"Load average at end: {os.getloadavg()[0]:.2f}. Total benchmark wall time: {time.perf_counter() - t_all:.0f} s.")
    if args.markdown:
        Path(args.markdown).write_text("\n".join(out.lines) + "\n")


if __name__ == "__main__":
    main()
