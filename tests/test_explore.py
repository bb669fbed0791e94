"""Design-space exploration: config-only models, sweeps (on a local Ray and in-process), pictures."""

import csv
import json

import numpy as np
import pytest

from waferllm.engine.predict import predict
from waferllm.errors import ModelError, PlacementError, WaferLLMError
from waferllm.explore.plots import pareto_front, plot_prediction, plot_sweep
from waferllm.explore.spec import SweepError, spec_from_mapping
from waferllm.explore.sweep import read_results, run_sweep
from waferllm.hardware import get_wafer
from waferllm.interfaces.cli import main
from waferllm.models.loader import load_config, resolve_config
from waferllm.models.presets import get_model_preset
from waferllm.models.testing import hf_config_dict

SMALL = ["--input-len", "64", "--output-len", "8", "--prefill-grid", "64", "--decode-grid", "48"]


def _write_config(directory, preset):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(hf_config_dict(get_model_preset(preset))))
    return directory


def _cli_json(capsys, argv) -> dict:
    assert main(["predict", *argv, "--json"]) == 0
    return {k: v for k, v in json.loads(capsys.readouterr().out).items() if k != "host_wall_s"}


# ------------------------------------------------------------------ config-only models


def test_config_only_predict_equals_the_preset(tmp_path, capsys):
    d = _write_config(tmp_path / "smollm2-135m", "smollm2-135m")  # the folder's name is the model's name
    preset = _cli_json(capsys, ["--model", "smollm2-135m", *SMALL])
    assert _cli_json(capsys, ["--model", str(d), *SMALL]) == preset
    assert _cli_json(capsys, ["--model", str(d / "config.json"), *SMALL]) == preset
    # any *.json file is a config too; only the name differs
    (tmp_path / "other.json").write_text((d / "config.json").read_text())
    other = _cli_json(capsys, ["--model", str(tmp_path / "other.json"), *SMALL])
    assert other["model"] == "other"
    assert {k: v for k, v in other.items() if k not in ("model", "placement")} == \
        {k: v for k, v in preset.items() if k not in ("model", "placement")}


def test_config_only_in_the_python_api(tmp_path):
    d = _write_config(tmp_path / "llama3-8b", "llama3-8b")
    cfg, ref = load_config(d), get_model_preset("llama3-8b")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                "head_dim", "rope_theta", "tie_word_embeddings", "qkv_bias"):
        assert getattr(cfg, key) == getattr(ref, key), key
    assert resolve_config(str(d)).hidden_size == 4096 and resolve_config("llama3-8b").num_kv_heads == 8
    a = predict(cfg, get_wafer("wse2"), 256, 4, 360, 360, layers=1, gpus=False, band=False)
    b = predict(ref, get_wafer("wse2"), 256, 4, 360, 360, layers=1, gpus=False, band=False)
    for key in ("ttft_s", "tpot_s", "energy_j", "kv_capacity_tokens", "flops"):
        assert a[key] == b[key], key


def test_config_of_a_gguf_file_reads_its_metadata(tmp_path):
    from waferllm.models.loader import load_model
    from waferllm.models.testing import random_weights, tiny_config, write_gguf

    path = str(tmp_path / "tiny.gguf")
    write_gguf(path, random_weights(tiny_config()))
    assert load_config(path) == load_model(path).config
    assert load_config(path).hidden_size == 64


def test_unsupported_and_missing_configs_are_refused(tmp_path, capsys):
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ModelError, match="unsupported architecture"):
        load_config(tmp_path / "gpt2")
    assert main(["predict", "--model", str(tmp_path / "gpt2"), *SMALL]) == 2
    assert "unsupported architecture" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        load_config(tmp_path / "empty")
    with pytest.raises(ModelError, match="neither a preset"):
        resolve_config(str(tmp_path / "nothing.json"))


# ------------------------------------------------------------------ sweeps

SPEC = {
    "sweep": {"batch": 2},
    "fixed": {"model": "smollm2-135m", "input_len": 64, "output_len": 8, "prefill_grid": 64},
    "axes": {"decode_grid": [8, 32, 48], "beta_cycles": [5, 20], "link_bits_per_cycle": [32, 64]},
}


