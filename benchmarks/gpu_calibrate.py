"""Fit the calibrated GPU model's efficiency factors to measured serving runs, and print every target.

    .venv/bin/python benchmarks/gpu_calibrate.py                    # fit A100 to SPEC section 5 (SGLang), print the table
    .venv/bin/python benchmarks/gpu_calibrate.py --write            # ... and store it in hardware/gpus/fits/a100.toml
    .venv/bin/python benchmarks/gpu_calibrate.py --check            # only evaluate the stored fit against the data
    .venv/bin/python benchmarks/gpu_calibrate.py --gpu h100 --measurements gpu_measured.toml --write
                                                                    # refit from benchmarks/gpu_measure.py's output

Only absolute measurements of the chosen GPU are used: by default the SGLang A100 runs of
SPEC section 5 (waferllm/hardware/measurements.toml, system = "gpu"). Exits non-zero
when a measurement is reproduced worse than its tolerance.
"""

from __future__ import annotations

import argparse
import sys

from waferllm.hardware.measurements import load_measurements
from waferllm.errors import WaferLLMError
from waferllm.baselines.gpu_calibrated import (
    DEFAULT_GPU, calibrate_gpu, load_fit, measurement_request, measurement_value,
)


def check(gpu: str, measurements) -> bool:
    """Print the stored fit beside the roofline for every measurement of ``gpu``; True if all are within tolerance."""
    fit = load_fit(gpu)
    ok = True
    print(f"stored fit for {gpu}: {fit.fitted_to}")
    print(f"{'measurement':<86} {'measured':>10} {'roofline':>10} {'calibrated':>10} {'error':>8} {'ok':>4}")
    for m in load_measurements(measurements, system="gpu"):
        if not m.absolute or measurement_request(m).gpu != fit.gpu:
            continue
        roof, cal = measurement_value(m, "roofline"), measurement_value(m, "calibrated", fit)
        within = m.passes(cal)
        ok &= within
        print(f"{m.quantity[:86]:<86} {m.value:>10,.5g} {roof:>10,.5g} {cal:>10,.5g} {m.error(cal):>+8.1%} "
              f"{'yes' if within else 'NO':>4}")
    return ok


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu", default=DEFAULT_GPU, help="GPU preset whose measurements to fit (default a100)")
    ap.add_argument("--measurements", help="measurement TOML file (default: the project's SPEC section 5 data)")
    ap.add_argument("--write", action="store_true", help="store the fit in hardware/gpus/fits/<gpu>.toml")
    ap.add_argument("--check", action="store_true", help="only evaluate the stored fit")
    args = ap.parse_args(argv)
    try:
        if args.check:
            return 0 if check(args.gpu, args.measurements) else 1
        fit = calibrate_gpu(args.gpu, args.measurements, write=args.write)
    except WaferLLMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    tolerances = {m.id: m.tolerance for m in load_measurements(args.measurements, system="gpu")}
    bad = [r["id"] for r in fit.residuals if abs(r["error"]) > (tolerances.get(r["id"]) or 0.15)]
    if bad:
        print(f"outside tolerance: {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
