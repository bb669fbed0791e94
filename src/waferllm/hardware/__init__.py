"""Hardware descriptions: wafers (PLMR constants with provenance), GPU presets and the GPU
roofline baseline of LLM inference (:mod:`waferllm.hardware.gpu_roofline`)."""

from waferllm.hardware.gpu import GPUS, GPUSpec, get_gpu
from waferllm.hardware.plmr import (
    DTYPE_BYTES,
    Provenance,
    WaferSpec,
    get_wafer,
    load_wafer_file,
    parse_overrides,
    preset_names,
)

__all__ = [
    "DTYPE_BYTES", "GPUS", "GPUSpec", "Provenance", "WaferSpec", "get_gpu", "get_wafer",
    "load_wafer_file", "parse_overrides", "preset_names",
]
