"""Prefill and decode speed of the dense numpy reference forward (embedded SmolLM2-135M by default).

    .venv/bin/python benchmarks/reference_forward.py [--model PATH] [--lengths 16,64,256] [--decode 32] [--repeats 3] [--threads N]

Prefill: tokens/s for one prompt of each length from an empty cache. Decode: tokens/s for
single-token steps after a 64-token prompt (context grows during the run). Best of --repeats.
"""

from __future__ import annotations

import argparse
import os
import platform
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--lengths", default="16,64,256")
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None,
                    help="BLAS threads (set before numpy loads; 1 is fastest on a small, busy machine)")
    args = ap.parse_args()
    if args.threads:
        for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(args.threads)
    import numpy as np

    from waferllm.models.loader import load_model
    from waferllm.models.reference import ReferenceModel

    t0 = time.perf_counter()
    model = load_model(args.model)
    rm = ReferenceModel(model.weights)  # materialises (dequantises) every layer
    load_s = time.perf_counter() - t0
    c = model.config
    rng = np.random.default_rng(0)
    rows = []
    for T in [int(x) for x in args.lengths.split(",")]:
        ids = rng.integers(0, c.vocab_size, size=T)
        best = float("inf")
        for _ in range(args.repeats):
            rm.reset()
            t = time.perf_counter()
            rm.prefill(ids)
            best = min(best, time.perf_counter() - t)
        rows.append(("prefill", T, best, T / best))
    ctx = 64
    best = float("inf")
    for _ in range(args.repeats):
        rm.reset()
        rm.prefill(rng.integers(0, c.vocab_size, size=ctx))
        tok = 1
        t = time.perf_counter()
        for _ in range(args.decode):
            tok = int(np.argmax(rm.decode(tok)))
        best = min(best, time.perf_counter() - t)
    rows.append(("decode", args.decode, best, args.decode / best))

    print(f"model: {os.path.basename(model.path)} ({c.param_count() / 1e6:.1f}M params, {c.num_layers} layers, fp32)")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, numpy {np.__version__}, "
          f"BLAS threads {os.environ.get('OPENBLAS_NUM_THREADS', 'default')}; "
          f"load + dequantise {load_s:.1f} s")
    print(f"{'phase':<8} {'tokens':>7} {'seconds':>9} {'tokens/s':>10}")
    for phase, n, s, tps in rows:
        label = f"{n}" if phase == "prefill" else f"{n} (ctx {ctx}+)"
        print(f"{phase:<8} {label:>7} {s:>9.3f} {tps:>10.1f}")


if __name__ == "__main__":
    main()