@pytest.mark.timeout(240)
def test_sweep_on_local_ray_rows_resume_and_failures(tmp_path):
    ray = pytest.importorskip("ray")
    out = tmp_path / "sweep.csv"
    res = run_sweep(SPEC, out, use_ray=True, num_cpus=2, timeout_s=180, progress=False)
    assert not ray.is_initialized()  # the sweep stopped the Ray it started
    assert (res.points, res.ran, res.skipped, res.backend) == (12, 12, 0, "ray")
    rows = read_results(out)
    assert len(rows) == 12 and len({r["point_id"] for r in rows}) == 12
    assert sorted({(r["decode_grid"], r["beta_cycles"], r["link_bits_per_cycle"]) for r in rows}) == \
        sorted((g, b, lw) for g in (8, 32, 48) for b in (5.0, 20.0) for lw in (32, 64))
    ok = [r for r in rows if r["status"] == "ok"]
    bad = [r for r in rows if r["status"] != "ok"]
    assert len(ok) == 8 and len(bad) == 4 and {r["decode_grid"] for r in bad} == {8}
    # the failing points carry the engine's own message
    with pytest.raises(PlacementError) as exc:
        predict(get_model_preset("smollm2-135m"), get_wafer("wse2", beta_cycles=5, link_bits_per_cycle=32),
                64, 8, 64, 8, gpus=False, band=False)
    assert all(r["status"] == "error" and r["error"] == str(exc.value) for r in bad)
    for r in ok:
        assert r["error"] is None
        assert r["decode_tokens_per_s"] == pytest.approx(1 / r["tpot_s"])
        parts = [v for k, v in r.items() if k.startswith("energy_j.")]
        assert len(parts) >= 3 and r["energy_j"] == pytest.approx(sum(parts))
        assert r["kv_capacity_tokens"] > 0 and r["ttft_s"] > 0
        assert (r["status.beta_cycles"], r["status.link_bits_per_cycle"], r["status.rows"]) == ("user", "user", "measured")
    # one row against a prediction made here
    r = next(r for r in ok if (r["decode_grid"], r["beta_cycles"], r["link_bits_per_cycle"]) == (48, 20.0, 64))
    m = predict(get_model_preset("smollm2-135m"), get_wafer("wse2", beta_cycles=20, link_bits_per_cycle=64),
                64, 8, 64, 48, gpus=False, band=False)
    for key in ("ttft_s", "tpot_s", "energy_j", "kv_capacity_tokens"):
        assert r[key] == pytest.approx(m[key], rel=1e-12), key
    # the wider link is faster, the costlier relay slower
    by = {(r["decode_grid"], r["beta_cycles"], r["link_bits_per_cycle"]): r["tpot_s"] for r in ok}
    assert by[(48, 5.0, 64)] < by[(48, 5.0, 32)] and by[(48, 5.0, 32)] < by[(48, 20.0, 32)]
    # a rerun skips every point (failed ones too) and leaves the table as it was
    before = out.read_bytes()
    again = run_sweep(SPEC, out, use_ray=True, num_cpus=2, timeout_s=60, progress=False)
    assert (again.ran, again.skipped, again.ok, again.failed) == (0, 12, 8, 4)
    assert out.read_bytes() == before and not ray.is_initialized()


def test_serial_sweep_resumes_only_missing_and_crashed_points(tmp_path):
    spec = {"fixed": {"model": "smollm2-135m", "input_len": 32, "output_len": 4, "prefill_grid": 32,
                      "decode_grid": 32}, "axes": {"beta_cycles": [4, 8, 16]}}
    out = tmp_path / "s.csv"
    first = run_sweep(spec, out, use_ray=False, progress=False)
    assert (first.ran, first.ok) == (3, 3)
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
        header = list(rows[0])
    rows[1]["status"], rows[1]["error"] = "crash", "WorkerCrashedError: lost"
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=header)
        w.writeheader()
        w.writerows(rows[:2])  # the third point is missing, the second crashed
    second = run_sweep(spec, out, use_ray=False, progress=False)
    assert (second.ran, second.skipped, second.ok, second.failed) == (2, 1, 3, 0)
    assert [r["beta_cycles"] for r in read_results(out)] == [4.0, 8.0, 16.0]


