"""Sweep throughput: points per second of a sweep in this process and on a local Ray.

    .venv/bin/python benchmarks/sweep_speed.py [--spec docs/sweeps/relay_link.toml] [--cpus 2]
        [--batches 1,4] [--markdown benchmarks/RESULTS-sweep.md]

Runs the spec's points (default: the 35 points of docs/sweeps/relay_link.toml, LLaMA3-8B,
2048 + 128 tokens) once in this process (``--no-ray``), then on a local Ray with
``--cpus`` CPUs for each batch size (points per Ray task), each time into a fresh table.
Reports the wall time (Ray's start-up included, and without it), points per second and
the mean host time of one prediction.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import Out  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spec", default=str(ROOT / "docs" / "sweeps" / "relay_link.toml"))
    ap.add_argument("--cpus", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--batches", default="1,4", help="points per Ray task, comma-separated")
    ap.add_argument("--no-serial", action="store_true", help="skip the in-process run")
    ap.add_argument("--markdown", default=None, help="also write the output to this file")
    args = ap.parse_args()

    from waferllm.explore import load_spec, run_sweep

    spec = load_spec(args.spec)
    out = Out()
    out.header("Sweep throughput", "sweep_speed.py")
    out(f"Spec `{Path(args.spec).relative_to(ROOT) if Path(args.spec).is_relative_to(ROOT) else args.spec}`: "
        f"{len(spec.points())} points; the host is shared with other work.")
    out()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        runs = [] if args.no_serial else [("in process (--no-ray)", dict(use_ray=False))]
        runs += [(f"local Ray, {args.cpus} CPUs, {b} point(s) per task", dict(use_ray=True, num_cpus=args.cpus, batch=b))
                 for b in (int(x) for x in args.batches.split(","))]
        for i, (name, kw) in enumerate(runs):
            t0 = time.perf_counter()
            res = run_sweep(spec, Path(tmp) / f"run{i}.csv", progress=False, **kw)
            wall = time.perf_counter() - t0
            per_point = [r["point_wall_s"] for r in res.rows if r.get("point_wall_s") is not None]
            rows.append([name, res.ran, f"{wall:.1f}", f"{res.startup_s:.1f}", f"{res.points_per_s:.2f}",
                         f"{res.points_per_s_running:.2f}" if res.backend == "ray" else f"{res.points_per_s:.2f}",
                         f"{sum(per_point) / max(1, len(per_point)):.2f}", f"{res.ok}/{res.failed}"])
    out.table(["run", "points", "wall s", "Ray start s", "points/s", "points/s after start",
               "host s per prediction", "ok/failed"], rows)
    out.save(args.markdown)


if __name__ == "__main__":
    main()
