"""`waferllm bench`: sweeps, JSON, plots, errors."""

from __future__ import annotations

import json

import pytest

from waferllm.errors import HardwareError, MeshError
from waferllm.interfaces.cli import main
from waferllm.kernels import bench as kernel_bench
from waferllm.kernels.bench import VerificationError, bench_point

KEYS = ("algo", "m", "k", "n", "grid", "seconds", "cycles", "compute_cycles", "comm_cycles", "exposed_comm_cycles",
        "efficiency", "routes_per_pe", "sram_peak_bytes_per_pe", "gpu_a100_seconds", "gpu_h100_seconds")


def _json_lines(capsys, argv):
    assert main(argv) == 0
    out = capsys.readouterr().out
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_gemm_json_sweep(capsys):
    pts = _json_lines(capsys, ["bench", "gemm", "--m", "20", "--k", "13", "--n", "17", "--grid", "1,2,3",
                               "--algo", "meshgemm,cannon,summa,allgather", "--dtype", "fp32", "--json"])
    assert len(pts) == 12
    assert [(p["grid"], p["algo"]) for p in pts[:4]] == [(1, "meshgemm"), (1, "cannon"), (1, "summa"), (1, "allgather")]
    for p in pts:
        for key in KEYS:
            assert key in p, key
        assert p["max_abs_error"] <= p["tolerance"]
        lib = bench_point("gemm", p["algo"], 20, 13, 17, p["grid"], dtype="fp32")
        assert {k: v for k, v in p.items() if k != "wall_seconds"} == \
            {k: v for k, v in lib.items() if k != "wall_seconds"}  # the CLI prints the library's point


def test_dry_run_matches_numeric(capsys):
    argv = ["bench", "gemm", "--m", "24", "--k", "18", "--n", "30", "--grid", "3", "--algo", "meshgemm,summa", "--json"]
    num = _json_lines(capsys, argv)
    dry = _json_lines(capsys, argv + ["--dry-run"])
    for a, b in zip(num, dry):
        assert a["cycles"] == pytest.approx(b["cycles"], rel=1e-12)  # a dry run replays identical steps at once
        assert a["sram_peak_bytes_per_pe"] == b["sram_peak_bytes_per_pe"]
        assert "max_abs_error" not in b


def test_gemv_sweep_and_options(capsys):
    pts = _json_lines(capsys, ["bench", "gemv", "--k", "64", "--n", "48", "--grid", "4,8",
                               "--algo", "meshgemv,pipeline,ring", "--ktree-k", "3", "--json"])
    assert len(pts) == 6 and all(p["m"] == 1 for p in pts)
    assert pts[0]["reduce"] == "ktree(K=3)"
    pts = _json_lines(capsys, ["bench", "gemv", "--m", "1", "--k", "64", "--n", "48", "--grid", "4",
                               "--grid-cols", "2", "--algo", "meshgemv", "--group", "2", "--layout", "xy", "--json"])
    assert pts[0]["grid"] == "4x2" and pts[0]["layout"] == "xy"


def test_rect_grid(capsys):
    pts = _json_lines(capsys, ["bench", "gemm", "--m", "30", "--k", "20", "--n", "25", "--grid", "2,4",
                               "--grid-cols", "3", "--algo", "meshgemm,cannon", "--json"])
    assert [p["grid"] for p in pts] == ["2x3", "2x3", "4x3", "4x3"]
    assert pts[0]["logical_grid"] == 6 and pts[2]["logical_grid"] == 12


def test_does_not_fit_is_reported(capsys):
    pts = _json_lines(capsys, ["bench", "gemm", "--k", "4096", "--grid", "4,128", "--algo", "meshgemm",
                               "--dry-run", "--json"])
    assert "SRAM overflow" in pts[0]["error"] and "cycles" not in pts[0]
    assert "error" not in pts[1]
    assert main(["bench", "gemm", "--k", "4096", "--grid", "4", "--algo", "meshgemm", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "does not fit" in out and "SRAM overflow" in out


def test_route_policy_raise(capsys):
    pts = _json_lines(capsys, ["bench", "gemm", "--k", "100", "--grid", "25", "--algo", "summa", "--dry-run",
                               "--route-policy", "raise", "--json"])
    assert "route overflow" in pts[0]["error"]
    pts = _json_lines(capsys, ["bench", "gemm", "--k", "100", "--grid", "25", "--algo", "summa", "--dry-run", "--json"])
    assert pts[0]["relayed"] and pts[0]["routes_per_pe"] == 25


def test_table_and_plot(capsys, tmp_path):
    png = tmp_path / "lat.png"
    assert main(["bench", "gemm", "--k", "64", "--grid", "2,4", "--algo", "meshgemm,summa", "--dtype", "fp16",
                 "--plot", str(png), "--set", "beta_cycles=50"]) == 0
    out = capsys.readouterr().out
    assert "meshgemm" in out and "summa" in out and "max|err|" in out
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("argv,msg", [
    (["bench", "gemm", "--k", "8", "--grid", "2", "--algo", "strassen"], "unknown gemm algorithm"),
    (["bench", "gemv", "--k", "8", "--grid", "2", "--algo", "summa"], "unknown gemv algorithm"),
    (["bench", "gemm", "--k", "8", "--grid", "2,two", "--algo", "meshgemm"], "not a whole number"),
    (["bench", "gemm", "--k", "8", "--grid", "0", "--algo", "meshgemm"], "positive"),
    (["bench", "gemm", "--k", "8", "--grid", "900", "--algo", "meshgemm", "--dry-run"], "outside"),
    (["bench", "gemm", "--k", "8", "--grid", "2", "--grid-cols", "3", "--algo", "summa"], "square"),
    (["bench", "gemv", "--m", "4", "--k", "8", "--grid", "2", "--algo", "ring"], "--m must be 1"),
    (["bench", "gemm", "--k", "8", "--grid", "2", "--algo", "meshgemm", "--wafer", "nope"], "unknown wafer"),
    (["bench", "gemm", "--k", "8", "--grid", "2", "--algo", "meshgemm", "--dtype", "bf16"], "dtype"),
    (["bench", "gemm", "--k", "8", "--grid", "2", "--algo", "meshgemm", "--set", "bogus=1"], "unknown wafer field"),
    (["bench", "conv", "--k", "8", "--grid", "2", "--algo", "meshgemm"], "unknown op"),
])
def test_bad_inputs_clean_error(capsys, argv, msg):
    assert main(argv) == 2
    assert msg in capsys.readouterr().err.replace("\n", " ")


def test_bench_point_api_and_verification(monkeypatch):
    p = bench_point("gemm", "meshgemm", 9, 7, 5, 2, dtype="fp16")
    assert p["max_abs_error"] > 0
    with pytest.raises(MeshError, match="--m must be 1, got 2"):
        bench_point("gemv", "meshgemv", 2, 7, 5, 2)
    with pytest.raises(HardwareError, match="unsupported dtype 'int8'"):
        bench_point("gemm", "meshgemm", 9, 7, 5, 2, dtype="int8")
    monkeypatch.setattr(kernel_bench, "RTOL", {"fp16": 0.0, "fp32": 0.0})
    with pytest.raises(VerificationError, match="exceeds the tolerance"):
        bench_point("gemm", "meshgemm", 9, 7, 5, 2, dtype="fp16")
    assert main(["bench", "gemm", "--m", "9", "--k", "7", "--n", "5", "--grid", "2", "--algo", "meshgemm"]) == 2
