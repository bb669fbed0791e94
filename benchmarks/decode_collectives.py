"""Decode collectives: one decoder layer as the paper runs it, and with fewer collectives and K per reduction.

    .venv/bin/python benchmarks/decode_collectives.py [--wafer wse2] [--grid 360] [--context 4096]
        [--markdown benchmarks/RESULTS-decode-collectives.md]

One decode layer of LLaMA3-8B (GQA) and LLaMA2-13B (MHA), batch 1, fp16 weights, on a
grid x grid decode region, shapes only (dry run: the cycles are the same as a numeric
run's). The layer's program follows ``engine.decode.DecodeStage.layer`` (the KV cache's
append, the same for every variant, is left out). Four variants:

- paper: every reduction its own K-tree allreduce (K=2): RMSNorm statistics, QKV, scores,
  softmax max and sum, p V, O, RMSNorm, gate/up, down (10 collectives);
- paper + tuned K: the same collectives, each with the K and group ``comm.best_ktree``
  picks for its axis and payload;
- fused: RMSNorm fused into the next GEMV (``kernels.norm_gemv``) and softmax + p V merged
  by one allreduce of [max | sum | output] (``decode_attention(fused=True)``): 6 collectives;
- fused + tuned K: both.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

from waferllm.engine.layouts import HeadLayout
from waferllm.hardware import get_wafer
from waferllm.kernels.decode_attention import decode_attention
from waferllm.kernels.layer_ops import rmsnorm, rope, silu_mul, split_fused
from waferllm.kernels.meshgemv import gemv
from waferllm.kernels.norm_gemv import norm_gemv
from waferllm.mesh import Mesh, comm, compute
from waferllm.models.presets import get_model_preset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import Out  # noqa: E402

MODELS = ("llama3-8b", "llama2-13b")
VARIANTS = {"paper": (False, 2), "paper + tuned K": (False, "tuned"), "fused": (True, 2),
            "fused + tuned K": (True, "tuned")}
STEPS = ("attn_norm + qkv", "rope", "attention", "o_gemv", "residual", "ffn_norm + gate_up", "silu_mul", "down_gemv",
         "residual 2")


class Layer:
    """One decode layer's tensors on a dry grid x grid region, in the decode placement."""

    def __init__(self, wafer, config, grid: int, context: int):
        self.mesh = m = Mesh.square(wafer, grid, mode="dry")
        self.c = c = config
        self.hl = hl = HeadLayout(c.num_heads, c.num_kv_heads, c.head_dim, grid)
        E, r, F = c.hidden_size, hl.group, hl.col_features
        self.ffn = -(-c.intermediate_size // grid)
        self.w = {
            "qkv": m.place((E, grid * (r + 2) * F), ("y", "x"), "fp16", name="qkv"),
            "o": m.place((hl.q_padded, E), ("x", "y"), "fp16", name="o"),
            "gate_up": m.place((E, 2 * self.ffn * grid), ("y", "x"), "fp16", name="gate_up"),
            "down": m.place((self.ffn * grid, E), ("x", "y"), "fp16", name="down"),
            "attn_norm": m.place((E,), ("y",), "fp32", name="attn_norm"),
            "ffn_norm": m.place((E,), ("y",), "fp32", name="ffn_norm"),
        }
        slots = -(-context // grid)  # the shift-based cache's balanced rows
        self.k_t = m.place((hl.kv_padded, grid * slots), ("x", "y"), "fp16", name="k_cache_t")
        self.v = m.place((grid * slots, hl.kv_padded), ("y", "x"), "fp16", name="v_cache")

    def gemv(self, x, w, k, name):
        """A GEMV with the K-tree ``k`` (``"tuned"``: chosen for its output tile, the payload)."""
        kk, g = comm.ktree_for(self.mesh, w.layout[0], 4 * w.tile_shape[1], k)
        return gemv(x, w, k=kk, group=g, out_dtype="fp32", name=name).out

    def norm_then_gemv(self, h, norm, w, fused, k, name):
        if fused:
            return norm_gemv(h, norm, w, self.c.rms_norm_eps, k=k, name=name).out
        kk, g = comm.ktree_for(self.mesh, "y", 4, k)  # the sum of squares: one fp32 word
        x = rmsnorm(h, norm, 0, self.c.rms_norm_eps, "fp32", k=kk, group=g, name=name)
        out = self.gemv(x, w, k, name)
        self.mesh.sram.release(x)
        return out

    def run(self, fused: bool, k) -> tuple[dict, int, float]:
        """The layer once: cycles per step, collectives issued, total cycles."""
        m, hl, w, c = self.mesh, self.hl, self.w, self.c
        led = m.ledger
        r, F = hl.group, hl.col_features
        steps, start = {}, led.cycles
        first_event = len(led.events)

        def step(label, fn):
            t0 = led.cycles
            out = fn()
            steps[label] = steps.get(label, 0.0) + led.cycles - t0
            return out

        h = m.place((c.hidden_size,), ("y",), "fp32", name="h")
        qkv = step(STEPS[0], lambda: self.norm_then_gemv(h, w["attn_norm"], w["qkv"], fused, k, "qkv"))
        q, kk, _ = split_fused(qkv, [((hl.q_padded,), r * F), ((hl.kv_padded,), F), ((hl.kv_padded,), F)])
        q = step(STEPS[1], lambda: rope(q, None, None, "rope_q"))
        step(STEPS[1], lambda: rope(kk, None, None, "rope_k"))
        o = step(STEPS[2], lambda: decode_attention(q, self.k_t, self.v, None, hl.head_of_pos, c.num_kv_heads,
                                                    1 / math.sqrt(c.head_dim), k=k, fused=fused))
        attn = step(STEPS[3], lambda: self.gemv(o, w["o"], k, "o"))
        h = step(STEPS[4], lambda: compute.elementwise(lambda a, b: a + b, h, attn, name="residual", dtype="fp32"))
        gu = step(STEPS[5], lambda: self.norm_then_gemv(h, w["ffn_norm"], w["gate_up"], fused, k, "gate_up"))
        g, u = split_fused(gu, [((self.ffn * m.cols,), self.ffn)] * 2)
        act = step(STEPS[6], lambda: silu_mul(g, u, "fp32"))
        down = step(STEPS[7], lambda: self.gemv(act, w["down"], k, "down"))
        step(STEPS[8], lambda: compute.elementwise(lambda a, b: a + b, h, down, name="residual", dtype="fp32"))
        collectives = sum(1 for e in led.events[first_event:] if e.kind == "comm")
        return steps, collectives, led.cycles - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wafer", default="wse2")
    ap.add_argument("--grid", type=int, default=360, help="side of the square decode region")
    ap.add_argument("--context", type=int, default=4096, help="tokens the KV cache holds (sets the slots per row)")
    ap.add_argument("--markdown", default=None, help="also write the output to this file")
    args = ap.parse_args()
    wafer = get_wafer(args.wafer)
    out = Out()
    out.header("Decode collectives: the paper's layer vs fused collectives and K per reduction",
               "decode_collectives.py")
    out(f"Wafer: {wafer.name} (beta={wafer.beta_cycles:g}, collective overhead="
        f"{wafer.collective_overhead_cycles:g}, task switch={wafer.task_switch_cycles:g}, op overhead="
        f"{wafer.op_overhead_cycles:g} cycles, ops_exp={wafer.ops_exp:g}). Decode grid {args.grid}x{args.grid}, "
        f"KV cache of {args.context} tokens, batch 1, fp16 weights, dry run; the KV append is left out "
        "(the same in every variant).")
    out()
    t0 = time.perf_counter()
    for name in MODELS:
        config = get_model_preset(name)
        results = {v: Layer(wafer, config, args.grid, args.context).run(*spec) for v, spec in VARIANTS.items()}
        out(f"## {name} (hidden {config.hidden_size}, {config.num_heads} heads / {config.num_kv_heads} kv heads, "
            f"FFN {config.intermediate_size})")
        out()
        rows = [[s] + [f"{results[v][0].get(s, 0.0):,.0f}" for v in VARIANTS] for s in STEPS]
        rows.append(["**layer**"] + [f"**{results[v][2]:,.0f}**" for v in VARIANTS])
        rows.append(["collectives"] + [str(results[v][1]) for v in VARIANTS])
        base = results["paper"][2]
        rows.append(["vs paper"] + [f"{base / results[v][2]:.3f}x" for v in VARIANTS])
        out.table(["cycles per step"] + list(VARIANTS), rows)
        us = {v: wafer.cycles_to_seconds(results[v][2]) * 1e6 for v in VARIANTS}
        out(f"Per layer: paper {us['paper']:.2f} us, fused + tuned K {us['fused + tuned K']:.2f} us; "
            f"x{config.num_layers} layers: {us['paper'] * config.num_layers:.0f} us vs "
            f"{us['fused + tuned K'] * config.num_layers:.0f} us per token (layers only).")
        out()
    out(_choices(wafer, args.grid))
    out()
    out(f"Wall time: {time.perf_counter() - t0:.1f} s.")
    out.save(args.markdown)


def _choices(wafer, grid: int) -> str:
    """The K-trees ``best_ktree`` picks along a decode line, by payload, against K=2."""
    mesh = Mesh.square(wafer, grid, mode="dry")
    lines = [f"K-tree chosen per payload along a line of {grid} PEs (allreduce; the paper: K=2, group "
             f"{_group(grid)}):", ""]
    rows = []
    for nbytes in (4, 16, 64, 96, 256, 1024, 4096, 16384):
        k, g = comm.best_ktree(mesh, "y", nbytes)
        rows.append([nbytes, f"K={k}, group {g}", f"{_cycles(mesh, nbytes, k, g):,.0f}",
                     f"{_cycles(mesh, nbytes, 2, None):,.0f}"])
    head = "| payload bytes/PE | chosen | cycles | K=2 cycles |\n|---|---|---|---|\n"
    return "\n".join(lines) + "\n" + head + "\n".join("| " + " | ".join(str(c) for c in r) + " |" for r in rows)


def _group(grid: int) -> int:
    phases, _ = comm.reduce_schedule(grid, "ktree", 2)
    return phases[1].spacing if len(phases) > 2 else grid


def _cycles(mesh, nbytes: int, k: int, g) -> float:
    """Cycles of one allreduce of ``nbytes`` per PE along y, as the ledger charges it."""
    t = mesh.place((mesh.cols * nbytes // 4,), ("x",), "fp32", name="payload")
    before = mesh.ledger.cycles
    mesh.sram.release(comm.allreduce(t, "y", "sum", k=k, group=g))
    mesh.sram.release(t)
    return mesh.ledger.cycles - before


if __name__ == "__main__":
    main()