def test_bad_constants_are_recorded_not_raised(tmp_path):
    spec = {"fixed": {"model": "smollm2-135m", "input_len": 32, "output_len": 4, "prefill_grid": 32,
                      "decode_grid": 32, "reserved_bytes_per_pe": 8192}, "axes": {"sram_bytes_per_pe": [8192, 49152]}}
    res = run_sweep(spec, tmp_path / "s.csv", use_ray=False, progress=False)
    bad = [r for r in res.rows if r["status"] != "ok"]
    assert len(bad) == 1 and bad[0]["sram_bytes_per_pe"] == 8192
    assert "reserved_bytes_per_pe (8192) must be smaller than sram_bytes_per_pe (8192)" in bad[0]["error"]
    # a request beyond the model's context (8192 tokens) is an error row unless the point allows it
    spec = {"fixed": {"model": "smollm2-135m", "input_len": 8190, "output_len": 4, "prefill_grid": 32,
                      "decode_grid": 32}, "axes": {"allow_beyond_context": [False]}}
    row = run_sweep(spec, tmp_path / "c.csv", use_ray=False, progress=False).rows[0]
    assert row["status"] == "error" and "8194 tokens is more than smollm2-135m's context of 8192" in row["error"]


@pytest.mark.parametrize("spec, match", [
    ({"fixed": {"modle": "x"}}, "unknown input"),
    ({"fixed": {"beta_cycles": 5}, "axes": {"beta_cycles": [1, 2]}}, "both fixed and swept"),
    ({"fixed": {"wafers": 2}}, "one wafer"),
    ({"axes": {"defect_rate": [0.0, 1.5]}}, "defect rate|defect_rate"),
    ({"sweep": {"method": "random"}, "axes": {"beta_cycles": [1, 2]}}, "samples"),
    ({"sweep": {"method": "bayes"}}, "method"),
    ({"axes": {"beta_cycles": {"low": 1, "high": 10}}}, "needs num"),
    ({"axes": {"beta_cycles": {"low": 0, "high": 10, "num": 3, "log": True}}}, "low > 0"),
    ({"axes": {"rows": [100.5]}}, "whole number"),
    ({"axes": {"prefill_grid": ["big"]}}, "auto"),
    ({"axes": {"beta_cycles": []}}, "empty"),
    ({"grid": {}}, "unknown table"),
])
def test_bad_specs_are_refused_clearly(spec, match):
    with pytest.raises(SweepError, match=match):
        spec_from_mapping(spec)
    assert issubclass(SweepError, WaferLLMError)


def test_grid_ranges_and_random_draws():
    s = spec_from_mapping({"axes": {"sram_bytes_per_pe": {"low": 24576, "high": 196608, "num": 4, "log": True},
                                    "beta_cycles": {"low": 1, "high": 3, "num": 3}}})
    pts = s.points()
    assert len(pts) == 12
    assert sorted({p["sram_bytes_per_pe"] for p in pts}) == [24576, 49152, 98304, 196608]  # a factor 2 apart
    assert sorted({p["beta_cycles"] for p in pts}) == [1.0, 2.0, 3.0]
    assert all(p["model"] == "llama3-8b" and p["prefill_grid"] == "auto" for p in pts)  # the defaults
    r = {"sweep": {"method": "random", "samples": 20, "seed": 3},
         "axes": {"rows": {"low": 100, "high": 700}, "dtype": ["fp16", "fp32"], "beta_cycles": {"low": 1, "high": 100, "log": True}}}
    a, b = spec_from_mapping(r).points(), spec_from_mapping(r).points()
    assert a == b and len(a) == 20
    assert all(isinstance(p["rows"], int) and 100 <= p["rows"] <= 700 for p in a)
    assert all(1 <= p["beta_cycles"] <= 100 and p["dtype"] in ("fp16", "fp32") for p in a)
    assert spec_from_mapping({**r, "sweep": {**r["sweep"], "seed": 4}}).points() != a


