"""Kernels written only with mesh primitives: MeshGEMM, dist-GEMM-T, MeshGEMV and baselines."""

from waferllm.kernels.gemm_baselines import allgather_gemm, cannon, summa
from waferllm.kernels.gemm_t import dist_gemm_t
from waferllm.kernels.meshgemm import meshgemm, place_b, skew_a
from waferllm.kernels.meshgemv import gemv, meshgemv
from waferllm.kernels.report import KernelReport, KernelResult

__all__ = ["KernelReport", "KernelResult", "allgather_gemm", "cannon", "dist_gemm_t", "gemv", "meshgemm",
           "meshgemv", "place_b", "skew_a", "summa"]
