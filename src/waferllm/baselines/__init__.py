"""Baselines a wafer prediction is compared with (GPU serving: roofline, calibrated, measured)."""

from waferllm.baselines.gpu import STANDARD_SETUPS, baseline_rows, gpu_baselines, measured_baseline

__all__ = ["STANDARD_SETUPS", "baseline_rows", "gpu_baselines", "measured_baseline"]
