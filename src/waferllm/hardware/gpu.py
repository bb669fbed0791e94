"""GPU presets for the roofline baseline (what a GPU would need for the same work)."""

from __future__ import annotations

from dataclasses import dataclass

from waferllm.errors import HardwareError


@dataclass(frozen=True)
class GPUSpec:
    name: str
    peak_flops_fp16: float  # dense fp16/bf16 tensor-core FLOP/s
    hbm_bytes_per_s: float
    hbm_capacity_bytes: float
    power_w: float
    interconnect_bytes_per_s: float  # NVLink per GPU, one direction, for tensor parallelism
    source: str

    def roofline_seconds(self, flops: float, bytes_moved: float, count: int = 1) -> float:
        """Time of one op on ``count`` GPUs splitting flops and bytes evenly (no overlap loss)."""
        return max(flops / (self.peak_flops_fp16 * count), bytes_moved / (self.hbm_bytes_per_s * count))


GPUS: dict[str, GPUSpec] = {
    "a100": GPUSpec("A100-80GB", 312e12, 2.04e12, 80e9, 400.0, 300e9,
                    "SPEC section 1 (vendor datasheet): 312 TFLOP/s fp16 dense, 2.04 TB/s, 400 W; NVLink3 600 GB/s bidirectional"),
    "h100": GPUSpec("H100-SXM", 989e12, 3.35e12, 80e9, 700.0, 450e9,
                    "SPEC section 1 (vendor datasheet): 989 TFLOP/s bf16 dense, 3.35 TB/s, 700 W; NVLink4 900 GB/s bidirectional"),
    "h200": GPUSpec("H200", 989e12, 4.8e12, 141e9, 700.0, 450e9,
                    "SPEC section 1 (vendor datasheet): 989 TFLOP/s, 4.8 TB/s, 141 GB, 700 W"),
}


def get_gpu(name: str) -> GPUSpec:
    key = name.lower().replace("-80gb", "").replace("-sxm", "").replace(" ", "")
    if key not in GPUS:
        raise HardwareError(f"unknown GPU {name!r}; known: {', '.join(GPUS)}")
    return GPUS[key]
