"""Wall-clock cost of simulating each mesh primitive, numeric and dry-run, at three region sizes.

    .venv/bin/python benchmarks/mesh_primitives.py [--sizes 64 256 720] [--repeat 3] [--markdown FILE]

Every primitive runs on 8x8 fp16 tiles (one tile per PE); the table gives the best wall
time of a few runs in each mode and the wafer cycles the primitive charges (identical
in both modes). Numeric cases whose working set would exceed ~4 GB are skipped.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from waferllm.hardware import get_wafer
from waferllm.mesh import Mesh, Region, comm, compute
from waferllm.mesh.interleave import ring_rank

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import code_version  # noqa: E402

TILE = 8
MEM_LIMIT = 4e9


def _setup(n: int, mode: str):
    wafer = get_wafer("wse2")
    mesh = Mesh(Region(wafer, n, n, name=f"{n}x{n}"), mode=mode)
    rng = np.random.default_rng(0)
    shape = (TILE * n, TILE * n)
    data = (lambda s: rng.standard_normal(s, dtype=np.float32)) if mode == "numeric" else (lambda s: s)
    a = mesh.place(data(shape), ("y", "x"), "fp16", name="A")
    b = mesh.place(data(shape), ("y", "x"), "fp16", name="B")
    v = mesh.place(data((TILE * n, TILE)), ("x", None), "fp16", name="v")  # 8x8 tile, replicated along y
    dst = Mesh(Region(wafer, n, n, name="dst"), mode=mode, ledger=mesh.ledger)
    return mesh, a, b, v, dst


PRIMITIVES = {
    "ring_shift interleave": lambda m, a, b, v, d: comm.ring_shift(a, "x", 1),
    "ring_shift skew": lambda m, a, b, v, d: comm.ring_shift(a, "x", -ring_rank(m.cols)),
    "broadcast": lambda m, a, b, v, d: comm.broadcast(a, "y", m.rows // 2),
    "allreduce ktree": lambda m, a, b, v, d: comm.allreduce(v, "y", algo="ktree", k=2),
    "allreduce pipeline": lambda m, a, b, v, d: comm.allreduce(v, "y", algo="pipeline"),
    "local matmul": lambda m, a, b, v, d: compute.local_matmul(a, b, shape=a.shape, layout=("y", "x"),
                                                               partial=("x", "sum")),
    "elementwise": lambda m, a, b, v, d: compute.elementwise(lambda x, y: x * y + 1.0, a, b),
    "relayout": lambda m, a, b, v, d: comm.relayout(a, d, ("x", "y")),
}


def _numeric_bytes(n: int) -> float:
    # A, B, their fp32 copies inside compute, a result and a temporary: ~8 fp32 arrays of n*n*64
    return 8 * n * n * TILE * TILE * 4


def run(sizes, repeat):
    rows = []
    for n in sizes:
        for prim, fn in PRIMITIVES.items():
            row = {"primitive": prim, "region": f"{n}x{n}"}
            for mode in ("numeric", "dry"):
                if mode == "numeric" and _numeric_bytes(n) > MEM_LIMIT:
                    row[mode] = None
                    continue
                mesh, a, b, v, dst = _setup(n, mode)
                best = float("inf")
                for _ in range(repeat):
                    before = mesh.ledger.cycles
                    t0 = time.perf_counter()
                    out = fn(mesh, a, b, v, dst)
                    best = min(best, time.perf_counter() - t0)
                    cycles = mesh.ledger.cycles - before
                    del out
                row[mode] = best
                row.setdefault("cycles", cycles)
                assert row["cycles"] == cycles, "dry and numeric runs charge different cycles"
                del mesh, a, b, v, dst
                gc.collect()
            rows.append(row)
    return rows


def _fmt(x):
    if x is None:
        return "skipped (>4 GB)"
    return f"{x * 1e3:.2f} ms" if x < 1 else f"{x:.2f} s"


def render(rows):
    head = ["primitive", "region", "numeric wall", "dry wall", "wafer cycles"]
    body = [[r["primitive"], r["region"], _fmt(r["numeric"]), _fmt(r["dry"]), f"{r['cycles']:,.0f}"] for r in rows]
    return head, body


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 256, 720])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--markdown", help="also write the table as Markdown to this file")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    rows = run(args.sizes, args.repeat)
    total = time.perf_counter() - t0
    head, body = render(rows)
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(*head, title=f"mesh primitives, {TILE}x{TILE} fp16 tiles, best of {args.repeat}")
        for r in body:
            table.add_row(*r)
        Console().print(table)
    except ImportError:  # pragma: no cover
        print(" | ".join(head))
        for r in body:
            print(" | ".join(r))
    print(f"total {total:.1f} s")
    if args.markdown:
        cmd = "python benchmarks/mesh_primitives.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:]))
        lines = [
            "# Mesh primitive benchmark",
            "",
            f"Command: `{cmd.strip()}` (wall {total:.0f} s in all)",
            "",
            f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
            f"numpy {np.__version__}. Code: {code_version()}. Each primitive runs once per repetition on "
            f"{TILE}x{TILE} fp16 tiles (one per PE) of a WSE-2 region; wall = best of {args.repeat}. `wafer cycles` is what the "
            "primitive charges the ledger, identical in numeric and dry-run mode.",
            "",
            "| " + " | ".join(head) + " |",
            "|" + "---|" * len(head),
            *("| " + " | ".join(r) + " |" for r in body),
            "",
        ]
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
