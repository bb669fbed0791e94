"""Calibrate the wafer presets' free constants to SPEC section 5 (and only to it).

    .venv/bin/python benchmarks/calibrate.py                      # fit, print every target and residual
    .venv/bin/python benchmarks/calibrate.py --write              # ... and store the fit in the presets
    .venv/bin/python benchmarks/calibrate.py --check              # only evaluate the presets as they are
    .venv/bin/python benchmarks/calibrate.py --write --output benchmarks/RESULTS-calibration.txt

The same as `waferllm calibrate [--write]` followed by `waferllm validate`.
"""

from __future__ import annotations

import argparse
import io
import time
from contextlib import redirect_stdout

from waferllm.calibration.fit import calibrate
from waferllm.calibration.validate import SYSTEMS, summary, validation_rows
from waferllm.hardware import get_wafer
from waferllm.hardware.measurements import format_value


def show(rows_by_system, sums) -> None:
    for system, rows in rows_by_system.items():
        if system in sums:
            head = f"\n{system}: loss {sums[system]['loss']:.4f} (recorded at the fit: {sums[system]['recorded_loss']})"
        elif system == "gpu-roofline":
            head = "\nGPU measurements (SGLang, A100) against the ideal roofline (not fitted: the roofline's gap)"
        else:
            head = "\nGPU measurements (SGLang, A100) against the calibrated GPU model (fitted to them)"
        print(head)
        print(f"{'measurement':<92} {'kind':<9} {'measured':>14} {'model':>16} {'error':>8} {'ok':>4}")
        for r in rows:
            m = r.measurement
            err = f"{m.error(r.value):+.1%}" if (m.absolute or m.check == "about") else "-"
            print(f"{m.quantity[:92]:<92} {m.kind:<9} {m.shown():>14} {format_value(r.value, m.unit):>16} {err:>8} "
                  f"{'yes' if r.passes else 'NO':>4}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write", action="store_true", help="store the fitted constants in the presets")
    ap.add_argument("--check", action="store_true", help="only evaluate the current presets")
    ap.add_argument("--iters", type=int, default=60)
    ap.add_argument("--output", help="also write everything printed to this file")
    args = ap.parse_args()
    buf = io.StringIO()

    class Tee(io.TextIOBase):
        def write(self, s):
            buf.write(s)
            return __import__("sys").__stdout__.write(s)

    with redirect_stdout(Tee()):
        if not args.check:
            t0 = time.time()
            calibrate(iters=args.iters, write=args.write)
            print(f"fit took {time.time() - t0:.0f} s")
        wafers = {n: get_wafer(n) for n in SYSTEMS}
        rows = validation_rows(wafers)
        show(rows, summary(wafers, rows))
    if args.output:
        with open(args.output, "w") as f:
            f.write(buf.getvalue())


if __name__ == "__main__":
    main()
