"""Calibrated GPU baseline: the fit against SPEC section 5, its terms by hand, the bound, inheritance, refits."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from waferllm.baselines import STANDARD_SETUPS, baseline_rows, gpu_baselines
from waferllm.hardware.measurements import Measurement, load_measurements
from waferllm.errors import HardwareError, RequestError
from waferllm.hardware.gpu import GPUSpec, get_gpu
from waferllm.baselines.gpu_calibrated import (
    FACTORS, GPUFit, Request, fit_gpu, gpu_inference_calibrated, load_fit, measurement_request, measurement_value,
    measurements_to_toml, model_value, write_fit,
)
from waferllm.hardware.gpu_roofline import IDEAL, Efficiency, gpu_inference, gpu_inference_roofline
from waferllm.hardware.plmr import Provenance
from waferllm.models.presets import get_model_preset
from waferllm.models.testing import tiny_config

ROOT = Path(__file__).resolve().parents[1]

#: SPEC section 5, SGLang on A100-80GB (fp16, batch 1, 4K context): (model, quantity, GPUs) -> tokens/s
SPEC5 = {
    ("llama3-8b", "prefill_tokens_per_s", 1): 13988, ("llama3-8b", "prefill_tokens_per_s", 8): 17361,
    ("llama3-8b", "prefill_tokens_per_s", 16): 13994,
    ("llama3-8b", "decode_tokens_per_s", 1): 78.9, ("llama3-8b", "decode_tokens_per_s", 8): 260.4,
    ("llama3-8b", "decode_tokens_per_s", 16): 164.6,
    ("llama2-13b", "prefill_tokens_per_s", 1): 7805, ("llama2-13b", "prefill_tokens_per_s", 8): 12287,
    ("llama2-13b", "decode_tokens_per_s", 1): 48.7, ("llama2-13b", "decode_tokens_per_s", 8): 175.8,
    ("codellama-34b", "decode_tokens_per_s", 1): 26.1, ("codellama-34b", "decode_tokens_per_s", 8): 100.4,
    ("codellama-34b", "decode_tokens_per_s", 16): 84.5,
    ("qwen2-72b", "decode_tokens_per_s", 1): 10.6, ("qwen2-72b", "decode_tokens_per_s", 8): 51.2,
    ("qwen2-72b", "decode_tokens_per_s", 16): 48.7,
}


TOY = GPUSpec("TOY", peak_flops_fp16=1e14, hbm_bytes_per_s=1e12, hbm_capacity_bytes=1e10, power_w=100.0,
              interconnect_bytes_per_s=1e11, source="test", nvlink_latency_s=2e-6, ib_bytes_per_s=1e10,
              ib_latency_s=7e-6, gpus_per_node=4)


# ------------------------------------------------------------------ the data and the fit
def test_spec_gpu_measurements_are_in_the_data():
    got = {}
    for m in load_measurements(system="gpu"):
        req = measurement_request(m)
        assert (req.gpu, req.input_len, req.output_len) == ("a100", 4096, 128)
        got[(req.model, req.quantity, req.gpus)] = m.value
        assert m.tolerance == 0.15 and "SPEC section 5" in m.source
    assert got == SPEC5


@pytest.mark.parametrize("key", sorted(SPEC5))
def test_calibrated_model_within_15_percent_of_each_measurement(key):
    model, quantity, gpus = key
    r = gpu_inference_calibrated(get_model_preset(model), "a100", gpus, input_len=4096, output_len=128)
    assert abs(r[quantity] / SPEC5[key] - 1) <= 0.15
    roof = gpu_inference_roofline(get_model_preset(model), "a100", gpus, input_len=4096, output_len=128)
    assert roof[quantity] > r[quantity]  # the roofline is the bound the measurement stays under


def test_stored_fit_residuals_match_the_model_and_a_refit():
    fit = load_fit("a100")
    assert fit.gpu == "a100" and fit.derived_for is None and len(fit.residuals) == len(SPEC5)
    by_id = {m.id: m for m in load_measurements(system="gpu")}
    for row in fit.residuals:
        m = by_id[row["id"]]
        v = measurement_value(m, "calibrated", fit)
        assert row["measured"] == m.value
        assert row["model"] == pytest.approx(v, rel=1e-4)
        assert row["error"] == pytest.approx(v / m.value - 1, abs=1e-4)
    assert fit.max_abs_error == pytest.approx(max(abs(r["error"]) for r in fit.residuals), abs=1e-4)
    assert fit.max_abs_error <= 0.15
    assert fit.loss == pytest.approx(sum(math.log(measurement_value(by_id[r["id"]], fit=fit) / r["measured"]) ** 2
                                         for r in fit.residuals), rel=1e-4)
    # the stored factors are what the fit gives on the data now
    again = fit_gpu("a100")
    for k, v in again.efficiency.to_dict().items():
        assert getattr(fit.efficiency, k) == pytest.approx(v, rel=2e-3, abs=1e-9), k


def test_fitted_factors_are_physical_and_calibrated():
    fit = load_fit("a100")
    e = fit.efficiency
    assert 0 < e.flops <= 1 and 0 < e.hbm <= 1 and 0 < e.link <= 1
    assert min(e.allreduce_extra_latency_s, e.internode_extra_latency_s, e.layer_overhead_s, e.step_overhead_s) >= 0
    for k, f in fit.factors().items():
        assert f["status"] == "calibrated" and "SPEC section 5" in f["source"] and f["meaning"], k
    assert "SGLang" in fit.fitted_to


# ------------------------------------------------------------------ the terms by hand
def test_calibrated_terms_by_hand():
    c = tiny_config()
    E, F, L, V = c.hidden_size, c.intermediate_size, c.num_layers, c.vocab_size
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    matmul = E * q + 2 * E * kv + q * E + 3 * E * F
    streamed = L * (matmul + 2 * E) + E + V * E
    act = 14 * E + 4 * q + 6 * F
    kvpt = 2 * L * kv * 2
    e = Efficiency(flops=0.5, hbm=0.25, link=0.1, allreduce_extra_latency_s=3e-6, internode_extra_latency_s=11e-6,
                   layer_overhead_s=4e-6, step_overhead_s=50e-6)
    n, Lin, Lout = 8, 64, 4  # 2 nodes of 4
    r = gpu_inference(c, TOY, n, input_len=Lin, output_len=Lout, efficiency=e)
    ring = min(1e11, 4 * 1e10) * 0.1
    lat = 2e-6 + 3e-6 + 7e-6 + 11e-6
    fixed = L * 4e-6 + 50e-6
    ar_dec = lat + 2 * 7 / 8 * (E * 2) / ring
    steps = [max((2 * matmul * L + 4 * q * L * (p + 1) + 2 * E * V) / (n * 1e14 * 0.5),
                 (streamed * 2 + E * 2 + (p + 1) * kvpt + L * act * 2) / (n * 1e12 * 0.25)) + fixed + 2 * L * ar_dec
             for p in range(Lin, Lin + Lout)]
    assert r["tpot_s"] == pytest.approx(np.mean(steps), rel=1e-12)
    assert r["decode_overhead_s_per_token"] == pytest.approx(fixed)
    flops = 2 * matmul * Lin * L + 4 * q * Lin * (Lin + 1) / 2 * L + 2 * E * V
    nbytes = streamed * 2 + Lin * E * 2 + Lin * kvpt + Lin * L * act * 2
    ar_pre = lat + 2 * 7 / 8 * (Lin * E * 2) / ring
    ttft = max(flops / (n * 1e14 * 0.5), nbytes / (n * 1e12 * 0.25)) + fixed + 2 * L * ar_pre
    assert r["ttft_s"] == pytest.approx(ttft, rel=1e-12)
    assert r["energy_j"] == pytest.approx(100.0 * n * (ttft + sum(steps)))
    assert r["efficiency"] == e.to_dict()


def test_roofline_is_never_slower_than_calibrated():
    rng = np.random.default_rng(1)
    for _ in range(100):  # any efficiency: fractions <= 1 and costs >= 0 only slow things down
        e = Efficiency(*rng.uniform(0.01, 1.0, 3), *rng.uniform(0, 1e-4, 4))
        n = int(rng.choice([1, 2, 4, 8, 12]))
        lin, lout = int(rng.integers(1, 3000)), int(rng.integers(1, 300))
        ideal = gpu_inference(tiny_config(), TOY, n, input_len=lin, output_len=lout)
        real = gpu_inference(tiny_config(), TOY, n, input_len=lin, output_len=lout, efficiency=e)
        for k in ("ttft_s", "tpot_s", "total_s", "energy_j"):
            assert ideal[k] <= real[k], k
    for model in ("llama3-8b", "llama2-13b", "codellama-34b", "qwen2-72b", "smollm2-135m"):
        cfg = get_model_preset(model)
        for gpu, n in STANDARD_SETUPS + (("h100", 8), ("b200", 16)):
            for lin, lout in ((128, 16), (4096, 128)):
                roof = gpu_inference_roofline(cfg, gpu, n, input_len=lin, output_len=lout)
                cal = gpu_inference_calibrated(cfg, gpu, n, input_len=lin, output_len=lout)
                for k in ("prefill_tokens_per_s", "decode_tokens_per_s", "e2e_tokens_per_s"):
                    assert roof[k] >= cal[k], (model, gpu, n, k)
                assert roof["energy_j"] <= cal["energy_j"]


def _no_crossing_penalty(gpu: GPUSpec, fit: GPUFit, ib_bandwidth: bool = False) -> tuple[GPUSpec, GPUFit]:
    """The GPU and fit with a collective that crosses nodes costing no more than one inside a node."""
    g = gpu.replace(ib_latency_s=gpu.nvlink_latency_s, **({"ib_bytes_per_s": 1e15} if ib_bandwidth else {}))
    f = GPUFit(fit.gpu, fit.efficiency.replace(internode_extra_latency_s=fit.efficiency.allreduce_extra_latency_s),
               fit.provenance, fit.fitted_to)
    return g, f


@pytest.mark.parametrize("model", ["llama3-8b", "codellama-34b", "qwen2-72b"])
def test_2x8_decode_slower_than_8_because_of_the_crossing_node_latency(model):
    cfg, a100, fit = get_model_preset(model), get_gpu("a100"), load_fit("a100")
    eight = gpu_inference_calibrated(cfg, a100, 8, input_len=4096, output_len=128)
    two8 = gpu_inference_calibrated(cfg, a100, 16, input_len=4096, output_len=128)
    assert two8["decode_tokens_per_s"] < eight["decode_tokens_per_s"]
    # the extra per token is the crossing-node latency of every allreduce (2 per layer), less the weights halved
    crossing = 2 * cfg.num_layers * (a100.ib_latency_s + fit.efficiency.internode_extra_latency_s)
    extra_comm = two8["decode_comm_s_per_token"] - eight["decode_comm_s_per_token"]
    assert extra_comm == pytest.approx(crossing, rel=0.02)
    # a crossing-node collective as cheap as one inside a node: 16 GPUs are faster than 8 again
    g, f = _no_crossing_penalty(a100, fit)
    assert (gpu_inference_calibrated(cfg, g, 16, input_len=4096, output_len=128, fit=f)["decode_tokens_per_s"]
            > gpu_inference_calibrated(cfg, g, 8, input_len=4096, output_len=128, fit=f)["decode_tokens_per_s"])


def test_2x8_prefill_slower_than_8_because_of_the_internode_ring():
    cfg, a100, fit = get_model_preset("llama3-8b"), get_gpu("a100"), load_fit("a100")
    eight = gpu_inference_calibrated(cfg, a100, 8, input_len=4096, output_len=128)
    two8 = gpu_inference_calibrated(cfg, a100, 16, input_len=4096, output_len=128)
    assert two8["prefill_tokens_per_s"] < eight["prefill_tokens_per_s"]
    g, f = _no_crossing_penalty(a100, fit, ib_bandwidth=True)
    assert (gpu_inference_calibrated(cfg, g, 16, input_len=4096, output_len=128, fit=f)["prefill_tokens_per_s"]
            > gpu_inference_calibrated(cfg, g, 8, input_len=4096, output_len=128, fit=f)["prefill_tokens_per_s"])


# ------------------------------------------------------------------ inheritance and baselines
@pytest.mark.parametrize("gpu", ["h100", "h200", "b200"])
def test_other_gpus_inherit_the_a100_fit_as_derived(gpu):
    a100 = load_fit("a100")
    fit = load_fit(gpu)
    assert fit.derived_for == gpu and fit.gpu == "a100" and fit.efficiency == a100.efficiency
    for k, p in fit.provenance.items():
        assert p.status == "derived" and "inherited from the a100 fit" in p.source, k
    r = gpu_inference_calibrated(get_model_preset("llama3-8b"), gpu, 1, input_len=4096, output_len=128)
    prov = r["provenance"]
    assert r["baseline"] == "calibrated" and prov["derived"] is True and prov["fit_gpu"] == "a100"
    assert prov["gpu"] == gpu and all(f["status"] == "derived" for f in prov["efficiency"].values())
    assert len(prov["residuals"]) == len(SPEC5)


def test_gpu_baselines_per_setup_with_both_kinds():
    cfg = get_model_preset("llama3-8b")
    out = gpu_baselines(cfg, 4096, 128)
    assert [(s["gpu"], s["num_gpus"]) for s in out] == list(STANDARD_SETUPS)
    assert [s["setup"] for s in out][:3] == ["A100-80GB", "8xA100-80GB TP", "2x8xA100-80GB TP"]
    for s in out:
        for kind in ("roofline", "calibrated"):
            e = s[kind]
            assert e["baseline"] == e["provenance"]["baseline"] == kind
            for key in ("prefill_tokens_per_s", "ttft_s", "tpot_s", "decode_tokens_per_s", "e2e_tokens_per_s",
                        "energy_j", "fits"):
                assert key in e
            assert e["provenance"]["constants"]["power_w"]["source"]
        assert s["calibrated"]["provenance"]["residuals"] and s["calibrated"]["provenance"]["fitted_to"]
    # the SPEC section 5 measurements of this very request are shown as measured
    assert out[0]["measured"]["decode_tokens_per_s"] == 78.9 and out[0]["measured"]["prefill_tokens_per_s"] == 13988
    assert out[2]["measured"]["decode_tokens_per_s"] == 164.6
    assert out[0]["measured"]["ttft_s"] == pytest.approx(4096 / 13988)
    assert "measured" not in out[3]  # no H100 measurement
    assert all("measured" not in s for s in gpu_baselines(cfg, 1024, 128))
    assert all("measured" not in s for s in gpu_baselines(cfg, 4096, 128, measurements=False))
    rows = baseline_rows(out)
    assert len(rows) == 2 * len(out) + 3
    assert [r["baseline"] for r in rows[:3]] == ["roofline", "calibrated", "measured"]
    assert rows[2]["energy_j"] is None and "SGLang" in rows[2]["basis"]
    assert "inherited from the a100 fit (derived)" in rows[-1]["basis"]
    with pytest.raises(HardwareError, match=r"GPU setup \(a100, 12\): 12 GPUs do not fill whole nodes of 8"):
        gpu_baselines(cfg, 16, 4, setups=(("a100", 12),))


# ------------------------------------------------------------------ refits from measurement files
TRUE = Efficiency(flops=0.55, hbm=0.7, link=0.3, allreduce_extra_latency_s=12e-6, internode_extra_latency_s=0.0,
                  layer_overhead_s=30e-6, step_overhead_s=400e-6)


def synthetic_measurements(path: Path, gpu: str = "h100", eff: Efficiency = TRUE) -> Path:
    entries = []
    for model in ("smollm2-135m", "llama3-8b", "llama2-13b"):
        for gpus in (1, 8):
            for lin in (512, 2048):
                for quantity, evaluator in (("prefill_tokens_per_s", "gpu_prefill_tps"),
                                            ("decode_tokens_per_s", "gpu_decode_tpr")):
                    req = Request(model, gpu, gpus, lin, 64, quantity)
                    entries.append({"id": f"{gpu}.synthetic.{model}.{quantity}.{gpus}.{lin}", "system": "gpu",
                                    "kind": "absolute", "quantity": f"{model} {quantity} {gpus} GPUs {lin}",
                                    "value": model_value(req, eff), "unit": "tokens/s", "tolerance": 0.15,
                                    "model": evaluator, "args": {"model": model, "gpus": gpus, "gpu": gpu,
                                                                 "input_len": lin, "output_len": 64},
                                    "source": "synthetic: the model under known factors"})
    path.write_text(measurements_to_toml(entries, header="synthetic"))
    return path


def test_refit_from_a_measurement_file_recovers_the_factors(tmp_path):
    path = synthetic_measurements(tmp_path / "m.toml")
    fit = fit_gpu("h100", path)
    assert fit.gpu == "h100" and fit.max_abs_error < 2e-3 and len(fit.residuals) == 24
    want = TRUE.to_dict()
    for k in ("flops", "hbm", "link", "allreduce_extra_latency_s", "layer_overhead_s", "step_overhead_s"):
        assert getattr(fit.efficiency, k) == pytest.approx(want[k], rel=0.01), k
        assert fit.provenance[k].status == "calibrated" and str(path) in fit.provenance[k].source
    # one node only: the crossing-node latency is not constrained and is kept from the inherited fit
    assert fit.efficiency.internode_extra_latency_s == load_fit("a100").efficiency.internode_extra_latency_s
    assert fit.provenance["internode_extra_latency_s"].status == "derived"
    assert "not constrained" in fit.provenance["internode_extra_latency_s"].source
    stored = write_fit(fit, tmp_path / "h100.toml")
    back = load_fit("h100", path=stored)
    assert back.efficiency == fit.efficiency and back.residuals == fit.residuals
    assert {k: p.status for k, p in back.provenance.items()} == {k: p.status for k, p in fit.provenance.items()}


def test_calibrate_script_refits_from_a_file(tmp_path):
    path = synthetic_measurements(tmp_path / "m.toml")
    fits = ROOT / "src/waferllm/hardware/gpus/fits"
    before = sorted(x.name for x in fits.iterdir())
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks/gpu_calibrate.py"), "--gpu", "h100",
                        "--measurements", str(path)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "GPU efficiency fit for h100" in p.stdout and "largest error" in p.stdout
    assert "llama2-13b decode_tokens_per_s 8 GPUs 2048" in p.stdout
    assert sorted(x.name for x in fits.iterdir()) == before  # nothing written without --write
    bad = subprocess.run([sys.executable, str(ROOT / "benchmarks/gpu_calibrate.py"), "--gpu", "b200",
                          "--measurements", str(path)], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "no absolute GPU measurement of B200" in bad.stderr


# ------------------------------------------------------------------ errors
def _m(**args) -> Measurement:
    return Measurement(id="x", system="gpu", kind="absolute", quantity="q", unit="tokens/s", model="gpu_decode_tpr",
                       source="s", value=1.0, tolerance=0.1, args=args)


def test_bad_inputs_are_clear_errors(tmp_path):
    with pytest.raises(HardwareError, match=r"efficiency hbm must be in \(0, 1\], got 1.5"):
        Efficiency(hbm=1.5)
    with pytest.raises(HardwareError, match="efficiency layer_overhead_s must be >= 0 seconds, got -1"):
        Efficiency(layer_overhead_s=-1)
    with pytest.raises(HardwareError, match="unknown efficiency factor"):
        IDEAL.replace(speed=2)
    with pytest.raises(HardwareError, match="args need model and gpus"):
        measurement_request(_m(model="llama3-8b"))
    with pytest.raises(HardwareError, match="args need model and gpus"):
        measurement_request(_m(model="llama3-8b", gpus=1, batch=4))
    with pytest.raises(HardwareError, match="unknown GPU 'tpu'"):
        measurement_request(_m(model="llama3-8b", gpus=1, gpu="tpu"))
    with pytest.raises(HardwareError, match="baseline must be 'roofline' or 'calibrated'"):
        measurement_value(_m(model="llama3-8b", gpus=1), "guess")
    with pytest.raises(RequestError, match="efficiency must be an Efficiency"):
        gpu_inference(tiny_config(), TOY, 1, input_len=4, output_len=4, efficiency={"hbm": 0.5})
    f = tmp_path / "m.toml"
    f.write_text(measurements_to_toml([{"id": "y", "system": "gpu", "kind": "absolute", "quantity": "q",
                                        "value": 10.0, "unit": "tokens/s", "tolerance": 0.1, "model": "gpu_decode_tpr",
                                        "args": {"model": "no-such-model", "gpus": 1, "gpu": "h200"},
                                        "source": "s"}]))
    with pytest.raises(HardwareError, match="measurement y: unknown model preset 'no-such-model'"):
        fit_gpu("h200", f)
    with pytest.raises(HardwareError, match="no absolute GPU measurement of B200"):
        fit_gpu("b200", f)
    fit_file = tmp_path / "fit.toml"
    fit_file.write_text('gpu = "a100"\n[efficiency]\nflops = { value = 0.5, source = "s", status = "calibrated" }\n')
    with pytest.raises(HardwareError, match="efficiency lacks allreduce_extra_latency_s"):
        load_fit("a100", path=fit_file)
    assert set(FACTORS) == set(IDEAL.to_dict())
    assert isinstance(load_fit("a100").provenance["flops"], Provenance)
