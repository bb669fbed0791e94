"""benchmarks/gpu_measure.py: refuses without a GPU and vLLM; what it writes refits the calibrated model."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from waferllm.hardware.measurements import load_measurements
from waferllm.baselines.gpu_calibrated import Request, fit_gpu, measurement_request, measurements_to_toml, model_value
from waferllm.hardware.gpu_roofline import Efficiency

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_measure.py"


def _script():
    spec = importlib.util.spec_from_file_location("gpu_measure", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_refuses_clearly_without_gpu_or_vllm(tmp_path):
    mod = _script()
    out = tmp_path / "m.toml"
    # hide every GPU, so that the script refuses on any machine, a GPU machine included
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    p = subprocess.run([sys.executable, str(SCRIPT), "--output", str(out)], capture_output=True, text=True,
                       timeout=300, env=env)
    assert p.returncode == 2
    assert "refusing to run, nothing was measured" in p.stderr
    assert any(why in p.stderr for why in ("vLLM is not installed", "no CUDA GPU is visible", "PyTorch is not installed"))
    assert "python benchmarks/gpu_measure.py --output" in p.stderr  # the command to run on a GPU machine
    assert not out.exists()
    assert "python benchmarks/gpu_measure.py --output gpu_measured.toml" in mod.__doc__


def test_device_names_map_to_presets():
    f = _script().preset_for_device
    assert f("NVIDIA A100-SXM4-80GB", 85e9) == "a100"
    assert f("NVIDIA A100-SXM4-40GB", 42e9) is None
    assert f("NVIDIA H100 80GB HBM3", 85e9) == "h100"
    assert f("NVIDIA H100 PCIe", 85e9) is None and f("NVIDIA H100 NVL", 100e9) is None
    assert f("NVIDIA H200", 150e9) == "h200" and f("NVIDIA B200", 190e9) == "b200"
    assert f("NVIDIA GeForce RTX 4090", 25e9) is None


def test_written_measurements_refit_the_model(tmp_path):
    """The worker's results, as the script turns them into a measurement file, refit the calibrated model."""
    mod = _script()
    true = Efficiency(flops=0.6, hbm=0.75, link=0.4, allreduce_extra_latency_s=8e-6, layer_overhead_s=25e-6,
                      step_overhead_s=300e-6)
    entries = []
    for model in ("smollm2-135m", "llama3-8b", "llama2-13b"):
        for tp in (1, 8):
            rows = []
            for lin in (512, 2048, 4096):
                pre = model_value(Request(model, "h200", tp, lin, 128, "prefill_tokens_per_s"), true)
                dec = model_value(Request(model, "h200", tp, lin, 128, "decode_tokens_per_s"), true)
                rows.append({"input_len": lin, "output_len": 128, "ttft_s": lin / pre, "decode_s": 128 / dec,
                             "prefill_tokens_per_s": pre, "decode_tokens_per_s": dec})
            result = {"model": model, "vllm": "0.0-test", "device": "NVIDIA H200", "rows": rows}
            entries += mod.entries(result, "h200", tp, 3, "2026-01-01")
    path = tmp_path / "measured.toml"
    path.write_text(measurements_to_toml(entries, header="test"))
    ms = load_measurements(path, system="gpu")
    assert len(ms) == 36 and all(m.absolute for m in ms)
    req = measurement_request(ms[0])
    assert (req.gpu, req.gpus, req.input_len, req.output_len) == ("h200", 1, 512, 128)
    assert "vLLM 0.0-test on 1 x NVIDIA H200" in ms[0].source
    fit = fit_gpu("h200", path)
    assert fit.max_abs_error < 5e-3
    for k in ("flops", "hbm", "link", "allreduce_extra_latency_s", "layer_overhead_s", "step_overhead_s"):
        assert getattr(fit.efficiency, k) == pytest.approx(getattr(true, k), rel=0.02), k
