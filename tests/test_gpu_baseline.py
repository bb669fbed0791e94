"""GPU roofline baseline: hand-computed numbers, exact sums, monotonicity, fit, errors."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from waferllm.hardware.gpu_roofline import (
    NVLINK_ALLREDUCE_LATENCY_S,
    _sum_max_lines,
    allreduce_seconds,
    gpu_baselines,
    gpu_inference_roofline,
)
from waferllm.errors import HardwareError, ModelError, RequestError
from waferllm.hardware.gpu import GPUSpec, get_gpu


@dataclass
class TinyConfig:
    """A stand-in with the ModelConfig attributes the roofline reads (duck typing)."""

    name: str = "tiny"
    vocab_size: int = 1000
    hidden_size: int = 256
    intermediate_size: int = 512
    num_layers: int = 1
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 64
    tie_word_embeddings: bool = False
    qkv_bias: bool = False


#: A made-up GPU with round numbers so that hand calculations are exact.
TOY = GPUSpec("TOY", peak_flops_fp16=1e15, hbm_bytes_per_s=1e12, hbm_capacity_bytes=1e9,
              power_w=100.0, interconnect_bytes_per_s=1e11, source="test")


def _tiny_counts(c: TinyConfig) -> dict:
    E, F, L, V = c.hidden_size, c.intermediate_size, c.num_layers, c.vocab_size
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    matmul = E * q + 2 * E * kv + q * E + 3 * E * F
    layer = matmul + 2 * E
    return dict(E=E, F=F, L=L, V=V, q=q, kv=kv, matmul=matmul,
                streamed=L * layer + E + V * E, params=L * layer + E + 2 * V * E,
                act=14 * E + 4 * q + 6 * F)


# ------------------------------------------------------------------ exact sums
@pytest.mark.parametrize("a0,a1,b0,b1,start,count", [
    (1.0, 0.5, 10.0, 0.0, 0, 50),     # crossing inside, a rising
    (10.0, -0.5, 1.0, 0.1, 3, 40),    # crossing inside, a falling
    (5.0, 1.0, 1.0, 1.0, 0, 10),      # parallel
    (0.0, 1.0, 0.0, 1.0, 7, 9),       # identical
    (100.0, 0.0, 1.0, 0.001, 0, 20),  # crossing far outside
    (1.0, 2.0, 7.0, 1.0, 6, 1),       # crossing exactly on an integer, one term
    (1.0, 2.0, 7.0, 1.0, 0, 13),      # crossing exactly on an integer
])
def test_sum_max_lines_matches_brute_force(a0, a1, b0, b1, start, count):
    p = np.arange(start, start + count, dtype=np.float64)
    want = np.maximum(a0 + a1 * p, b0 + b1 * p).sum()
    assert _sum_max_lines(a0, a1, b0, b1, start, count) == pytest.approx(want, rel=1e-12)


def test_sum_max_lines_random():
    rng = np.random.default_rng(0)
    for _ in range(200):
        a0, b0 = rng.uniform(0, 100, 2)
        a1, b1 = rng.uniform(-1, 1, 2)
        start, count = int(rng.integers(0, 500)), int(rng.integers(1, 500))
        p = np.arange(start, start + count, dtype=np.float64)
        want = np.maximum(a0 + a1 * p, b0 + b1 * p).sum()
        assert _sum_max_lines(a0, a1, b0, b1, start, count) == pytest.approx(want, rel=1e-10)


# ------------------------------------------------------------------ hand-computed numbers
def test_tiny_decode_memory_bound_by_hand():
    c = TinyConfig()
    k = _tiny_counts(c)
    r = gpu_inference_roofline(c, TOY, 1, input_len=10, output_len=5)
    kvpt = 2 * k["L"] * k["kv"] * 2
    # decode is memory-bound at every position here (tiny FLOPs, 1000 FLOP per byte machine)
    assert r["decode_bound"] == "memory"
    # step at position p moves: streamed weights + embedding row + (p+1) K/V entries + activations
    per_step = [(k["streamed"] * 2 + k["E"] * 2 + (p + 1) * kvpt + k["L"] * k["act"] * 2) / TOY.hbm_bytes_per_s
                for p in range(10, 15)]
    assert r["tpot_s"] == pytest.approx(np.mean(per_step), rel=1e-12)
    assert r["tpot_first_s"] == pytest.approx(per_step[0], rel=1e-12)
    assert r["tpot_last_s"] == pytest.approx(per_step[-1], rel=1e-12)
    # the floor is the weights streamed once per token over the bandwidth
    assert r["tpot_s"] >= k["streamed"] * 2 / TOY.hbm_bytes_per_s
    assert r["tpot_s"] == pytest.approx(k["streamed"] * 2 / TOY.hbm_bytes_per_s, rel=0.05)
    assert r["decode_tokens_per_s"] == pytest.approx(1 / r["tpot_s"])
    assert r["weights_bytes"] == k["params"] * 2
    assert r["memory_bytes"] == k["params"] * 2 + 15 * kvpt
    assert r["fits"] is True
    assert r["device"] == "TOY"


def test_tiny_prefill_by_hand():
    c = TinyConfig()
    k = _tiny_counts(c)
    n = 100
    r = gpu_inference_roofline(c, TOY, 1, input_len=n, output_len=1)
    flops = 2 * k["matmul"] * n * k["L"] + 4 * k["q"] * n * (n + 1) / 2 * k["L"] + 2 * k["E"] * k["V"]
    kvpt = 2 * k["L"] * k["kv"] * 2
    nbytes = k["streamed"] * 2 + n * k["E"] * 2 + n * kvpt + n * k["L"] * k["act"] * 2
    assert r["prefill_flops"] == pytest.approx(flops, rel=1e-12)
    assert r["prefill_bytes"] == pytest.approx(nbytes, rel=1e-12)
    assert r["ttft_s"] == pytest.approx(max(flops / TOY.peak_flops_fp16, nbytes / TOY.hbm_bytes_per_s), rel=1e-12)
    assert r["prefill_tokens_per_s"] == pytest.approx(n / r["ttft_s"])
    total = r["ttft_s"] + r["tpot_s"]
    assert r["total_s"] == pytest.approx(total)
    assert r["e2e_tokens_per_s"] == pytest.approx(1 / total)
    assert r["energy_j"] == pytest.approx(TOY.power_w * total)


def test_mfu_mbu_scale_the_roofs():
    c = TinyConfig()
    base = gpu_inference_roofline(c, TOY, 1, input_len=100, output_len=8)
    slow = gpu_inference_roofline(c, TOY, 1, input_len=100, output_len=8, mfu=0.5, mbu=0.25)
    assert slow["tpot_s"] == pytest.approx(4 * base["tpot_s"])  # decode memory-bound
    assert slow["prefill_compute_s"] == pytest.approx(2 * base["prefill_compute_s"])
    assert slow["prefill_memory_s"] == pytest.approx(4 * base["prefill_memory_s"])


def test_compute_bound_decode_with_large_batch():
    c = TinyConfig()
    low = GPUSpec("LOW", peak_flops_fp16=1e13, hbm_bytes_per_s=1e12, hbm_capacity_bytes=1e12,
                  power_w=100.0, interconnect_bytes_per_s=1e11, source="test")  # 10 FLOP per byte
    r = gpu_inference_roofline(c, low, 1, input_len=4, output_len=4, batch=4096)
    k = _tiny_counts(c)
    f = [(2 * k["matmul"] * k["L"] + 4 * k["q"] * k["L"] * (p + 1) + 2 * k["E"] * k["V"]) * 4096 / low.peak_flops_fp16
         for p in range(4, 8)]
    assert r["decode_bound"] == "compute"
    assert r["tpot_s"] == pytest.approx(np.mean(f), rel=1e-12)
    assert r["decode_tokens_per_s_all"] == pytest.approx(4096 / r["tpot_s"])


def test_tensor_parallel_comm_by_hand():
    c = TinyConfig(num_layers=3)
    one = gpu_inference_roofline(c, TOY, 1, input_len=16, output_len=4)
    four = gpu_inference_roofline(c, TOY, 4, input_len=16, output_len=4)
    ar_decode = 2 * 3 / 4 * (c.hidden_size * 2) / TOY.interconnect_bytes_per_s + NVLINK_ALLREDUCE_LATENCY_S
    ar_prefill = 2 * 3 / 4 * (16 * c.hidden_size * 2) / TOY.interconnect_bytes_per_s + NVLINK_ALLREDUCE_LATENCY_S
    assert four["decode_comm_s_per_token"] == pytest.approx(2 * 3 * ar_decode)
    assert four["prefill_comm_s"] == pytest.approx(2 * 3 * ar_prefill)
    assert four["tpot_s"] == pytest.approx(one["tpot_s"] / 4 + 2 * 3 * ar_decode, rel=1e-12)
    assert four["device"] == "4xTOY TP"
    assert four["energy_j"] == pytest.approx(4 * TOY.power_w * four["total_s"])
    assert allreduce_seconds(1e6, TOY, 1) == 0.0


# ------------------------------------------------------------------ monotonicity
def test_longer_output_longer_total_and_growing_tpot():
    c = TinyConfig(num_layers=2)
    totals, tpots = [], []
    for out in (1, 10, 100, 1000):
        r = gpu_inference_roofline(c, "a100", 1, input_len=512, output_len=out)
        totals.append(r["total_s"])
        tpots.append(r["tpot_s"])
    assert all(a < b for a, b in zip(totals, totals[1:]))
    assert all(a < b for a, b in zip(tpots, tpots[1:]))  # the K/V cache grows
    r_short = gpu_inference_roofline(c, "a100", 1, input_len=128, output_len=10)
    r_long = gpu_inference_roofline(c, "a100", 1, input_len=4096, output_len=10)
    assert r_long["ttft_s"] > r_short["ttft_s"]


def test_more_gpus_faster_until_comm_dominates():
    from waferllm.models.presets import get_model_preset

    big = get_model_preset("llama3-8b")
    tpots = [gpu_inference_roofline(big, "a100", n, input_len=1024, output_len=16)["tpot_s"] for n in (1, 2, 4, 8)]
    assert all(a > b for a, b in zip(tpots, tpots[1:]))
    # a tiny model: the allreduce latency outweighs the split of a few MB of weights
    tiny = TinyConfig(num_layers=4)
    t = [gpu_inference_roofline(tiny, "a100", n, input_len=16, output_len=16)["tpot_s"] for n in (1, 2, 8)]
    assert t[0] < t[2] and t[0] < t[1]
    # prefill of a long prompt on a small model: the allreduce volume term 2(n-1)/n grows with n
    ttft = [gpu_inference_roofline(tiny, "a100", n, input_len=8192, output_len=1)["prefill_comm_s"] for n in (2, 4, 8)]
    assert ttft[0] < ttft[1] < ttft[2]


# ------------------------------------------------------------------ real models
def test_llama3_8b_on_a100_near_weight_streaming_floor():
    from waferllm.models.presets import get_model_preset

    c = get_model_preset("llama3-8b")
    r = gpu_inference_roofline(c, "a100", 1, input_len=4096, output_len=128)
    assert r["weights_bytes"] == c.param_count() * 2
    assert r["weights_bytes"] == pytest.approx(16.06e9, rel=0.01)
    floor = 16.06e9 / 2.04e12  # ~ 7.9 ms
    assert floor * 0.95 < r["tpot_s"] < floor * 1.1
    assert r["decode_bound"] == "memory" and r["prefill_bound"] == "compute"
    assert r["fits"] is True
    # prefill ~ 2 * 7.5e9 * 4096 FLOPs (+ attention) on 312 TFLOP/s: ~ 0.2 s
    assert 0.15 < r["ttft_s"] < 0.25
    assert r["e2e_tokens_per_s"] == pytest.approx(128 / (r["ttft_s"] + 128 * r["tpot_s"]))


def test_standard_baselines_llama3_8b():
    from waferllm.models.presets import get_model_preset

    rows = gpu_baselines(get_model_preset("llama3-8b"), 4096, 128)
    assert [r["device"] for r in rows] == ["A100-80GB", "8xA100-80GB TP", "H100-SXM"]
    a100, a100x8, h100 = rows
    assert a100x8["tpot_s"] < h100["tpot_s"] < a100["tpot_s"]
    assert a100x8["ttft_s"] < h100["ttft_s"] < a100["ttft_s"]
    assert h100["tpot_s"] == pytest.approx(a100["tpot_s"] * 2.04 / 3.35, rel=0.01)
    for r in rows:
        assert r["fits"] and r["assumptions"] and all(isinstance(s, str) for s in r["assumptions"])
        for key in ("ttft_s", "tpot_s", "prefill_tokens_per_s", "decode_tokens_per_s", "e2e_tokens_per_s",
                    "energy_j", "memory_bytes"):
            assert r[key] > 0


def test_70b_does_not_fit_one_a100_but_fits_eight():
    from waferllm.models.presets import get_model_preset

    c = get_model_preset("llama3-70b")
    one = gpu_inference_roofline(c, "a100", 1, input_len=4096, output_len=128)
    assert one["fits"] is False
    assert one["memory_bytes"] > 140e9 and one["memory_capacity_bytes"] == 80e9
    assert one["tpot_s"] > 0  # times are still reported
    assert gpu_inference_roofline(c, "a100", 8, input_len=4096, output_len=128)["fits"] is True


def test_duck_typed_config_and_tied_embeddings():
    untied = gpu_inference_roofline(TinyConfig(), TOY, input_len=8, output_len=2)
    tied = gpu_inference_roofline(TinyConfig(tie_word_embeddings=True), TOY, input_len=8, output_len=2)
    assert untied["weights_bytes"] - tied["weights_bytes"] == 1000 * 256 * 2
    assert untied["tpot_s"] == pytest.approx(tied["tpot_s"])  # the LM head is read either way


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize("kwargs,match", [
    (dict(input_len=0, output_len=4), r"input_len must be an integer >= 1, got 0"),
    (dict(input_len=4, output_len=0), r"output_len must be an integer >= 1, got 0"),
    (dict(input_len=-1, output_len=4), r"input_len must be an integer >= 1, got -1"),
    (dict(input_len=4.5, output_len=4), r"input_len must be an integer >= 1, got 4.5"),
    (dict(input_len=True, output_len=4), r"input_len must be an integer >= 1, got True"),
    (dict(input_len=None, output_len=4), r"input_len must be an integer >= 1, got None"),
    (dict(input_len=4), r"output_len must be an integer >= 1, got None"),
    (dict(input_len=4, output_len=4, batch=0), r"batch must be an integer >= 1, got 0"),
    (dict(input_len=4, output_len=4, num_gpus=0), r"num_gpus must be an integer >= 1, got 0"),
    (dict(input_len=4, output_len=4, mfu=0.0), r"mfu must be in \(0, 1\], got 0.0"),
    (dict(input_len=4, output_len=4, mbu=1.5), r"mbu must be in \(0, 1\], got 1.5"),
    (dict(input_len=4, output_len=4, dtype_bytes=0), r"dtype_bytes must be an integer >= 1, got 0"),
])
def test_bad_requests_raise_request_error(kwargs, match):
    with pytest.raises(RequestError, match=match):
        gpu_inference_roofline(TinyConfig(), TOY, **kwargs)


def test_unknown_gpu_and_bad_config():
    with pytest.raises(HardwareError, match="unknown GPU 'tpu-v4'"):
        gpu_inference_roofline(TinyConfig(), "tpu-v4", input_len=4, output_len=4)

    class NoHidden:
        vocab_size = 10

    with pytest.raises(ModelError, match="model config lacks 'hidden_size' needed by the GPU roofline"):
        gpu_inference_roofline(NoHidden(), "a100", input_len=4, output_len=4)
    assert get_gpu("A100-80GB").name == "A100-80GB"


# ------------------------------------------------------------------ presets as data
def test_gpu_presets_carry_provenance():
    from waferllm.hardware.gpu import GPUS
    from waferllm.hardware.plmr import STATUSES

    assert list(GPUS) == ["a100", "h100", "h200", "b200"]
    for spec in GPUS.values():
        consts = spec.constants()
        for key in ("peak_flops_fp16", "peak_flops_bf16", "hbm_bytes_per_s", "hbm_capacity_bytes",
                    "nvlink_bytes_per_s", "nvlink_latency_s", "ib_bytes_per_s", "ib_latency_s", "gpus_per_node",
                    "power_w"):
            assert consts[key]["value"] > 0 and consts[key]["source"] and consts[key]["status"] in STATUSES, key
        # latencies are not vendor figures: assumed, with a plausible range and a stated basis
        for key in ("nvlink_latency_s", "ib_latency_s"):
            assert consts[key]["status"] == "assumed" and consts[key]["range"][0] < consts[key]["value"]
        # per-direction link figures are half the vendor's bidirectional figure
        assert consts["nvlink_bytes_per_s"]["status"] == "derived"
    a100, h100, h200, b200 = (get_gpu(k) for k in ("a100", "h100", "h200", "b200"))
    assert (a100.interconnect_bytes_per_s, h100.interconnect_bytes_per_s, b200.interconnect_bytes_per_s) == (
        600e9 / 2, 900e9 / 2, 1800e9 / 2)
    assert (a100.ib_bytes_per_s, h100.ib_bytes_per_s, b200.ib_bytes_per_s) == (200e9 / 8, 400e9 / 8, 400e9 / 8)
    assert b200.hbm_bytes_per_s == 64e12 / 8 and b200.hbm_capacity_bytes == 1440e9 / 8
    assert b200.source_of("hbm_bytes_per_s").status == "derived"
    assert h200.hbm_capacity_bytes == 141e9 and h200.power_w == 700 and b200.power_w == 1000
    assert h100.peak_flops("fp8") == 3958e12 / 2 and h100.peak_flops("bf16") == 989e12  # dense = half of sparse
    assert b200.peak_flops("fp16") == 2.25e15 and b200.peak_flops("fp8") == 4.5e15
    with pytest.raises(HardwareError, match="A100-80GB has no fp8 tensor-core peak"):
        a100.peak_flops("fp8")
    with pytest.raises(HardwareError, match="unknown dtype 'int3'"):
        a100.peak_flops("int3")
    assert get_gpu("B200").key == "b200" and get_gpu("h100-sxm5").key == "h100"


def test_gpu_file_with_base_and_overrides(tmp_path):
    f = tmp_path / "mine.toml"
    f.write_text('base = "h100"\nname = "H100-slow"\nhbm_bytes_per_s = { value = 2e12, source = "my test", '
                 'status = "measured" }\n')
    g = get_gpu(f)
    assert g.name == "H100-slow" and g.hbm_bytes_per_s == 2e12 and g.peak_flops_fp16 == 989e12
    assert g.source_of("hbm_bytes_per_s").source == "my test"
    assert g.efficiency_from == "a100"
    o = get_gpu("a100", power_w=300)
    assert o.power_w == 300 and o.source_of("power_w").status == "user"
    f.write_text('base = "a100"\nhbm_speed = 1\n')
    with pytest.raises(HardwareError, match="unknown key\\(s\\) hbm_speed"):
        get_gpu(f)
    f.write_text('base = "a100"\npower_w = -5\n')
    with pytest.raises(HardwareError, match="power_w .* must be positive, got -5"):
        get_gpu(f)
    f.write_text('name = "x"\npeak_flops_fp16 = 1e12\n')
    with pytest.raises(HardwareError, match="missing required key 'hbm_bytes_per_s'"):
        get_gpu(f)
    with pytest.raises(HardwareError, match="unknown GPU constant 'speed'"):
        get_gpu("a100", speed=1)


# ------------------------------------------------------------------ crossing nodes
IB_TOY = GPUSpec("IBTOY", peak_flops_fp16=1e15, hbm_bytes_per_s=1e12, hbm_capacity_bytes=1e9, power_w=100.0,
                 interconnect_bytes_per_s=1e11, source="test", nvlink_latency_s=2e-6, ib_bytes_per_s=1e10,
                 ib_latency_s=7e-6, gpus_per_node=4)


def test_allreduce_across_nodes_by_hand():
    S = 1e6
    # one node of 4: NVLink latency floor + ring over NVLink
    assert allreduce_seconds(S, IB_TOY, 4) == pytest.approx(2e-6 + 2 * 3 / 4 * S / 1e11)
    # 2 nodes of 4: both latency floors, ring at min(NVLink, 4 x IB per GPU) = 4e10
    assert allreduce_seconds(S, IB_TOY, 8) == pytest.approx(2e-6 + 7e-6 + 2 * 7 / 8 * S / 4e10)
    # NICs faster than NVLink: the ring is NVLink-bound again
    fast_ib = GPUSpec(**{**IB_TOY.__dict__, "ib_bytes_per_s": 1e12})
    assert allreduce_seconds(S, fast_ib, 8) == pytest.approx(2e-6 + 7e-6 + 2 * 7 / 8 * S / 1e11)
    c = TinyConfig(num_layers=3)
    r = gpu_inference_roofline(c, IB_TOY, 8, input_len=16, output_len=4)
    assert r["nodes"] == 2 and r["device"] == "2x4xIBTOY TP"
    assert r["decode_comm_s_per_token"] == pytest.approx(2 * 3 * allreduce_seconds(c.hidden_size * 2, IB_TOY, 8))
    assert r["allreduce_latency_s"] == pytest.approx(9e-6)


def test_groups_that_do_not_fill_nodes_are_refused():
    with pytest.raises(RequestError, match="num_gpus=6: 6 GPUs do not fill whole nodes of 4 IBTOY"):
        gpu_inference_roofline(TinyConfig(), IB_TOY, 6, input_len=4, output_len=4)
    with pytest.raises(RequestError, match="TOY has no InfiniBand figures"):
        gpu_inference_roofline(TinyConfig(), TOY, 16, input_len=4, output_len=4)
    r = gpu_inference_roofline(TinyConfig(), "a100", 16, input_len=4, output_len=4)
    assert r["device"] == "2x8xA100-80GB TP" and r["nodes"] == 2


def test_roofline_carries_its_provenance():
    r = gpu_inference_roofline(TinyConfig(), "h200", 1, input_len=8, output_len=2)
    p = r["provenance"]
    assert r["baseline"] == p["baseline"] == "roofline" and p["gpu"] == "h200" and p["fitted_to"] is None
    assert p["constants"]["hbm_bytes_per_s"]["value"] == 4.8e12
    assert "datasheet" in p["constants"]["hbm_bytes_per_s"]["source"]
    assert r["efficiency"] == {"flops": 1.0, "hbm": 1.0, "link": 1.0, "allreduce_extra_latency_s": 0.0,
                               "internode_extra_latency_s": 0.0, "layer_overhead_s": 0.0, "step_overhead_s": 0.0}
