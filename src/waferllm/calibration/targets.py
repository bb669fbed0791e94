"""The model's value of every measurement, computed by the same code as every prediction.

Each evaluator takes a wafer and the measurement's ``args`` and runs kernels or an engine
layer in dry mode (shapes only). Results are cached per wafer within one
:class:`Evaluator`, since several measurements share the same runs.
"""

from __future__ import annotations

import math
from typing import Callable

from waferllm.errors import WaferLLMError
from waferllm.hardware.plmr import WaferSpec
from waferllm.kernels.gemm_baselines import cannon, summa
from waferllm.kernels.meshgemm import meshgemm, place_b
from waferllm.kernels.meshgemv import gemv
from waferllm.mesh.runtime import Mesh

GEMV_GRIDS = (120, 180, 240, 300, 360, 420, 480, 540, 600, 660, 720)

#: The WSE-3 decode layer of SPEC section 5: the public WaferLLM WSE-3 decode program.
WSE3_LAYER = dict(hidden=2160, heads=1, head_dim=2160, kv_len=2160, ffn=7200, grid=240, ktree_group=24)


class Evaluator:
    """Model values for one wafer, with the kernel runs they share computed once."""

    def __init__(self, wafer: WaferSpec):
        self.wafer = wafer
        self._cache: dict = {}

    def _memo(self, key, fn: Callable):
        if key not in self._cache:
            self._cache[key] = fn()
        return self._cache[key]

    def value(self, m) -> float:
        fn = getattr(self, m.model, None)
        if fn is None or m.model.startswith("_"):
            raise WaferLLMError(f"measurement {m.id}: unknown model evaluator {m.model!r}")
        return float(fn(**m.args))

    # ---- GEMV -------------------------------------------------------------------------
    def gemv_seconds(self, size: int, grid: int, algo: str = "meshgemv") -> float:
        def run():
            mesh = Mesh.square(self.wafer, grid, mode="dry")
            x = mesh.place((size,), ("y",), "fp16", name="x")
            w = mesh.place((size, size), ("y", "x"), "fp16", name="W")
            return gemv(x, w, algo=algo).report.seconds
        return self._memo(("gemv", size, grid, algo), run)

    def gemv_best(self, size: int, algo: str = "meshgemv") -> tuple[float, int]:
        """Fastest time over square grids (what the offline tuner picks) and its grid."""
        best = (math.inf, 0)
        for g in GEMV_GRIDS:
            if g > min(self.wafer.rows, self.wafer.cols):
                continue
            try:
                best = min(best, (self.gemv_seconds(size, g, algo), g))
            except WaferLLMError:  # does not fit on that grid
                continue
        return best

    def gemv_best_seconds(self, size: int, algo: str = "meshgemv") -> float:
        return self.gemv_best(size, algo)[0]

    def gemv_speedup_vs_gpu(self, size: int, gpu_seconds: float) -> float:
        return gpu_seconds / self.gemv_best_seconds(size)

    def gemv_speedup_vs_pipeline(self, sizes, grid: int) -> float:
        logs = [math.log(self.gemv_seconds(s, grid, "pipeline") / self.gemv_seconds(s, grid)) for s in sizes]
        return math.exp(sum(logs) / len(logs))

    def gemv_turning_ratio(self, size: int) -> float:
        return self.gemv_best(size)[1] / self.gemv_best(size, "pipeline")[1]

    # ---- GEMM -------------------------------------------------------------------------
    def gemm_cycles(self, size: int, grid: int, algo: str) -> float:
        def run():
            mesh = Mesh.square(self.wafer, grid, mode="dry")
            a = mesh.place((size, size), ("y", "x"), "fp16", name="A")
            if algo == "summa":
                return summa(a, mesh.place((size, size), ("y", "x"), "fp16", name="B")).report.cycles
            b = place_b(mesh, (size, size), "fp16", ring="interleave" if algo == "meshgemm" else "plain")
            return (meshgemm if algo == "meshgemm" else cannon)(a, b).report.cycles
        return self._memo(("gemm", size, grid, algo), run)

    def gemm_efficiency(self, size: int, grid: int, algo: str) -> float:
        peak_macs_per_cycle = self.wafer.fp16_macs_per_cycle * grid * grid
        return size ** 3 / (self.gemm_cycles(size, grid, algo) * peak_macs_per_cycle)

    def gemm_speedup(self, sizes, grids) -> float:
        """Geometric mean over sizes and grids of min(SUMMA, Cannon) time / MeshGEMM time."""
        logs = []
        for s in sizes:
            for g in grids:
                other = min(self.gemm_cycles(s, g, "summa"), self.gemm_cycles(s, g, "cannon"))
                logs.append(math.log(other / self.gemm_cycles(s, g, "meshgemm")))
        return math.exp(sum(logs) / len(logs))

    def gemm_time_ratio(self, size: int, algo: str, grid_hi: int, grid_lo: int) -> float:
        return self.gemm_cycles(size, grid_hi, algo) / self.gemm_cycles(size, grid_lo, algo)

    def gemm_cycles_saved(self, size: int, grid: int) -> float:
        return 1 - self.gemm_cycles(size, grid, "meshgemm") / self.gemm_cycles(size, grid, "cannon")

    # ---- a whole decode layer -----------------------------------------------------------
    def decode_layer(self, field: str, **shape) -> float:
        spec = {**WSE3_LAYER, **shape}
        key = ("decode_layer",) + tuple(sorted(spec.items()))
        return self._memo(key, lambda: decode_layer_profile(self.wafer, **spec))[field]

def decode_layer_profile(wafer: WaferSpec, hidden: int, heads: int, head_dim: int, kv_len: int, ffn: int, grid: int,
                         ktree_group: int) -> dict:
    """One decode layer run (dry) on a ``grid`` x ``grid`` region with ``kv_len`` cached tokens.

    Returns the layer's critical-path cycles, the cycles spent in communication, and the
    cycles outside the ops' own time (task switches and synchronisation), which is how the
    WSE-3 profile splits its layer.
    """
    from waferllm.engine.decode import DecodeStage
    from waferllm.mesh.region import Region
    from waferllm.models.config import ModelConfig

    cfg = ModelConfig(name="decode-layer", arch="llama", vocab_size=grid, hidden_size=hidden,
                      intermediate_size=ffn, num_layers=1, num_heads=heads, num_kv_heads=heads, head_dim=head_dim)
    mesh = Mesh(Region(wafer, grid, grid, name="layer"), mode="dry")
    stage = DecodeStage(mesh, cfg, range(0, 1), [None], range(0, cfg.vocab_size), None, None, None, kv_len + 1,
                        "fp16", "shift", gemv_group=ktree_group)
    stage.cache.load(kv_len)
    h = mesh.place((hidden,), ("y",), "fp32", name="h")
    led = mesh.ledger
    mark = led.mark()
    stage.step(h, kv_len)  # the layer, its KV append included
    d = led.since(mark)
    return {"cycles": d["cycles"], "comm_cycles": d["comm_cycles"], "outside_cycles": d["overhead_cycles"],
            "compute_cycles": d["compute_cycles"]}
