"""GPU cost model for LLM inference: the ideal roofline, and the same terms with efficiencies.

:func:`gpu_inference_roofline` is what an ideal GPU (or an ideal tensor-parallel group of
GPUs) would need for a request: every phase takes the larger of its compute time and its
HBM time, plus the time of its allreduces at the links' full bandwidth and latency
floors. It is a *bound* for a real serving system (SGLang/vLLM on the same GPUs), not a
prediction of one. :func:`gpu_inference` evaluates the same terms with an
:class:`Efficiency` (fractions of peak and fixed costs); the ideal one gives the
roofline, and :mod:`waferllm.baselines.gpu_calibrated` supplies one fitted to measured
serving numbers. Every efficiency is a fraction <= 1 of a peak or a cost >= 0 added to a
floor, so no efficiency can make a setup faster than its roofline.

Model of one request of ``batch`` sequences, ``input_len`` prompt tokens each, then
``output_len`` generated tokens (batch 1 and fp16 are the paper's setting):

* **Prefill** (time to first token): FLOPs of every matmul of every layer for all prompt
  tokens (``2 * matmul_params * tokens``), causal attention (``QK^T`` and ``PV``, 4 * H * D
  FLOPs per (query, key) pair, ``n(n+1)/2`` pairs per sequence and layer) and the LM head
  for the last token only. Bytes: the weights read once (the embedding table only for the
  looked-up rows), the K/V cache written, and the activations read and written around
  every matmul/elementwise op (flash attention: no ``n x n`` score matrix in HBM).
* **Decode**: one step per output token, the token at position ``p`` for
  ``p = input_len .. input_len + output_len - 1``; the step reads all weights once (shared
  by the batch), reads the K/V cache of the ``p`` earlier positions and writes its own
  (``p + 1`` entries of traffic) and does ``2 * matmul_params`` + ``4 * H * D * (p + 1)``
  FLOPs per layer per sequence + the LM head. ``tpot_s`` is the exact mean of the step
  time over those positions (closed form, see :func:`_sum_max_lines`).
* **Compute and memory**: a phase or step takes ``max(FLOPs / (GPUs x peak x flops
  efficiency), bytes / (GPUs x HBM bandwidth x HBM efficiency))``.
* **Fixed costs per forward pass** (prefill, and every decode step): ``layers x
  layer_overhead_s + step_overhead_s`` (kernel launches, synchronisation, scheduling);
  zero in the roofline.
* **Tensor parallelism** (``num_gpus > 1``): Megatron-style, every weight and the K/V
  heads split evenly; 2 allreduces per layer (after attention and after the MLP) of
  ``batch * tokens * hidden * dtype_bytes`` bytes, added (not overlapped) to the layer's
  time in both phases. One allreduce is a ring: ``2 (n-1)/n * bytes / (link efficiency x
  ring bandwidth)`` + a latency per collective. Inside one node the ring runs over NVLink
  (bandwidth per GPU, one direction) and its latency is the GPU's NVLink floor (+ the
  efficiency's extra). A group larger than a node spans ``num_gpus / gpus_per_node``
  nodes: the ring crosses nodes over InfiniBand, one NIC per GPU, so with one ring per
  NIC its bandwidth is ``min(NVLink, gpus_per_node x InfiniBand per GPU)``, and every
  collective pays the InfiniBand latency floor (+ the efficiency's extra) on top.
* **Memory**: weights (all parameters) + the K/V cache at its largest
  (``batch * (input_len + output_len)`` positions); ``fits`` compares it with
  ``num_gpus * HBM capacity``. A model that does not fit still gets its times (as if
  it did) and ``fits=False``; nothing is raised.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from waferllm.errors import HardwareError, ModelError, RequestError
from waferllm.hardware.gpu import NVLINK_ALLREDUCE_LATENCY_S, GPUSpec, get_gpu

#: The GPU set the CLI prints beside a wafer prediction: (gpu preset, number of GPUs).
STANDARD_BASELINES: tuple[tuple[str, int], ...] = (("a100", 1), ("a100", 8), ("h100", 1))

ASSUMPTIONS: tuple[str, ...] = (
    "roofline: each phase/step takes max(FLOPs / (GPUs x peak), bytes / (GPUs x HBM bandwidth)); "
    "compute and memory traffic overlap perfectly, no kernel-launch, scheduling or framework overhead",
    "dense fp16/bf16 tensor-core peak; elementwise ops (norms, RoPE, SiLU, softmax) cost no FLOPs, only their activation traffic",
    "flash-style attention: the score matrix never reaches HBM and K/V tiles are reused on chip during prefill",
    "activation traffic = inputs and outputs of every matmul and elementwise op per token and layer "
    "(14 E + 4 q_dim + 6 F values), small next to the weights in decode",
    "decode: one step per output token at positions input_len .. input_len+output_len-1, each reading all weights once "
    "and the K/V cache at its current length; the first output token is counted as a decode step too (conservative)",
    "tensor parallelism: Megatron-style, weights, K/V heads, FLOPs and bytes split evenly over the GPUs; "
    "2 ring allreduces per layer, not overlapped with compute; the vocab-parallel LM head's gather is ignored",
    "allreduce: the GPU's NVLink latency floor per collective (assumed, see the preset) and the full NVLink bandwidth; "
    "beyond one node the ring crosses InfiniBand (one NIC per GPU) at min(NVLink, GPUs per node x NIC) bandwidth "
    "and each collective adds the InfiniBand latency floor (assumed)",
    "memory = all weights + K/V cache at its longest; activation workspace, CUDA context and allocator slack are ignored",
    "energy = board power x GPUs x total time (GPUs at full power throughout)",
)


@dataclass(frozen=True)
class Efficiency:
    """How far a serving engine stays from the roofline.

    ``flops``, ``hbm`` and ``link`` are fractions (0, 1] of the tensor-core peak, the HBM
    bandwidth and the allreduce ring's link bandwidth; the others are seconds >= 0 added to
    the floors: per allreduce inside a node, per allreduce that crosses nodes (on top of
    the first), per layer of a forward pass, and per forward pass. ``Efficiency()`` is the
    roofline.
    """

    flops: float = 1.0
    hbm: float = 1.0
    link: float = 1.0
    allreduce_extra_latency_s: float = 0.0
    internode_extra_latency_s: float = 0.0
    layer_overhead_s: float = 0.0
    step_overhead_s: float = 0.0

    FRACTIONS = ("flops", "hbm", "link")

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise HardwareError(f"efficiency {f.name} must be a finite number, got {v!r}")
            if f.name in self.FRACTIONS and not (0.0 < v <= 1.0):
                raise HardwareError(f"efficiency {f.name} must be in (0, 1], got {v!r}")
            if f.name not in self.FRACTIONS and v < 0:
                raise HardwareError(f"efficiency {f.name} must be >= 0 seconds, got {v!r}")

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    def replace(self, **changes) -> "Efficiency":
        unknown = set(changes) - {f.name for f in fields(self)}
        if unknown:
            raise HardwareError(f"unknown efficiency factor(s) {', '.join(sorted(unknown))}; "
                                f"known: {', '.join(f.name for f in fields(self))}")
        return Efficiency(**{**self.to_dict(), **changes})


IDEAL = Efficiency()


# --------------------------------------------------------------------------- model shape
def _shape(config: Any) -> dict[str, int | bool]:
    """The shape figures the roofline needs, read from any ModelConfig-like object."""
    try:
        E = int(config.hidden_size)
        F = int(config.intermediate_size)
        L = int(config.num_layers)
        H = int(config.num_heads)
        Hkv = int(getattr(config, "num_kv_heads", None) or H)
        V = int(config.vocab_size)
        D = int(getattr(config, "head_dim", 0) or 0) or (E // H if H else 0)
    except AttributeError as exc:
        raise ModelError(f"model config lacks {exc.name or exc.args[0]!r} needed by the GPU roofline") from None
    except (TypeError, ValueError) as exc:
        raise ModelError(f"bad model config for the GPU roofline ({exc})") from None
    if min(E, F, L, H, Hkv, V, D) <= 0:
        raise ModelError("model config sizes must be positive for the GPU roofline")
    return dict(E=E, F=F, L=L, H=H, Hkv=Hkv, V=V, D=D, q=H * D, kv=Hkv * D,
                tied=bool(getattr(config, "tie_word_embeddings", False)),
                bias=bool(getattr(config, "qkv_bias", False)))


def _counts(s: dict) -> dict[str, float]:
    E, F, L, V, q, kv = s["E"], s["F"], s["L"], s["V"], s["q"], s["kv"]
    matmul_layer = E * q + 2 * E * kv + q * E + 3 * E * F  # wq wk wv wo gate up down
    layer = matmul_layer + 2 * E + ((q + 2 * kv) if s["bias"] else 0)
    embed = V * E
    head = V * E  # the LM head (the embedding table itself when tied)
    params = L * layer + E + embed + (0 if s["tied"] else head)
    return dict(
        matmul_layer=matmul_layer,
        layer=layer,
        params=params,
        # parameters streamed by one forward pass: layers, final norm, LM head (not the embedding table)
        streamed=L * layer + E + head,
        act_values_per_token_layer=14 * E + 4 * q + 6 * F,
    )


# --------------------------------------------------------------------------- exact sums
def _line_sum(c0: float, c1: float, lo: int, n: int) -> float:
    """sum_{p=lo}^{lo+n-1} (c0 + c1 p)."""
    if n <= 0:
        return 0.0
    return n * c0 + c1 * (n * lo + n * (n - 1) / 2.0)


def _sum_max_lines(a0: float, a1: float, b0: float, b1: float, start: int, count: int) -> float:
    """Exact ``sum_{p=start}^{start+count-1} max(a0 + a1 p, b0 + b1 p)`` in closed form.

    Two lines cross at most once, so the range splits into one run where ``a`` is the
    larger and one where ``b`` is; each run is an arithmetic series.
    """
    if count <= 0:
        return 0.0
    end = start + count  # exclusive
    d0, d1 = a0 - b0, a1 - b1  # a - b = d0 + d1 p
    if d1 == 0:
        return _line_sum(a0, a1, start, count) if d0 >= 0 else _line_sum(b0, b1, start, count)
    cross = -d0 / d1  # a == b here
    if d1 > 0:  # a wins for p >= cross
        split = int(min(max(math.ceil(cross), start), end)) if math.isfinite(cross) else (start if cross < 0 else end)
        return _line_sum(b0, b1, start, split - start) + _line_sum(a0, a1, split, end - split)
    # a wins for p <= cross
    split = int(min(max(math.floor(cross) + 1, start), end)) if math.isfinite(cross) else (start if cross < 0 else end)
    return _line_sum(a0, a1, start, split - start) + _line_sum(b0, b1, split, end - split)


# --------------------------------------------------------------------------- helpers
def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise RequestError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _check_fraction(name: str, value: Any) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise RequestError(f"{name} must be a number in (0, 1], got {value!r}") from None
    if not (0.0 < v <= 1.0):
        raise RequestError(f"{name} must be in (0, 1], got {value!r}")
    return v


def allreduce_seconds(nbytes: float, gpu: GPUSpec, num_gpus: int, latency_s: float | None = None,
                      efficiency: Efficiency = IDEAL) -> float:
    """Ring allreduce of ``nbytes`` over ``num_gpus`` GPUs: latency per collective + 2 (n-1)/n * bytes / bandwidth.

    Inside one node: the NVLink latency floor (``latency_s`` overrides it) and NVLink
    bandwidth. Across nodes: the InfiniBand latency floor on top, and the ring's
    bandwidth is ``min(NVLink, gpus_per_node x InfiniBand per GPU)``. ``efficiency`` adds
    its extra latencies and scales the bandwidth by its link fraction.
    """
    if num_gpus <= 1:
        return 0.0
    nodes = gpu.nodes(num_gpus)
    bandwidth = gpu.interconnect_bytes_per_s
    latency = (gpu.nvlink_latency_s if latency_s is None else latency_s) + efficiency.allreduce_extra_latency_s
    if nodes > 1:
        bandwidth = min(bandwidth, gpu.gpus_per_node * gpu.ib_bytes_per_s)
        latency += gpu.ib_latency_s + efficiency.internode_extra_latency_s
    return latency + 2.0 * (num_gpus - 1) / num_gpus * nbytes / (efficiency.link * bandwidth)


def device_label(gpu: GPUSpec, num_gpus: int) -> str:
    """``A100-80GB``, ``8xA100-80GB TP``, or ``2x8xA100-80GB TP`` for a group spanning 2 nodes of 8."""
    if num_gpus == 1:
        return gpu.name
    nodes = gpu.nodes(num_gpus)
    return f"{num_gpus}x{gpu.name} TP" if nodes == 1 else f"{nodes}x{gpu.gpus_per_node}x{gpu.name} TP"


# --------------------------------------------------------------------------- the model
def _prefill(s: dict, c: dict, spec: GPUSpec, n: int, b: int, Lin: int, dt: int, flops_rate: float,
             bytes_rate: float, allreduce_latency_s: float | None, eff: Efficiency) -> dict:
    """Time to first token and its compute / memory / allreduce / fixed parts (see the module docstring)."""
    E, L, V, q = s["E"], s["L"], s["V"], s["q"]
    tokens = b * Lin
    attn_pairs = b * Lin * (Lin + 1) / 2.0  # causal (query, key) pairs per layer
    flops = (2.0 * c["matmul_layer"] * tokens * L
             + 4.0 * q * attn_pairs * L
             + 2.0 * E * V * b)  # LM head, last token of each sequence
    nbytes = (c["streamed"] * dt
              + min(tokens, V) * E * dt  # embedding rows looked up
              + tokens * c["kv_bytes_per_token"]  # K/V written
              + tokens * c["act_bytes_per_token"])
    compute_s, memory_s = flops / flops_rate, nbytes / bytes_rate
    comm_s = 2 * L * allreduce_seconds(tokens * E * dt, spec, n, allreduce_latency_s, eff)
    overhead_s = L * eff.layer_overhead_s + eff.step_overhead_s
    return {
        "ttft_s": max(compute_s, memory_s) + comm_s + overhead_s,
        "prefill_flops": flops,
        "prefill_bytes": nbytes,
        "prefill_compute_s": compute_s,
        "prefill_memory_s": memory_s,
        "prefill_comm_s": comm_s,
        "prefill_overhead_s": overhead_s,
        "prefill_bound": "compute" if compute_s >= memory_s else "memory",
    }


def _decode(s: dict, c: dict, spec: GPUSpec, n: int, b: int, Lin: int, Lout: int, dt: int, flops_rate: float,
            bytes_rate: float, allreduce_latency_s: float | None, eff: Efficiency) -> dict:
    """All ``Lout`` decode steps: their exact total, mean (TPOT), first and last step, and what bounds them."""
    E, L, V, q = s["E"], s["L"], s["V"], s["q"]
    # step at position p: compute = f0 + f1 p, memory = m0 + m1 p (seconds)
    f0 = (2.0 * c["matmul_layer"] * L * b + 4.0 * q * L * b + 2.0 * E * V * b) / flops_rate
    f1 = 4.0 * q * L * b / flops_rate
    m0 = (c["streamed"] * dt + b * E * dt + b * c["kv_bytes_per_token"] + b * c["act_bytes_per_token"]) / bytes_rate
    m1 = b * c["kv_bytes_per_token"] / bytes_rate
    comm_s = 2 * L * allreduce_seconds(b * E * dt, spec, n, allreduce_latency_s, eff)
    overhead_s = L * eff.layer_overhead_s + eff.step_overhead_s
    fixed = comm_s + overhead_s
    total = _sum_max_lines(f0, f1, m0, m1, Lin, Lout) + Lout * fixed
    p_first, p_last = Lin, Lin + Lout - 1
    mem_bound = [m0 + m1 * p >= f0 + f1 * p for p in (p_first, p_last)]
    return {
        "tpot_s": total / Lout,
        "tpot_first_s": max(f0 + f1 * p_first, m0 + m1 * p_first) + fixed,
        "tpot_last_s": max(f0 + f1 * p_last, m0 + m1 * p_last) + fixed,
        "decode_s": total,
        "decode_comm_s_per_token": comm_s,
        "decode_overhead_s_per_token": overhead_s,
        "decode_bound": "memory" if all(mem_bound) else ("compute" if not any(mem_bound) else "mixed"),
    }


def gpu_inference(
    config: Any,
    gpu: str | GPUSpec,
    num_gpus: int = 1,
    input_len: int | None = None,
    output_len: int | None = None,
    batch: int = 1,
    dtype_bytes: int = 2,
    efficiency: Efficiency = IDEAL,
    allreduce_latency_s: float | None = None,
) -> dict:
    """Time, throughput, energy and memory of one request on ``num_gpus`` GPUs under ``efficiency``.

    Returns a dict with ``device``, ``ttft_s``, ``tpot_s`` (mean over the output tokens),
    ``prefill_tokens_per_s``, ``decode_tokens_per_s`` (TPR = 1/TPOT, per sequence),
    ``e2e_tokens_per_s`` (output_len / (ttft + output_len * tpot), per sequence),
    ``total_s``, ``energy_j``, ``fits``, ``memory_bytes``, a breakdown and ``efficiency``.
    See the module docstring for the model.
    """
    spec = gpu if isinstance(gpu, GPUSpec) else get_gpu(gpu)
    n = _check_int("num_gpus", num_gpus, 1)
    Lin = _check_int("input_len", input_len, 1)
    Lout = _check_int("output_len", output_len, 1)
    b = _check_int("batch", batch, 1)
    dt = _check_int("dtype_bytes", dtype_bytes, 1)
    if not isinstance(efficiency, Efficiency):
        raise RequestError(f"efficiency must be an Efficiency, got {type(efficiency).__name__}")
    if allreduce_latency_s is not None and not (allreduce_latency_s >= 0 and math.isfinite(allreduce_latency_s)):
        raise RequestError(f"allreduce_latency_s must be >= 0, got {allreduce_latency_s!r}")
    try:
        nodes = spec.nodes(n)
    except HardwareError as exc:
        raise RequestError(f"num_gpus={n}: {exc}") from None

    s = _shape(config)
    c = _counts(s)
    c["kv_bytes_per_token"] = 2 * s["L"] * s["kv"] * dt  # K and V, all layers, one sequence position
    c["act_bytes_per_token"] = s["L"] * c["act_values_per_token_layer"] * dt
    rates = (n * spec.peak_flops_fp16 * efficiency.flops, n * spec.hbm_bytes_per_s * efficiency.hbm)  # FLOP/s, B/s
    pre = _prefill(s, c, spec, n, b, Lin, dt, *rates, allreduce_latency_s, efficiency)
    dec = _decode(s, c, spec, n, b, Lin, Lout, dt, *rates, allreduce_latency_s, efficiency)

    weights_bytes = c["params"] * dt
    kv_cache_bytes = b * (Lin + Lout) * c["kv_bytes_per_token"]
    memory_bytes = weights_bytes + kv_cache_bytes
    capacity = n * spec.hbm_capacity_bytes
    ttft, tpot = pre["ttft_s"], dec["tpot_s"]
    total_s = ttft + dec["decode_s"]
    energy_j = spec.power_w * n * total_s
    return {
        "device": device_label(spec, n), "gpu": spec.name, "num_gpus": n, "nodes": nodes,
        "input_len": Lin, "output_len": Lout, "batch": b, "dtype_bytes": dt,
        "mfu": efficiency.flops, "mbu": efficiency.hbm,
        "ttft_s": ttft,
        "tpot_s": tpot,
        "total_s": total_s,
        "prefill_tokens_per_s": b * Lin / ttft,
        "decode_tokens_per_s": 1.0 / tpot,
        "decode_tokens_per_s_all": b / tpot,
        "e2e_tokens_per_s": Lout / total_s,
        "energy_j": energy_j,
        "energy_per_output_token_j": energy_j / (b * Lout),
        "fits": memory_bytes <= capacity,
        "memory_bytes": memory_bytes,
        "memory_capacity_bytes": capacity,
        "weights_bytes": weights_bytes,
        "kv_cache_bytes": kv_cache_bytes,
        "param_count": c["params"],
        **{k: v for k, v in pre.items() if k != "ttft_s"},
        **{k: v for k, v in dec.items() if k != "tpot_s"},
        "allreduce_latency_s": allreduce_seconds(0.0, spec, n, allreduce_latency_s, efficiency),
        "efficiency": efficiency.to_dict(),
        "source": spec.source,
    }


def gpu_inference_roofline(
    config: Any,
    gpu: str | GPUSpec,
    num_gpus: int = 1,
    input_len: int | None = None,
    output_len: int | None = None,
    batch: int = 1,
    dtype_bytes: int = 2,
    mfu: float = 1.0,
    mbu: float = 1.0,
    allreduce_latency_s: float | None = None,
) -> dict:
    """The ideal roofline of one request on ``num_gpus`` GPUs (see :func:`gpu_inference`).

    ``mfu``/``mbu`` (default 1) scale the compute and HBM peaks down; ``allreduce_latency_s``
    replaces the GPU's NVLink latency floor. The result carries ``baseline = "roofline"``,
    ``assumptions`` (what the roofline ignores) and ``provenance`` (the GPU's constants).
    """
    mfu = _check_fraction("mfu", mfu)
    mbu = _check_fraction("mbu", mbu)
    spec = gpu if isinstance(gpu, GPUSpec) else get_gpu(gpu)
    r = gpu_inference(config, spec, num_gpus, input_len, output_len, batch, dtype_bytes,
                      IDEAL if (mfu, mbu) == (1.0, 1.0) else Efficiency(flops=mfu, hbm=mbu), allreduce_latency_s)
    r["assumptions"] = list(ASSUMPTIONS)
    return with_provenance(r, spec, "roofline", "waferllm.hardware.gpu_roofline: ideal bound, every phase at the "
                           "GPU's peak (scaled by mfu/mbu when given), allreduces at full link bandwidth and the "
                           "assumed latency floors", fitted_to=None)


def with_provenance(result: dict, spec: GPUSpec, baseline: str, model: str, **extra) -> dict:
    """Mark a result with its kind of baseline and its provenance: the model, the GPU and its constants, ``extra``."""
    result["baseline"] = baseline
    result["provenance"] = {"baseline": baseline, "model": model, "gpu": spec.key or spec.name,
                            "constants": spec.constants(), **extra}
    return result


def gpu_baselines(config: Any, input_len: int, output_len: int, *, batch: int = 1,
                  dtype_bytes: int = 2, mfu: float = 1.0, mbu: float = 1.0) -> list[dict]:
    """Roofline only, for the standard set A100, 8xA100 (TP), H100. The comparison to quote,
    with the calibrated model beside the roofline, is :func:`waferllm.baselines.gpu_baselines`."""
    return [gpu_inference_roofline(config, name, count, input_len=input_len, output_len=output_len,
                                   batch=batch, dtype_bytes=dtype_bytes, mfu=mfu, mbu=mbu)
            for name, count in STANDARD_BASELINES]


__all__ = [
    "ASSUMPTIONS", "IDEAL", "NVLINK_ALLREDUCE_LATENCY_S", "STANDARD_BASELINES", "Efficiency", "allreduce_seconds",
    "device_label", "gpu_baselines", "gpu_inference", "gpu_inference_roofline", "with_provenance",
]