def test_sweep_cli_lists_runs_and_refuses(tmp_path, capsys):
    spec = tmp_path / "s.toml"
    _write_config(tmp_path / "mine", "smollm2-135m")  # a model beside the spec, named relative to it
    spec.write_text('[fixed]\nmodel = "mine"\ninput_len = 32\noutput_len = 4\nprefill_grid = 32\n'
                    'decode_grid = 32\n[axes]\nbeta_cycles = [4, 8]\n')
    assert main(["sweep", str(spec), "--list"]) == 0
    listed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [p["beta_cycles"] for p in listed] == [4.0, 8.0]
    assert main(["sweep", str(spec), "--no-ray", "-q", "--plot", str(tmp_path / "plots")]) == 0
    assert "2 ok, 0 failed" in " ".join(capsys.readouterr().out.split())
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["s_line_beta_cycles.png", "s_pareto.png"]
    rows = read_results(tmp_path / "s.csv")
    assert len(rows) == 2 and {(r["model"], r["model_name"]) for r in rows} == {(str(tmp_path / "mine"), "mine")}
    spec.write_text('[fixed]\nwafers = 4\n')
    assert main(["sweep", str(spec), "--no-ray"]) == 2
    assert "one wafer" in " ".join(capsys.readouterr().err.split())
    assert main(["sweep", str(tmp_path / "missing.toml")]) == 2


# ------------------------------------------------------------------ pictures


def _nontrivial_png(path, min_bytes=15_000):
    from matplotlib.image import imread

    assert path.is_file() and path.stat().st_size > min_bytes, path
    img = imread(path)[..., :3]
    assert img.shape[0] > 300 and img.shape[1] > 500, path
    assert float(img.std()) > 0.05, path  # not a blank canvas
    assert len(np.unique((img.reshape(-1, 3) * 255).astype(np.uint8), axis=0)) > 50, path


def test_predict_plot_writes_the_pictures(tmp_path, capsys):
    assert main(["predict", "--model", "smollm2-135m", *SMALL, "--plot", str(tmp_path)]) == 0
    names = ("floorplan.png", "sram_heatmap.png", "sram.png", "time_breakdown.png", "gpu_comparison.png")
    out = capsys.readouterr().out
    for name in names:
        _nontrivial_png(tmp_path / name)
        assert name in out


def test_plot_prediction_without_plan_or_gpus(tmp_path):
    m = predict(get_model_preset("llama3-8b"), get_wafer("wse2"), 256, 4, 360, 360, layers=1, gpus=False, band=False)
    paths = plot_prediction(m, tmp_path)
    assert [p.name for p in paths] == ["floorplan.png", "sram_heatmap.png", "sram.png", "time_breakdown.png"]
    for p in paths:
        _nontrivial_png(p)


def test_pareto_front_is_the_non_dominated_set():
    pts = [(1.0, 1.0), (2.0, 3.0), (3.0, 2.0), (4.0, 5.0), (5.0, 5.0), (0.5, 0.2)]
    # minimise x, maximise y: (0.5, 0.2), (1, 1), (2, 3), (4, 5) are not beaten on both
    assert pareto_front(pts, max_x=False, max_y=True) == [(0.5, 0.2), (1.0, 1.0), (2.0, 3.0), (4.0, 5.0)]
    # maximise both: only (5, 5)
    assert pareto_front(pts, max_x=True, max_y=True) == [(5.0, 5.0)]


def test_sweep_plots_are_written(tmp_path):
    rows = []
    for b in (2.0, 5.0, 10.0, 20.0):
        for lw in (16, 32, 64):
            t = 1e-4 * (1 + b / 10) * 32 / lw
            rows.append({"status": "ok", "beta_cycles": b, "link_bits_per_cycle": lw, "tpot_s": t,
                         "decode_tokens_per_s": 1 / t, "energy_j": 5 + 1e4 * t, "kv_capacity_tokens": 1000 + lw,
                         "ttft_s": 10 * t})
    rows.append({"status": "error", "beta_cycles": 40.0, "link_bits_per_cycle": 16, "error": "does not fit"})
    paths = plot_sweep(rows, tmp_path, swept=["beta_cycles", "link_bits_per_cycle"], title="test")
    assert [p.name for p in paths] == ["pareto.png", "line_beta_cycles.png", "line_link_bits_per_cycle.png"]
    for p in paths:
        _nontrivial_png(p)
